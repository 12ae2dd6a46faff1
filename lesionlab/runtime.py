"""Device and numeric precision choice, shared by training, prediction and the service."""

from __future__ import annotations

import contextlib
import os

import torch

from lesionlab import cpu
from lesionlab.exceptions import UserError


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays off.

    Asks `lesionlab.cpu`, so `LESIONLAB_CPU_FLAGS` (an emulated AVX2-only CPU, say) changes the answer; not cached
    for that reason (the flags themselves are read once).
    """
    return cpu.has_bf16()


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU. An unavailable explicit choice is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. `auto` -> bf16 on CUDA and on bf16-capable CPUs, else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"precision {precision!r} must be auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32 / bf16 / fp16 for an autocast dtype (None = fp32), as bundles and inference records name them."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool = True) -> torch.nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, *, channels_last: bool = True) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def worker_count(requested: int) -> int:
    """DataLoader workers: as asked, but never more than this machine's cores."""
    return max(0, min(int(requested), os.cpu_count() or 1))
