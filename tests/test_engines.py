"""CPU inference engines (inference/engines.py): each agrees with torch fp32, `auto` picks a verified one."""

import numpy as np
import pytest
from helpers import make_tiny_checkpoint

from lesionlab.cli import main
from lesionlab.exceptions import UserError
from lesionlab.inference import engines
from lesionlab.inference.predictor import Predictor, load_predictors


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eng") / "m", seed=3)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images(n=6):
    return engines.verification_batch(64, n=n, seed=11)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_agrees_with_torch_fp32(ck, engine, cache):
    ref = Predictor(ck, device="cpu", precision="fp32")
    pr = Predictor(ck, device="cpu", precision="fp32", engine=engine)
    assert pr.engine == engine and list((cache / "onnx").glob("*.onnx"))
    x = _images()
    a, b = ref.outputs_batch(x), pr.outputs_batch(x)
    assert (a["probs"].argmax(1) == b["probs"].argmax(1)).all()
    assert np.abs(a["probs"] - b["probs"]).max() < 1e-4
    assert np.abs(a["features"] - b["features"]).max() < 1e-3  # pre-logits features (OOD scores) too
    tta_a, tta_b = ref.predict_batch(x, tta=True), pr.predict_batch(x, tta=True)
    assert np.abs(tta_a - tta_b).max() < 1e-4


def test_auto_picks_a_verified_engine_and_caches_the_choice(ck, cache, monkeypatch):
    pr = Predictor(ck, device="cpu", precision="auto", engine="auto")
    trials = {t["engine"]: t for t in pr.engine_trials}
    assert set(trials) == {"torch", "onnxruntime", "openvino"}
    assert trials[pr.engine]["verified"]
    fastest = min((t for t in trials.values() if t["verified"]), key=lambda t: t["ms_one"])
    assert pr.engine == fastest["engine"]
    for name in engines.EXPORTED:  # fp32 engines were held to the tolerance
        assert trials[name]["max_prob_diff"] <= engines.TOLERANCE and trials[name]["verified"]

    def boom(*a, **k):
        raise AssertionError("measured again instead of using the cached choice")

    monkeypatch.setattr(engines, "trial_engines", boom)
    again = Predictor(ck, device="cpu", precision="auto", engine="auto")
    assert again.engine == pr.engine and again.engine_trials == pr.engine_trials


def test_auto_refuses_an_engine_that_disagrees(ck):
    """An engine whose output is off is never chosen, however fast."""
    ref = Predictor(ck, device="cpu", precision="fp32")
    bodies = {"torch": ref._fp32_body, "onnxruntime": lambda x: ref._fp32_body(x) * 0 + 1.0}
    trials = engines.trial_engines(ref._fp32_body, bodies, {"onnxruntime"}, ref._head, 64, repeat=1, batch=4)
    by = {t.engine: t for t in trials}
    assert by["torch"].verified and not by["onnxruntime"].verified
    assert engines.fastest(trials) == "torch"


def test_bundle_style_onnx_beside_the_checkpoint_is_used(ck, tmp_path, cache):
    import shutil

    d = tmp_path / "member"
    shutil.copytree(ck, d)
    ref = Predictor(d, device="cpu", precision="fp32")
    engines.export_body_onnx(ref.model, 64, d / engines.ONNX_FILE)
    pr = Predictor(d, device="cpu", precision="fp32", engine="onnxruntime")
    assert pr.engine == "onnxruntime" and not (cache / "onnx").exists()


