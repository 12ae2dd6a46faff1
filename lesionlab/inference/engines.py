"""CPU inference engines for a model's body (`forward_features`): torch, ONNX Runtime, OpenVINO, and `auto`.

The Predictor's own path (`torch`: fp32 eager, or the frozen bf16 TorchScript body on CPUs with AMX / AVX512-BF16)
is fastest where bf16 units exist; on CPUs without them (AVX2-only EPYCs, older Xeons) ONNX Runtime and OpenVINO
run the same fp32 network faster (issue 12: 1.79x / 1.71x against timm eager on an AVX2 EPYC). Only the body
runs in the engine: the classifier head (and a metadata-fusion head, pre-logits features for OOD scores) stays in
torch fp32, so every output of the Predictor keeps its meaning, and explanations keep using the torch model.

The body is exported once to ONNX (fp32, dynamic batch) with torch.onnx; a bundle may carry it next to the
safetensors (`model.onnx`, hashed like the rest), otherwise it is exported into the cache folder
(LESIONLAB_CACHE, default ~/.cache/lesionlab) keyed by the weights' SHA-256.

`auto` verifies every available engine against fp32 torch on a fixed verification batch (top-1 identical and
probabilities within `TOLERANCE`), times one-image latency, and picks the fastest verified one; the choice is
cached per (exported model, CPU model and flags, thread count, library versions), so a machine measures once.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

INT8 = "onnxruntime-int8"  # ONNX Runtime on a statically quantised body; only where a bundle carries one accepted
ENGINES = ("auto", "torch", "onnxruntime", "openvino", INT8)
EXPORTED = ("onnxruntime", "openvino")  # engines that run the exported fp32 ONNX body
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT8_RECORD = "int8.json"  # how the int8 body was calibrated and how often its top-1 agreed with fp32
INT8_MIN_AGREEMENT = 0.99  # an int8 body is shipped only at >= 99% top-1 agreement with fp32 on real images
ONNX_OPSET = 17
# fp32 engines must reproduce fp32 torch up to reordered sums: probabilities within 1e-3 and the same top-1.
TOLERANCE = 1e-3
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", INT8: "onnxruntime"}


def check_engine(name: str) -> str:
    """The engine name, or a one-line UserError naming the valid ones."""
    if name not in ENGINES:
        raise UserError(f"--engine {name!r} is not an inference engine; use one of {', '.join(ENGINES)}")
    return name


def available(name: str) -> bool:
    """Whether the engine's package is installed (torch always is)."""
    return name == "torch" or (name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is not None)


def require(name: str) -> None:
    if not available(name):
        raise UserError(f"--engine {name}: the {_PACKAGES[name]} package is not installed; "
                        "install LesionLab's `engines` extra (pip install 'lesionlab[engines]') or use --engine torch")


def cache_root() -> Path:
    return Path(os.environ.get("LESIONLAB_CACHE") or Path.home() / ".cache" / "lesionlab")


