"""Driver of benchmarks/gpu_check.sh: runs each section in its own process group with a time cap, and rewrites
gpu_check.json + gpu_check.md in the output folder after every section, so a failing or killed section keeps
the others' results; the throughput and train sections also rewrite their own JSON in the output folder after
every number / model (gpu_throughput.json, gpu_train.json), so a section killed at its cap, or the whole command
killed, keeps what finished.

Sections: env (GPU, CUDA, torch), tests (tests/test_gpu.py), throughput (benchmarks/bench_gpu_augment.py: the
real data path with CPU and with GPU augmentation, with and without torch.compile), train
(benchmarks/gpu_train_ham.py: the four models on real HAM10000, epochs planned from the measured throughput).

The device-time plan (issue 20): a lent GPU session has 15 minutes of device time in all, the machine's start
included. `PLAN_S` sizes each section; the default budget is their sum, and start + budget + one rerun of any one
section fit in the session (`session_plan`; tests/test_gpu_check_dryrun.py checks the arithmetic).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import gpu_common

from lesionlab.io import atomic_write_text

REPO = gpu_common.REPO
SECTIONS = ("env", "tests", "throughput", "train")

# ----------------------------------------------------------------------------- the device-time plan
SESSION_S = 900.0  # one lent GPU session: 15 minutes of device time, starts, idle waits and transfers included
START_S = 120.0  # assumed: the machine's start, sending the working tree (with .gpudata/) and the files back
OVERHEAD_S = 10.0  # the driver's own start-up, reports and the sections' process starts
# Seconds per section on the GPU. tests: 9 CUDA tests took 92 s on an H100 (docs/benchmarks.md), plus the GPU
# augmentation tests. throughput: image cache ~16 s, augmentation-only numbers ~15 s, ResNeXt-101 first step ~20 s
# and three 5 s numbers, torch.compile ~77 s and two 5 s numbers. train: the rest; four models, each planned below.
PLAN_S = {"env": 10.0, "tests": 110.0, "throughput": 170.0, "train": 230.0}
DRY_PLAN_S = {"env": 30.0, "tests": 300.0, "throughput": 150.0, "train": 240.0}  # the CPU dry run (slow, shared VMs)
# One rerun of any single section (`--only SECTION`), issued while the machine is still warm (no second start).
RERUN_S = max(PLAN_S.values()) + OVERHEAD_S
DEFAULT_BUDGET_S = sum(PLAN_S.values()) + OVERHEAD_S
# The train section's sizing when the throughput section measured nothing (--only train, or it failed): ResNeXt-101
# at 224 px, bf16, no compile, GPU augmentation, assumed a little under the H100's 1,908 images/s model-only rate.
ASSUMED_TRAIN_IMAGES_PER_S = 1700.0
MODEL_STARTUP_S = 20.0  # per model: creation, cuDNN autotuning (first step 19.5 s on the H100), test-set evaluation
CACHE_IMAGES_PER_S = 500.0  # uint8 cache build on 16 cores (8,123 images in 16.3 s on the H100 host)
EVAL_SPEEDUP = 3.0  # an evaluation image costs about a third of a training image (no backward pass)
PAPER_MAX_EPOCHS = 20


def session_plan(budget: float | None = None, *, dry: bool = False) -> dict:
    """The session's time plan: each section's cap for `budget` (default: the planned sum), start and rerun."""
    plan = DRY_PLAN_S if dry else PLAN_S
    total = sum(plan.values()) + OVERHEAD_S
    budget = total if budget is None else float(budget)
    scale = min(1.0, max(0.0, budget - OVERHEAD_S) / (total - OVERHEAD_S))  # a smaller --budget shrinks every cap
    caps = {k: round(v * scale, 1) for k, v in plan.items()}
    return {"session_s": SESSION_S, "start_s": START_S, "budget_s": budget, "overhead_s": OVERHEAD_S,
            "section_caps_s": caps, "rerun_s": RERUN_S, "unused_s": round(SESSION_S - START_S - budget - RERUN_S, 1)}


def plan_train(seconds: float, *, n_train: int, n_val: int, n_test: int, archs: int, images_per_s: float,
               measured: bool, cached: bool, max_epochs: int = PAPER_MAX_EPOCHS) -> dict:
    """Epochs and seconds per model for the train section's `seconds`: epochs x images / throughput must fit.

    Per model: start-up, then `epochs` of (training images + validation images at eval speed) / throughput, then
    the test set; the uint8 cache of the images not cached yet comes first.
    """
    cache_s = math.ceil((n_val + n_test + (0 if cached else n_train)) / CACHE_IMAGES_PER_S * 10) / 10
    per_model = max(1.0, math.floor((seconds - cache_s) / max(1, archs) * 10) / 10)
    epoch_s = (n_train + n_val / EVAL_SPEEDUP) / images_per_s
    fit_s = per_model - MODEL_STARTUP_S - n_test / EVAL_SPEEDUP / images_per_s
    epochs = int(max(1, min(max_epochs, fit_s // epoch_s)))
    return {"seconds": seconds, "seconds_per_model": per_model, "epochs": epochs,
            "epoch_seconds": round(epoch_s, 2), "images_per_s": images_per_s, "throughput": "measured" if measured
            else "assumed", "cache_seconds": cache_s, "startup_seconds": MODEL_STARTUP_S,
            "planned_seconds": round(cache_s + archs * (MODEL_STARTUP_S + epochs * epoch_s
                                                        + n_test / EVAL_SPEEDUP / images_per_s), 1)}


def measured_train_rate(numbers: dict) -> float | None:
    """Training images/s through the GPU augmentation path without compile, from the throughput section."""
    for r in numbers.get("results", []):
        if r.get("stage") == "training step" and r.get("source") == "real data path, GPU augmentation" \
                and not r.get("compile") and r.get("images_per_s", 0) > 0:
            return float(r["images_per_s"])
    return None
CPU_DOC = REPO / "docs" / "results-ham10000-cpu.md"
METRICS = [("balanced_accuracy", "bal. acc."), ("accuracy", "accuracy"), ("macro_auc", "macro AUC"),
           ("macro_f1", "macro F1"), ("mel_sensitivity", "MEL sens."), ("mel_specificity", "MEL spec."),
           ("mel_auc", "MEL AUC")]


def run_capped(cmd: list[str], *, env: dict, timeout: float, log_name: str) -> dict:
    """Run `cmd` in its own process group (DataLoader workers and torchrun children die with it on timeout)."""
    t = time.perf_counter()
    print(f"\n=== {log_name}: {' '.join(cmd)} (cap {timeout:.0f}s)", flush=True)
    p = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    try:
        rc = p.wait(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc, timed_out = p.wait(), True
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t, 1)}


def junit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
        out.append({"test": case.get("name"), "status": status, "seconds": round(float(case.get("time", 0)), 1),
                    "message": msg})
    return out


def cpu_baseline() -> dict[str, dict[str, str]]:
    """Point estimates of the CPU baseline's test table (docs/results-ham10000-cpu.md), by model."""
    if not CPU_DOC.exists():
        return {}
    text = CPU_DOC.read_text()
    part = text.split("## Test results", 1)[-1].split("\n## ", 1)[0]
    rows = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and not set(cells[0]) <= set(":- ") and cells[0] != "model":
            rows[cells[0]] = {key: cells[i + 1].split(" ")[0] for i, (key, _) in enumerate(METRICS)}
    return rows


