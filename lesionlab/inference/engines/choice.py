"""`auto`: verify every candidate body against fp32 torch, time the verified ones interleaved until their medians
settle, keep the fastest; the choice is cached per (model files, CPU, threads, library versions).

Why interleaved and repeated: on a shared machine the load changes over seconds. The first chooser timed each engine
in a block of its own (a few calls, engine after engine, once), so a load burst landed on whichever engine was being
timed, and that one-shot choice was cached for good (issue 16: auto kept OpenVINO at 1.13x the latency of ONNX
Runtime on an AVX2 EPYC). Round-robin rounds spread a burst over every candidate; rounds repeat until every median
moves by less than `Timing.settle` between rounds, within a round count and a time budget. Each timed call follows
an untimed call of the same candidate (`Timing.lead_in`): an engine's threads keep spinning for a while after it
returns (ONNX Runtime's spin-wait, OpenVINO's workers), and on a 2-core machine the next engine timed right after
them measured several times slower than it runs on its own, which is how a model runs in use. The clock is a
parameter, so tests drive the whole choice with a fake clock and fake bodies instead of timing anything.

Candidates (the Predictor assembles them): its torch path (a frozen bf16 TorchScript body on CPUs with bf16 units,
else fp32 eager in channels_last), plain fp32 eager (`EAGER`: timm's `forward_features`, contiguous; the baseline
the torch path must not lose to, so when it wins the Predictor's torch path becomes plain eager), ONNX Runtime and
OpenVINO on the fp32 export, and ONNX Runtime on an accepted int8 body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lesionlab import cpu
from lesionlab.inference.engines.export import cache_root
from lesionlab.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

EAGER = "torch-eager"  # plain fp32 eager, contiguous: a candidate of `auto`, not an --engine of its own
# fp32 engines must reproduce fp32 torch up to reordered sums: probabilities within 1e-3 and the same top-1.
TOLERANCE = 1e-3
# Part of the cache key: a choice made by an older chooser (the one-shot, engine-after-engine one) is measured again.
CHOOSER_VERSION = 2
CACHE_FILE = "engines.json"


@dataclasses.dataclass
class Trial:
    """One engine's check on this machine: agreement with fp32 torch and median latencies (ms)."""

    engine: str
    verified: bool
    top1_identical: bool = False
    max_prob_diff: float = float("nan")
    ms_one: float = float("nan")
    rounds: int = 0  # interleaved one-image rounds behind `ms_one`
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Timing:
    """How `auto` times its candidates.

    Attributes:
        warmup: untimed calls per candidate first (allocation, lazy compilation, TorchScript's profiling runs).
        lead_in: untimed calls of a candidate right before each of its timed calls, so that it is timed after
            itself, not after another engine whose threads still hold the cores.
        min_rounds: interleaved rounds always timed.
        max_rounds: rounds at most.
        settle: stop once every candidate's median moved by at most this fraction since the previous round.
        budget_s: stop after this long (seconds of `clock`) once `min_rounds` are done, settled or not.
        clock: seconds, monotonic; `time.perf_counter` unless a test passes a fake one.
    """

    warmup: int = 2
    lead_in: int = 1
    min_rounds: int = 5
    max_rounds: int = 40
    settle: float = 0.02
    budget_s: float = 15.0
    clock: Callable[[], float] = time.perf_counter


