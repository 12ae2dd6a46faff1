"""The engines that run an exported body on the CPU: their names, ONNX Runtime, OpenVINO, and `load_body`.

Each back-end is a callable from a float32 N x 3 x S x S array to the body's features (an array); the Predictor
keeps the head in torch fp32, so every output keeps its meaning whichever engine ran the body.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lesionlab.exceptions import UserError

INT8 = "onnxruntime-int8"  # ONNX Runtime on a statically quantised body; only where a bundle carries one accepted
ENGINES = ("auto", "torch", "onnxruntime", "openvino", INT8)
EXPORTED = ("onnxruntime", "openvino")  # engines that run the exported fp32 ONNX body
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
    """A one-line UserError when the engine's package is missing, saying how to install it."""
    if not available(name):
        raise UserError(f"--engine {name}: the {_PACKAGES[name]} package is not installed; "
                        "install LesionLab's `engines` extra (pip install 'lesionlab[engines]') or use --engine torch")


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
    """The named engine running the ONNX body at `onnx_path` (a UserError when its package is missing)."""
    require(name)
    return BODIES[name](onnx_path)