def _f(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def render(res: dict) -> str:
    env = res.get("env", {})
    lines = ["## GPU check (`benchmarks/gpu_check.sh`)", ""]
    lines.append(f"Command: `{res['command']}`" + (" (dry run on CPU at toy sizes)" if res["dry_run"] else ""))
    lines.append(f"Machine: {env.get('gpu') or 'no GPU'}"
                 + (f" ({env.get('gpu_memory_gib')} GiB, {env.get('sm_count')} SMs)" if env.get("gpu") else "")
                 + f", driver {env.get('driver', 'n/a')}; CPU {env.get('cpu', '?')}, {env.get('cpu_cores')} cores, "
                 f"/dev/shm {env.get('shm_gib')} GiB free; "
                 f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, timm {env.get('timm')}, "
                 f"Python {env.get('python')}; {res['started']}; budget {res['budget_s']} s.")
    plan = res.get("plan")
    if plan:
        caps = ", ".join(f"{k} {v:.0f} s" for k, v in plan["section_caps_s"].items())
        if res["dry_run"]:
            lines += ["", f"Device-time plan: dry-run caps for a slow CPU ({caps}), not a GPU session's plan."]
        else:
            lines += ["", f"Device-time plan: session {plan['session_s']:.0f} s = start {plan['start_s']:.0f} s (assumed) + "
                      f"this run {plan['budget_s']:.0f} s (caps: {caps}; overhead {plan['overhead_s']:.0f} s; the last section "
                      f"also gets what earlier ones leave) + one rerun of any one section {plan['rerun_s']:.0f} s "
                      f"(`--only SECTION --budget {plan['rerun_s']:.0f}`, while the machine is warm) + "
                      f"{plan['unused_s']:.0f} s spare."]
    tp = res.get("train_plan")
    if tp:
        lines += [f"Train plan: {tp['seconds']:.0f} s for 4 models, {tp['seconds_per_model']:.0f} s each, at most "
                  f"{tp['epochs']} epochs ({tp['epoch_seconds']} s each at {tp['images_per_s']:.0f} images/s, "
                  f"{tp['throughput']}), start-up {tp['startup_seconds']:.0f} s per model, cache {tp['cache_seconds']} s; "
                  f"planned {tp['planned_seconds']:.0f} s."]
    t = res.get("tests")
    if t:
        lines += ["", f"### CUDA tests (`tests/test_gpu.py`, {t['run']['seconds']} s, exit {t['run']['rc']}"
                  + (", timed out" if t["run"]["timed_out"] else "") + ")", "",
                  "| test | result | seconds | note |", "|---|---|---:|---|"]
        lines += [f"| {c['test']} | {c['status']} | {c['seconds']} | {c['message'].replace('|', '/')} |" for c in t["cases"]]
        if t.get("records"):
            lines += ["", "Recorded by the tests:", ""]
            lines += [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in t["records"].items()]
    th = res.get("throughput")
    if th:
        d = th.get("numbers", {})
        lines += ["", f"### Training throughput: {d.get('arch', '?')} at {d.get('size', '?')}px, batch {d.get('batch', '?')}, "
                  f"bf16 autocast + channels_last, Adam ({th['run']['seconds']} s, exit {th['run']['rc']}"
                  + (", timed out" if th["run"]["timed_out"] else "") + ")", "",
                  f"Real data path: {d.get('train_images', '?')} training images from the uint8 cache "
                  f"({d.get('cache_seconds', '?')} s to build), {d.get('workers', '?')} DataLoader workers, pinned memory. "
                  "CPU augmentation: the workers rotate, crop and normalise in float32; GPU augmentation: they send the "
                  "uint8 frame and its drawn parameters, and lesionlab.data.gpu_augment augments the batch on the GPU.", "",
                  "| stage | input | torch.compile | images/s | timed steps | first step (s) |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['stage']} | {r['source']} | {'on' if r['compile'] else 'off'} | {r['images_per_s']:.0f} | "
                  f"{r['steps']} | {r.get('first_step_seconds', '')} |" for r in d.get("results", [])]
        lines += ["", "Goal: >= 2,000 images/s training through the real data path on one H100/H200 (anchor: NVIDIA "
                  "DeepLearningExamples, 908 images/s for ResNeXt101-32x4d on one A100 with AMP)."]
    tr = res.get("train")
    if tr:
        d = tr.get("numbers", {})
        base = cpu_baseline()
        lines += ["", f"### Four models from random weights on real HAM10000 at {d.get('size', '?')}px "
                  f"(cap {d.get('seconds_per_model', '?'):.0f} s per model; {tr['run']['seconds']} s, exit {tr['run']['rc']}"
                  + (", timed out" if tr["run"]["timed_out"] else "") + ")", "",
                  f"Split sizes {d.get('split_sizes')}; batch {d.get('batch')}, Adam lr {d.get('lr')}, bf16 + channels_last, "
                  f"augmentation on the {'GPU' if d.get('gpu_augment') else 'CPU'}, at most {d.get('max_epochs', '?')} "
                  "epochs, weighted CE, early stopping on val loss (patience 2). Test metrics: this run / CPU baseline "
                  "(docs/results-ham10000-cpu.md: 64px, at most 5 epochs, same split when splits.csv is given).", "",
                  "| model | epochs | best epoch | best val loss | seconds | " + " | ".join(h for _, h in METRICS) + " |",
                  "|---|---:|---:|---:|---:|" + "---|" * len(METRICS)]
        rows = list(d.get("models", []))
        if d.get("ensemble"):
            rows.append({"arch": "ensemble", "test": d["ensemble"]["test"], "epochs": "", "best_epoch": "",
                         "best_val_loss": None, "seconds": "", "test_per_class": d["ensemble"].get("test_per_class")})
        for m in rows:
            if "error" in m:
                lines.append(f"| {m['arch']} | failed: {m['error'][:120]} |")
                continue
            cpu = base.get(m["arch"], {})
            cells = [f"{_f(m['test'][k])} / {cpu.get(k, 'n/a')}" for k, _ in METRICS]
            lines.append(f"| {m['arch']} | {m['epochs']} | {m['best_epoch']} | {_f(m['best_val_loss'])} | {m['seconds']} | "
                         + " | ".join(cells) + " |")
        per = [m for m in rows if m.get("test_per_class")]
        if per:
            classes = list(per[0]["test_per_class"])
            lines += ["", "Test sensitivity / AUC per class:", "",
                      "| model | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            lines += [f"| {m['arch']} | " + " | ".join(f"{_f(m['test_per_class'][c]['sensitivity'], 2)} / "
                                                      f"{_f(m['test_per_class'][c]['auc'], 2)}" for c in classes) + " |"
                      for m in per]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data")
    ap.add_argument("--split")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all sections together (default {DEFAULT_BUDGET_S:.0f}: the session plan)")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--command", default="benchmarks/gpu_check.sh")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lesionlab-gpu-check-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # scratch: results go elsewhere
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        sys.exit(f"--only {bad[0]!r}: sections are {', '.join(SECTIONS)}")
    plan = session_plan(a.budget, dry=a.dry_run)
    deadline = t0 + plan["budget_s"]
    caps = plan["section_caps_s"]
    data, split = a.data, a.split
    if not data:
        if not a.dry_run:
            sys.exit("--data: no HAM10000 copy found; pass --data DIR (see benchmarks/gpu_check.sh)")
        from lesionlab.data.synth import make_synthetic

        data = str(work / "synth")
        make_synthetic(data, n_images=120, seed=1, size=(120, 90), progress=False)
    env = dict(os.environ, LESIONLAB_GPU_CHECK="dry" if a.dry_run else "gpu", LESIONLAB_HAM=str(Path(data).resolve()),
               LESIONLAB_SPLIT=str(Path(split).resolve()) if split else "", LESIONLAB_GPU_RESULTS=str(work),
               CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res: dict = {"command": a.command, "dry_run": a.dry_run, "budget_s": plan["budget_s"], "data": data, "split": split,
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "sections": only, "plan": plan}
    py = sys.executable

    def save() -> None:
        res["elapsed_s"] = round(time.time() - t0, 1)
        atomic_write_text(out / "gpu_check.json", json.dumps(res, indent=1, default=str))
        atomic_write_text(out / "gpu_check.md", render(res))

    def cap(section: str) -> float:
        """The section's planned cap, never past the deadline less the caps of the sections still to come; the
        last section also gets what earlier ones left unused."""
        later = [s for s in SECTIONS[SECTIONS.index(section) + 1:] if s in only]
        left = deadline - time.time() - sum(caps[s] for s in later)
        return max(1.0, left - 5.0 if not later else min(caps[section], left))

    save()  # the plan, before anything runs
    if "env" in only:
        try:
            res["env"] = gpu_common.gpu_info()
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            res["env"]["driver"] = smi.stdout.strip().split(", ")[-1] if smi.returncode == 0 else "n/a"
            shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None  # DataLoader workers pass batches here
            res["env"]["shm_gib"] = round(shm.f_bavail * shm.f_frsize / 2**30, 1) if shm else None
        except Exception as e:  # noqa: BLE001 - a missing nvidia-smi must not stop the check
            res.setdefault("env", {})["error"] = repr(e)
        save()
    if "tests" in only:
        xml = work / "junit.xml"
        run = run_capped([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", f"--junitxml={xml}",
                          "-o", "addopts="], env=env, timeout=cap("tests"), log_name="tests")
        rec = work / "tests_record.json"
        res["tests"] = {"run": run, "cases": junit(xml), "records": json.loads(rec.read_text()) if rec.exists() else {}}
        save()
    if "throughput" in only:
        js = out / "gpu_throughput.json"
        if a.dry_run:
            extra = ["--arch", "timm:resnet10t", "--size", "32", "--batch", "8", "--compile", "off", "--seconds", "0.2",
                     "--min-steps", "2", "--warmup", "1", "--workers", "2", "--limit", "48"]
        else:
            extra = ["--arch", "resnext101_32x4d", "--size", "224", "--batch", "128", "--compile", "both",
                     "--seconds", "5", "--aug-seconds", "3", "--min-steps", "5", "--warmup", "3"]
        run = run_capped([py, "benchmarks/bench_gpu_augment.py", "--data", data, *(["--split", split] if split else []),
                          "--cache-dir", str(work / "cache"), "--json", str(js), *extra],
                         env=env, timeout=cap("throughput"), log_name="throughput")
        res["throughput"] = {"run": run, "numbers": json.loads(js.read_text()) if js.exists() else {}}
        save()
    if "train" in only:
        js = out / "gpu_train.json"
        seconds = cap("train")
        fr = gpu_common.frames(data, split, limit=32 if a.dry_run else 0)
        rate = measured_train_rate(res.get("throughput", {}).get("numbers", {}))
        res["train_plan"] = plan_train(
            seconds - OVERHEAD_S, n_train=len(fr["train"]), n_val=len(fr["val"]), n_test=len(fr["test"]), archs=4,
            images_per_s=rate or ASSUMED_TRAIN_IMAGES_PER_S, measured=rate is not None,
            cached=(work / "cache").exists())
        tp = res["train_plan"]
        save()
        if a.dry_run:  # toy sizes; the GPU path on the CPU, so the dry run exercises it end to end
            extra = ["--archs", "timm:resnet10t,timm:resnet18", "--size", "32", "--batch", "8", "--max-steps", "2",
                     "--max-epochs", "2", "--limit", "32", "--workers", "0", "--seconds-per-model", "1",
                     "--gpu-augment", "on"]
        else:
            extra = ["--max-epochs", str(tp["epochs"]), "--seconds-per-model", str(int(tp["seconds_per_model"]))]
        # Validation + test probabilities come back too (gpu_ham_predictions.csv), for calibration checks on CPU.
        run = run_capped([py, "benchmarks/gpu_train_ham.py", "--data", data, *(["--split", split] if split else []),
                          "--cache-dir", str(work / "cache"), "--json", str(js),
                          "--preds", str(out / "gpu_ham_predictions.csv"), *extra],
                         env=env, timeout=seconds, log_name="train")
        res["train"] = {"run": run, "numbers": json.loads(js.read_text()) if js.exists() else {}}
        save()
    save()
    print("\n" + render(res), flush=True)
    failed = [s for s in ("tests", "throughput", "train") if s in res and res[s]["run"]["rc"] != 0]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