class Body(torch.nn.Module):
    """A timm model's body (`forward_features`) as a module of its own, so it can be exported, fused, cast and
    traced without the head (what the engines and the Predictor's CPU bf16 path run)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def export_body_onnx(model: torch.nn.Module, input_size: int, path: str | Path) -> Path:
    """Write the fp32 body of `model` as ONNX (input `image` N x 3 x S x S, output `features`; batch dynamic)."""
    path = Path(path)
    body = Body(copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format)).eval()
    example = torch.randn(1, 3, input_size, input_size)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: exact for these CNNs and much faster than the dynamo one.
            torch.onnx.export(body, (example,), str(tmp), input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def onnx_for(checkpoint: str | Path, model: torch.nn.Module, input_size: int) -> Path:
    """The exported body of a checkpoint: `model.onnx` beside it (bundles), else one in the cache (made once)."""
    ck = Path(checkpoint)
    ck_dir = ck if ck.is_dir() else ck.parent
    beside = ck_dir / ONNX_FILE
    if beside.exists():
        return beside
    weights = ck_dir / "model.safetensors"
    key = sha256_file(weights)[:20] if weights.exists() else hashlib.sha256(str(ck_dir.resolve()).encode()).hexdigest()[:20]
    path = cache_root() / "onnx" / f"{key}-{input_size}.onnx"
    if not path.exists():
        log.info("exporting %s to ONNX (%s), once per model", ck_dir, path)
        export_body_onnx(model, input_size, path)
    return path


def int8_for(checkpoint: str | Path) -> Path | None:
    """The accepted int8 body beside a (bundle member) checkpoint, else None."""
    ck = Path(checkpoint)
    ck_dir = ck if ck.is_dir() else ck.parent
    model, record = ck_dir / INT8_FILE, ck_dir / INT8_RECORD
    if not (model.exists() and record.exists()):
        return None
    try:
        return model if json.loads(record.read_text()).get("accepted") else None
    except (OSError, json.JSONDecodeError):
        return None


def quantize_int8(onnx_fp32: str | Path, calibration: np.ndarray, out: str | Path, *, batch: int = 16) -> Path:
    """Static post-training int8 quantisation of an exported body with ONNX Runtime's quantiser.

    QDQ format, per-channel signed int8 weights, unsigned int8 activations whose ranges come from `calibration`
    (preprocessed images, N x 3 x S x S float32; LesionLab uses validation images). The graph is first run through
    ONNX Runtime's `quant_pre_process` (shape inference, fusions), as its documentation recommends. Whether the
    result may be used is decided by its top-1 agreement with fp32 (see `top1_agreement`), not here.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([np.ascontiguousarray(calibration[i:i + batch], dtype=np.float32)
                                  for i in range(0, len(calibration), batch)])

        def get_next(self):
            x = next(self._batches, None)
            return None if x is None else {"image": x}

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_fp32), str(pre), skip_symbolic_shape=True)

        def write(dest: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(pre), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

        atomic_write(out, write)
    return out


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of rows whose arg-max class is the same in two probability (or logit) arrays."""
    return float((np.asarray(reference).argmax(1) == np.asarray(other).argmax(1)).mean())


class OnnxRuntimeBody:
    """ONNX Runtime on the CPU, all graph optimisations, this process's torch thread count."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": x})[0]


class _SignalStack(ctypes.Structure):  # Linux `stack_t`
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


class keep_signal_stack:
    """Keep the calling thread's alternate signal stack across OpenVINO calls (a context manager).

    Why by hand: OpenVINO's CPU plugin (intel_cpu `SigAltStackSetup`, 2025 and later) gives the thread that
    compiles or runs a model an alternate signal stack of its own and, when that object is destroyed, puts back the
    one it found. Objects destroyed out of order (two models, or a model and its infer request) leave the thread on
    a stack that was already unmapped, and the next signal handled on it (SIGCHLD from a finished subprocess, say)
    kills the whole process with SIGSEGV, without even a faulthandler trace. No library fixes this for us; putting
    the thread's own stack back after every OpenVINO call means every stack OpenVINO saves (and later restores) is
    the thread's own, which stays valid. Elsewhere than Linux, a no-op.
    """

    _libc = None

    def __enter__(self):
        self._saved = None
        if sys.platform.startswith("linux"):
            if keep_signal_stack._libc is None:
                keep_signal_stack._libc = ctypes.CDLL(None, use_errno=True)
            self._saved = _SignalStack()
            if keep_signal_stack._libc.sigaltstack(None, ctypes.byref(self._saved)) != 0:
                self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            now = _SignalStack()
            self._libc.sigaltstack(None, ctypes.byref(now))
            if (now.ss_sp, now.ss_size, now.ss_flags) != (self._saved.ss_sp, self._saved.ss_size, self._saved.ss_flags):
                self._libc.sigaltstack(ctypes.byref(self._saved), None)
        return False


class OpenVinoBody:
    """OpenVINO on the CPU in f32 (its default would be bf16 on AMX CPUs, which is not an fp32 engine), latency hint.

    Every OpenVINO call (compile, infer, release) runs inside `keep_signal_stack` (see there: an OpenVINO bug
    that otherwise crashes the process at a later signal)."""

    name = "openvino"

    def __init__(self, onnx_path: str | Path, *, threads: int | None = None):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        with keep_signal_stack():
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
            self._request = self.compiled.create_infer_request()
            del core
        self._lock = threading.Lock()  # one infer request: the service's threads take turns

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock, keep_signal_stack():
            self._request.infer({0: x})
            return self._request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        """Release the OpenVINO objects now, in this thread, keeping its signal stack."""
        with keep_signal_stack():
            self.__dict__.pop("_request", None)
            self.__dict__.pop("compiled", None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass


BODIES: dict[str, Callable[..., Callable[[np.ndarray], np.ndarray]]] = {
    "onnxruntime": OnnxRuntimeBody, "openvino": OpenVinoBody, INT8: OnnxRuntimeBody,
}


def load_body(name: str, onnx_path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    require(name)
    return BODIES[name](onnx_path)


@dataclasses.dataclass
class Trial:
    """One engine's check on this machine: agreement with fp32 torch and latencies (ms)."""

    engine: str
    verified: bool
    top1_identical: bool = False
    max_prob_diff: float = float("nan")
    ms_one: float = float("nan")
    ms_batch: float = float("nan")
    error: str = ""


def verification_batch(input_size: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Fixed, image-like inputs (smooth colour fields, normalised scale) for checking engines against fp32."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(input_size, input_size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, input_size, input_size, generator=g)
    return ((x.clamp(0, 1) - 0.45) / 0.25).contiguous()


def _median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # first-call allocation, lazy compilation, TorchScript's profiling runs
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def trial_engines(
    reference: Callable[[torch.Tensor], torch.Tensor],
    bodies: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    exact: set[str],
    head: Callable[[torch.Tensor], torch.Tensor],
    input_size: int,
    *,
    repeat: int = 5,
    batch: int = 8,
) -> list[Trial]:
    """Check each body (tensor -> features) against the fp32 `reference` body, then time the verified ones.

    `exact` names the engines held to `TOLERANCE` (fp32 engines); the others (the Predictor's own torch path,
    bf16 where the CPU has bf16 units, whose agreement on real images is checked by `make realdata`) only need
    the same top-1 on the verification batch.
    """
    x = verification_batch(input_size, n=batch)
    with torch.inference_mode():
        ref = torch.softmax(head(reference(x).float()), 1)
    out = []
    for name, body in bodies.items():
        try:
            with torch.inference_mode():
                p = torch.softmax(head(body(x).float()), 1)
            diff = float((p - ref).abs().max())
            same = bool((p.argmax(1) == ref.argmax(1)).all())
            ok = same and (diff <= TOLERANCE or name not in exact)
            t = Trial(name, ok, same, diff)
            if ok:
                one = x[:1].contiguous()
                with torch.inference_mode():
                    t.ms_one = _median_ms(lambda b=body, o=one: b(o), repeat)
                    t.ms_batch = _median_ms(lambda b=body: b(x), max(2, repeat // 2), warmup=1)
        except Exception as e:  # an engine that fails to run is simply not chosen
            t = Trial(name, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        out.append(t)
    return out


def fastest(trials: list[Trial]) -> str:
    """The verified engine with the lowest one-image latency (torch when nothing else verified)."""
    ok = [t for t in trials if t.verified and np.isfinite(t.ms_one)]
    return min(ok, key=lambda t: t.ms_one).engine if ok else "torch"


def cpu_key() -> str:
    """What makes timings comparable between runs: CPU model, its SIMD / matrix flags, threads, library versions."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))))
                break
    except OSError:
        pass
    versions = []
    for pkg in ("torch", "onnxruntime", "openvino"):
        try:
            versions.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{model}|{flags}|threads={torch.get_num_threads()}|{','.join(versions)}"


def cpu_flags() -> list[str]:
    """The CPU's vector / matrix extensions that decide which engine is fastest (avx2, avx512*, amx*)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def choose_cached(onnx_path: Path, run_trials: Callable[[], list[Trial]], *, also: Path | None = None
                  ) -> tuple[str, list[dict]]:
    """The `auto` choice for this exported model (and `also`, an int8 body) on this machine: cached, else measured."""
    extra = sha256_file(also) if also is not None else ""
    key = hashlib.sha256(f"{sha256_file(onnx_path)}|{extra}|{cpu_key()}".encode()).hexdigest()[:24]
    path = cache_root() / "engines.json"
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]["choice"], cache[key]["trials"]
    trials = run_trials()
    choice = fastest(trials)
    rows = [dataclasses.asdict(t) for t in trials]
    cache[key] = {"choice": choice, "trials": rows, "machine": cpu_key(), "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:  # a read-only home still gets a choice, just not a cached one
        log.info("could not cache the engine choice in %s", path, exc_info=True)
    return choice, rows
