"""The CPU bf16 fast path (fused BatchNorm, bf16 TorchScript body, fp32 head) runs in the default test run.

It is the default on CPUs with bf16 units (AMX / AVX512-BF16); bf16 arithmetic works on any x86 CPU (only slower),
so where this CPU lacks it the tests force the path with precision="bf16" and it is always exercised.
"""

import numpy as np
import pytest
import torch
from helpers import make_tiny_checkpoint

from lesionlab import runtime
from lesionlab.data.images import load_image
from lesionlab.data.synth import make_synthetic
from lesionlab.data.tables import read_table
from lesionlab.inference.predictor import Predictor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "ck", seed=3, input_size=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast_images")
    make_synthetic(d, n_images=24, seed=5, size=(120, 90), progress=False)
    return [load_image(p) for p in read_table(d).df["path"]]


def test_auto_precision_takes_the_fast_path_exactly_when_the_cpu_has_bf16(checkpoint, monkeypatch):
    assert Predictor(checkpoint, device="cpu", precision="auto").cpu_bf16 == runtime.cpu_has_bf16()
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert Predictor(checkpoint, device="cpu", precision="auto").cpu_bf16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert not Predictor(checkpoint, device="cpu", precision="auto").cpu_bf16


def test_bf16_fast_path_agrees_with_fp32(checkpoint, images):
    precision = "auto" if runtime.cpu_has_bf16() else "bf16"  # forced where the CPU lacks bf16 units
    fast = Predictor(checkpoint, device="cpu", precision=precision)
    ref = Predictor(checkpoint, device="cpu", precision="fp32")
    assert fast.cpu_bf16 and not ref.cpu_bf16
    p_fast, p_ref = fast.predict_images(images), ref.predict_images(images)
    # the path really ran: a frozen TorchScript body in bf16 with BatchNorm folded away; the head stays fp32
    body = fast._fast
    assert isinstance(body, torch.jit.ScriptModule)
    graph = str(body.graph)
    assert "batch_norm" not in graph and "BFloat16" in graph
    assert fast.model.get_classifier().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fast.model.parameters())  # the fp32 module is untouched
    assert p_fast.shape == p_ref.shape == (len(images), 7)
    assert np.allclose(p_fast.sum(1), 1, atol=1e-5)
    assert (p_fast.argmax(1) == p_ref.argmax(1)).all()
    assert np.abs(p_fast - p_ref).max() < 0.02
    assert not np.array_equal(p_fast, p_ref)  # bf16 arithmetic happened (fp32 would be bit-identical)


AVX2_ONLY = "sse4_2 avx avx2 fma"


def test_cpu_flags_override_emulates_another_cpu(checkpoint, monkeypatch):
    """LESIONLAB_CPU_FLAGS replaces /proc/cpuinfo's flags everywhere LesionLab asks (issue 16): an emulated AVX2-only
    CPU gets fp32 under `precision auto` and its own engine-cache key; one with bf16 units gets the bf16 path."""
    from lesionlab import cpu
    from lesionlab.inference import engines

    monkeypatch.delenv(cpu.FLAGS_ENV, raising=False)
    real_key = engines.cpu_key()
    monkeypatch.setenv(cpu.FLAGS_ENV, AVX2_ONLY)
    assert cpu.flags() == {"sse4_2", "avx", "avx2", "fma"} and not runtime.cpu_has_bf16()
    assert runtime.pick_precision("auto", torch.device("cpu")) is None
    assert not Predictor(checkpoint, device="cpu", precision="auto").cpu_bf16
    assert engines.cpu_key() != real_key and "avx512" not in engines.cpu_key()
    monkeypatch.setenv(cpu.FLAGS_ENV, "avx2, avx512f,avx512_bf16")  # commas work too
    assert runtime.cpu_has_bf16() and Predictor(checkpoint, device="cpu", precision="auto").cpu_bf16


def test_one_module_reads_the_cpu_features():
    """Only lesionlab/cpu.py reads /proc/cpuinfo, so its override reaches every decision and benchmark header."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readers = [p.relative_to(root).as_posix() for folder in ("lesionlab", "benchmarks") for p in (root / folder).rglob("*.py")
               if '"/proc/cpuinfo"' in p.read_text()]
    assert readers == ["lesionlab/cpu.py"]
