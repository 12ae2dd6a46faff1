"""Driver of benchmarks/gpu_check.sh: runs each section in its own process group with a time cap, and rewrites
gpu_check.json + gpu_check.md in the output folder after every section, so a failing or killed section keeps
the others' results.

Sections: env (GPU, CUDA, torch), tests (tests/test_gpu.py), throughput (benchmarks/bench_train.py, real data
path, with and without torch.compile), train (benchmarks/gpu_train_ham.py: the four models on real HAM10000).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import gpu_common

REPO = gpu_common.REPO
SECTIONS = ("env", "tests", "throughput", "train")
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
                  f"Real data path: {d.get('train_images', '?')} training images from the uint8 cache, random rotation + "
                  f"crop + resize in {d.get('workers', '?')} DataLoader workers, pinned memory.", "",
                  "| torch.compile | input | images/s | timed steps | first step (s) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {'on' if r['compile'] else 'off'} | {r['source']} | {r['images_per_s']:.0f} | {r['steps']} | "
                  f"{r['first_step_seconds']} |" for r in d.get("results", [])]
        lines += ["", "Goal: >= 2,000 images/s on one H100 through the real data path (anchor: NVIDIA DeepLearningExamples, "
                  "908 images/s for ResNeXt101-32x4d on one A100 with AMP)."]
    tr = res.get("train")
    if tr:
        d = tr.get("numbers", {})
        base = cpu_baseline()
        lines += ["", f"### Four models from random weights on real HAM10000 at {d.get('size', '?')}px "
                  f"(cap {d.get('seconds_per_model', '?'):.0f} s per model; {tr['run']['seconds']} s, exit {tr['run']['rc']}"
                  + (", timed out" if tr["run"]["timed_out"] else "") + ")", "",
                  f"Split sizes {d.get('split_sizes')}; batch {d.get('batch')}, Adam lr {d.get('lr')}, bf16 + channels_last, "
                  "weighted CE, early stopping on val loss (patience 2). Test metrics: this run / CPU baseline "
                  "(docs/results-ham10000-cpu.md: 64px, at most 5 epochs, same split when splits.csv is given).", "",
                  "| model | epochs | best epoch | best val loss | seconds | " + " | ".join(h for _, h in METRICS) + " |",
                  "|---|---:|---:|---:|---:|" + "---|" * len(METRICS)]
        rows = list(d.get("models", []))
        if d.get("ensemble"):
            rows.append({"arch": "ensemble", "test": d["ensemble"]["test"], "epochs": "", "best_epoch": "",
                         "best_val_loss": None, "seconds": ""})
        for m in rows:
            if "error" in m:
                lines.append(f"| {m['arch']} | failed: {m['error'][:120]} |")
                continue
            cpu = base.get(m["arch"], {})
            cells = [f"{_f(m['test'][k])} / {cpu.get(k, 'n/a')}" for k, _ in METRICS]
            lines.append(f"| {m['arch']} | {m['epochs']} | {m['best_epoch']} | {_f(m['best_val_loss'])} | {m['seconds']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data")
    ap.add_argument("--split")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--command", default="benchmarks/gpu_check.sh")
    a = ap.parse_args()
    t0 = time.time()
    deadline = t0 + a.budget
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lesionlab-gpu-check-"))
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        sys.exit(f"--only {bad[0]!r}: sections are {', '.join(SECTIONS)}")
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
    res: dict = {"command": a.command, "dry_run": a.dry_run, "budget_s": a.budget, "data": data, "split": split,
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "sections": only}
    py = sys.executable

    def save() -> None:
        res["elapsed_s"] = round(time.time() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_check.md").write_text(render(res))

    def left(reserve: float = 0.0) -> float:
        return deadline - time.time() - reserve

    # Each section gets at most its cap and leaves the later sections their minimum.
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
        cap = min(300 if a.dry_run else 170, left(60 if "train" in only else 0))
        run = run_capped([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", f"--junitxml={xml}",
                          "-o", "addopts="], env=env, timeout=cap, log_name="tests")
        rec = work / "tests_record.json"
        res["tests"] = {"run": run, "cases": junit(xml), "records": json.loads(rec.read_text()) if rec.exists() else {}}
        save()
    if "throughput" in only:
        js = work / "throughput.json"
        if a.dry_run:
            extra = ["--archs", "timm:resnet10t", "--size", "32", "--batch", "8", "--compile", "off", "--seconds", "0.2",
                     "--min-steps", "2", "--warmup", "1", "--workers", "2", "--limit", "48"]
        else:
            extra = ["--archs", "resnext101_32x4d", "--size", "224", "--batch", "128", "--compile", "both",
                     "--seconds", "10", "--min-steps", "5", "--warmup", "5"]
        cap = min(120 if a.dry_run else 190, left(70 if "train" in only else 0))
        run = run_capped([py, "benchmarks/bench_train.py", "--data", data, *(["--split", split] if split else []),
                          "--cache-dir", str(work / "cache"), "--json", str(js), *extra],
                         env=env, timeout=cap, log_name="throughput")
        res["throughput"] = {"run": run, "numbers": json.loads(js.read_text()) if js.exists() else {}}
        save()
    if "train" in only:
        js = work / "train.json"
        total = left(10)
        if a.dry_run:
            extra = ["--archs", "timm:resnet10t,timm:resnet18", "--size", "32", "--batch", "8", "--max-steps", "2",
                     "--max-epochs", "2", "--limit", "32", "--workers", "0", "--seconds-per-model", "1"]
        else:
            # Per model: its share of what is left, less ~15 s for model start-up and the test-set evaluation.
            extra = ["--seconds-per-model", f"{max(20.0, total / 4 - 15):.0f}"]
        # Validation + test probabilities come back too (gpu_ham_predictions.csv), for calibration checks on CPU.
        run = run_capped([py, "benchmarks/gpu_train_ham.py", "--data", data, *(["--split", split] if split else []),
                          "--cache-dir", str(work / "cache"), "--json", str(js),
                          "--preds", str(Path(a.out) / "gpu_ham_predictions.csv"), *extra],
                         env=env, timeout=total, log_name="train")
        res["train"] = {"run": run, "numbers": json.loads(js.read_text()) if js.exists() else {}}
        save()
    save()
    print("\n" + render(res), flush=True)
    failed = [s for s in ("tests", "throughput", "train") if s in res and res[s]["run"]["rc"] != 0]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
