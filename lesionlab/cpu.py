"""The one reader of this machine's CPU features: model name, flags, and a key that says when timings compare.

Everything that asks what the CPU can do (bf16 autocast in `runtime`, the engine choice's cache key, the benchmark
headers) asks here, so an override reaches all of them at once.

Emulating another CPU: `LESIONLAB_CPU_FLAGS` (flags separated by spaces or commas) replaces the flags read from
/proc/cpuinfo, e.g. `LESIONLAB_CPU_FLAGS="sse4_2 avx avx2 fma"` for an AVX2-only CPU. LesionLab then decides as it
would there (`precision auto` stays fp32 on the CPU, the engine choice is cached under another key), but the
libraries still use every instruction the real CPU has. To make torch's kernels behave as on an AVX2-only machine
as well, also set `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's convolutions and matrix products, which dominate these CNNs)
and `ATEN_CPU_CAPABILITY=avx2` (ATen's own vectorised kernels); together they emulate an AVX2-only machine for the
torch paths. ONNX Runtime (MLAS) and OpenVINO choose their kernels from CPUID themselves, so their timings under
emulation are those of this CPU (benchmarks/bench_engines.py prints the settings in force and ATen's kernel level).
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

FLAGS_ENV = "LESIONLAB_CPU_FLAGS"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix units: where bf16 autocast pays off on a CPU
# The flags that decide which engine is fastest: vector widths, FMA, VNNI / bf16 dot products, AMX tiles.
_SPEED_PREFIXES = ("avx", "amx", "fma")


@functools.cache
def _proc_cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; read once, the CPU does not change."""
    model, flags = "", ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    if m := re.search(r"^model name\s*:\s*(.*)$", text, re.M):
        model = m.group(1).strip()
    if m := re.search(r"^flags\s*:\s*(.*)$", text, re.M):
        flags = tuple(m.group(1).split())
    return model or platform.processor() or "unknown CPU", flags


def model_name() -> str:
    """The CPU's model name (`AMD EPYC 7B13`, ...), or what `platform` knows, or `unknown CPU`."""
    return _proc_cpuinfo()[0]


def flags_override() -> frozenset[str] | None:
    """The flags set by `LESIONLAB_CPU_FLAGS`, or None when it is unset or empty (read on every call: tests set it)."""
    raw = os.environ.get(FLAGS_ENV, "").strip()
    return frozenset(re.split(r"[\s,]+", raw.lower())) - {""} if raw else None


def flags() -> frozenset[str]:
    """The CPU's feature flags: `LESIONLAB_CPU_FLAGS` when set, else /proc/cpuinfo (empty where there is none)."""
    override = flags_override()
    return override if override is not None else frozenset(_proc_cpuinfo()[1])


def speed_flags() -> list[str]:
    """The flags that decide which inference engine is fastest (avx*, amx*, fma), sorted."""
    return sorted(f for f in flags() if f.startswith(_SPEED_PREFIXES))


def has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX or AVX512-BF16)."""
    return not flags().isdisjoint(BF16_FLAGS)


def key() -> str:
    """What makes timings on this CPU comparable: model name and speed flags, marked when the flags are emulated
    (an emulated AVX2-only run must not share a cached choice with the real CPU)."""
    emulated = "|emulated" if flags_override() is not None else ""
    return f"{model_name()}|{' '.join(speed_flags())}{emulated}"


def describe() -> str:
    """For benchmark headers: the speed flags, and the emulation settings in force, if any (the model name is
    `model_name()`)."""
    parts = [f"flags: {' '.join(speed_flags()) or 'none found'}"]
    if flags_override() is not None:
        parts.append(f"{FLAGS_ENV} set (emulated)")
    for var in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return "; ".join(parts)