def test_bad_engine_is_a_one_line_error(ck, tmp_path, capsys):
    with pytest.raises(UserError, match="--engine 'tensorrt'"):
        load_predictors([ck], device="cpu", engine="tensorrt")
    rc = main(["infer", "--data", str(tmp_path), "--run", str(ck), "--out", str(tmp_path / "p.csv"),
               "--engine", "tensorrt"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "auto, torch, onnxruntime, openvino" in err


def test_bundle_carries_the_onnx_body_hashed_and_predicts_with_it(tmp_path, cache, capsys):
    from lesionlab.clinic.bundle import EnsemblePredictor, make_bundle, verify_bundle

    runs = [make_tiny_checkpoint(tmp_path / "runs" / f"m{i}", seed=i) for i in range(2)]
    m = make_bundle(runs, tmp_path / "b", threshold=0.15, onnx=True)
    assert all(engines.ONNX_FILE in mem["files"] for mem in m["members"])
    ref = EnsemblePredictor(tmp_path / "b", device="cpu", precision="fp32")
    ens = EnsemblePredictor(tmp_path / "b", device="cpu", precision="fp32", engine="onnxruntime")
    assert {p.engine for p in ens.members} == {"onnxruntime"} and not (cache / "onnx").exists()  # no export needed
    x = _images(4)
    for a, b in zip(ref.members, ens.members, strict=True):
        assert np.abs(a.predict_batch(x) - b.predict_batch(x)).max() < 1e-4
    rc = main(["predict", str(tmp_path), "--bundle", str(tmp_path / "b"), "--engine", "fast"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("lesionlab predict: error: --engine 'fast'")
    f = tmp_path / "b" / m["members"][0]["dir"] / engines.ONNX_FILE
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="does not match its manifest hash"):
        verify_bundle(tmp_path / "b")


_SIGNAL_AFTER_OPENVINO = r"""
import faulthandler, gc, os, signal, sys
import numpy as np, timm
from lesionlab.inference import engines
faulthandler.enable()
if sys.argv[2] == "unguarded":  # what OpenVINO does to a thread without LesionLab's guard
    class _NoGuard:
        def __enter__(self): return self
        def __exit__(self, *exc): return False
    engines.keep_signal_stack = _NoGuard
before = engines._SignalStack(); engines.keep_signal_stack._libc = None
import ctypes; libc = ctypes.CDLL(None); libc.sigaltstack(None, ctypes.byref(before))
path = engines.export_body_onnx(timm.create_model("resnet10t", num_classes=7).eval(), 32, sys.argv[1])
a = engines.OpenVinoBody(path); a(np.zeros((1, 3, 32, 32), np.float32))
b = engines.OpenVinoBody(path); b(np.zeros((1, 3, 32, 32), np.float32))
del a; gc.collect(); del b; gc.collect()  # released out of order
after = engines._SignalStack(); libc.sigaltstack(None, ctypes.byref(after))
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
os.kill(os.getpid(), signal.SIGUSR1)  # handled on the thread's alternate stack
print("same stack" if (after.ss_sp, after.ss_size) == (before.ss_sp, before.ss_size) else "stack moved", got)
"""


@pytest.mark.skipif(not engines.available("openvino"), reason="openvino not installed")
def test_openvino_leaves_the_threads_signal_stack_alone(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack and, with two models released out of order,
    leaves it on unmapped memory: the next signal killed the whole test run with SIGSEGV (CI, 26 Nov 2026)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_OPENVINO, str(tmp_path / "m.onnx"), "guarded"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "same stack [1]"


def _smooth_images(n: int, seed: int) -> list:
    """Image-like PIL images (smooth colour fields plus noise), 80x60."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
        im = Image.fromarray(low).resize((80, 60), Image.BICUBIC)
        a = np.asarray(im, dtype=np.int16) + rng.integers(-8, 9, (60, 80, 3))
        out.append(Image.fromarray(a.clip(0, 255).astype(np.uint8)))
    return out


@pytest.mark.parametrize("floor", [0.0, 1.01])
def test_int8_body_is_shipped_only_above_the_agreement_floor(ck, tmp_path, cache, monkeypatch, floor):
    """The int8 body is ONNX Runtime's static quantisation calibrated on given images; it is kept (and usable as
    --engine onnxruntime-int8, and by auto) only at the agreement floor; otherwise the engine is refused in one line."""
    import json
    import shutil

    from lesionlab.clinic.bundle import _int8_member

    d = tmp_path / "member"
    shutil.copytree(ck, d)
    ref = Predictor(d, device="cpu", precision="fp32")
    engines.export_body_onnx(ref.model, 64, d / engines.ONNX_FILE)
    monkeypatch.setattr(engines, "INT8_MIN_AGREEMENT", floor)
    record, files = _int8_member(d, "m", _smooth_images(16, 0), _smooth_images(40, 1), progress=False)
    assert json.loads((d / engines.INT8_RECORD).read_text()) == record and record["images"] == 40
    assert 0 <= record["top1_agreement"] <= 1 and record["calibration_images"] == 16
    if floor > 1:
        assert not record["accepted"] and files == [engines.INT8_RECORD] and not (d / engines.INT8_FILE).exists()
        with pytest.raises(UserError, match="no accepted int8 model"):
            Predictor(d, device="cpu", precision="fp32", engine=engines.INT8)
        return
    assert record["accepted"] and files == [engines.INT8_FILE, engines.INT8_RECORD]
    pr = Predictor(d, device="cpu", precision="fp32", engine=engines.INT8)
    x = _images(8)
    got, want = pr.predict_batch(x), ref.predict_batch(x)
    assert got.shape == want.shape and np.allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs(got - want).max() < 0.2  # int8 is close to fp32, not equal (hence the agreement floor)
    auto = Predictor(d, device="cpu", precision="fp32", engine="auto")
    assert engines.INT8 in {t["engine"] for t in auto.engine_trials}


def test_int8_bundle_needs_the_studys_validation_images(tmp_path):
    from lesionlab.clinic.bundle import make_bundle

    runs = [make_tiny_checkpoint(tmp_path / "runs" / "m0", seed=0)]
    with pytest.raises(UserError, match="--int8 calibrates on the study's validation images"):
        make_bundle(runs, tmp_path / "b", threshold=0.15, int8=True)