def time_interleaved(calls: Mapping[str, Callable[[], object]], timing: Timing = Timing()) -> dict[str, list[float]]:
    """Milliseconds per call of each candidate, timed in round-robin rounds until every median settles.

    Each round times every candidate once (after its lead-in calls), the starting candidate rotating from round to
    round so none always follows the same neighbour.
    """
    names = list(calls)
    if not names:
        return {}
    for name in names:
        for _ in range(timing.warmup):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = timing.clock()
    previous: dict[str, float] | None = None
    for r in range(timing.max_rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for _ in range(timing.lead_in):
                calls[name]()
            t = timing.clock()
            calls[name]()
            samples[name].append((timing.clock() - t) * 1000)
        medians = {name: statistics.median(v) for name, v in samples.items()}
        if r + 1 >= timing.min_rounds:
            settled = previous is not None and all(
                abs(medians[n] - previous[n]) <= timing.settle * previous[n] for n in names)
            if settled or timing.clock() - start >= timing.budget_s:
                break
        previous = medians
    return samples


def verification_batch(input_size: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Fixed, image-like inputs (smooth colour fields, normalised scale) for checking engines against fp32."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(input_size, input_size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, input_size, input_size, generator=g)
    return ((x.clamp(0, 1) - 0.45) / 0.25).contiguous()


def _error(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def trial_engines(
    reference: Callable[[torch.Tensor], torch.Tensor],
    bodies: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    exact: set[str],
    head: Callable[[torch.Tensor], torch.Tensor],
    input_size: int,
    *,
    batch: int = 8,
    timing: Timing = Timing(),
) -> list[Trial]:
    """Check each body (tensor -> features) against the fp32 `reference` body, then time the verified ones on one
    image (what `auto` chooses by: the service and `predict` answer one image at a time).

    Args:
        reference: the fp32 torch body every candidate is compared with.
        bodies: the candidates by engine name.
        exact: the engines held to `TOLERANCE` (fp32 engines); the others (the Predictor's own torch path, bf16
            where the CPU has bf16 units, and int8, both checked on real images by `make realdata`) only need the
            same top-1 on the verification batch.
        head: features -> logits, in fp32.
        input_size: side of the square verification images.
        batch: verification images.
        timing: how the one-image latencies are measured (see `Timing`; tests pass a fake clock).

    Returns:
        One `Trial` per body, in the order given; an engine that fails to run is unverified, with its error.
    """
    x = verification_batch(input_size, n=batch)
    one = x[:1].contiguous()
    with torch.inference_mode():
        ref = torch.softmax(head(reference(x).float()), 1)
    trials: dict[str, Trial] = {}
    for name, body in bodies.items():
        try:
            with torch.inference_mode():
                p = torch.softmax(head(body(x).float()), 1)
                body(one)  # a body that runs a batch but not one image is not a candidate either
            diff = float((p - ref).abs().max())
            same = bool((p.argmax(1) == ref.argmax(1)).all())
            trials[name] = Trial(name, same and (diff <= TOLERANCE or name not in exact), same, diff)
        except Exception as e:  # noqa: BLE001 - an engine that fails to run is simply not chosen
            trials[name] = Trial(name, False, error=_error(e))
    ok = [n for n, t in trials.items() if t.verified]
    with torch.inference_mode():
        one_ms = time_interleaved({n: (lambda b=bodies[n]: b(one)) for n in ok}, timing)
    for n in ok:
        trials[n].ms_one = statistics.median(one_ms[n])
        trials[n].rounds = len(one_ms[n])
    return list(trials.values())


def fastest(trials: Sequence[Trial]) -> str:
    """The verified engine with the lowest one-image latency (torch when nothing else verified)."""
    ok = [t for t in trials if t.verified and math.isfinite(t.ms_one)]
    return min(ok, key=lambda t: t.ms_one).engine if ok else "torch"


def cpu_flags() -> list[str]:
    """The CPU's flags that decide which engine is fastest (avx*, amx*, fma; `lesionlab.cpu`, so overridable)."""
    return cpu.speed_flags()


def cpu_key() -> str:
    """What makes timings comparable between runs: the CPU (model, speed flags, emulation), threads, versions."""
    versions = []
    for pkg in ("torch", "onnxruntime", "openvino"):
        try:
            versions.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{cpu.key()}|threads={torch.get_num_threads()}|{','.join(versions)}"


def choose_cached(model_files: Sequence[Path], run_trials: Callable[[], list[Trial]], *, variant: str = ""
                  ) -> tuple[str, list[dict]]:
    """The `auto` choice for these model files on this machine: cached, else measured with `run_trials` and cached.

    Args:
        model_files: the files that define the candidates (the exported body, an int8 body; the weights when
            nothing is exported); their contents are hashed into the key.
        run_trials: measures the candidates (see `trial_engines`).
        variant: what else changes the candidates, e.g. the torch path's precision and layout.

    Returns:
        The chosen engine name and the trials as dicts (cached or just measured).
    """
    hashes = "|".join(sha256_file(f) for f in model_files)
    key = hashlib.sha256(f"{hashes}|{variant}|{cpu_key()}|chooser={CHOOSER_VERSION}".encode()).hexdigest()[:24]
    path = cache_root() / CACHE_FILE
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]["choice"], cache[key]["trials"]
    trials = run_trials()
    choice = fastest(trials)
    rows = [dataclasses.asdict(t) for t in trials]
    cache[key] = {"choice": choice, "trials": rows, "machine": cpu_key(), "variant": variant,
                  "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:  # a read-only home still gets a choice, just not a cached one
        log.info("could not cache the engine choice in %s", path, exc_info=True)
    return choice, rows
