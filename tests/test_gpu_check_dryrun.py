"""`benchmarks/gpu_check.sh --dry-run` runs end to end on the CPU, so the GPU check cannot rot between GPU loans;
and its device-time plan fits one lent GPU session (issue 20)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_train_ham  # noqa: E402

PAPER = {"n_train": 8123, "n_val": 886, "n_test": 1006}  # the study's split (docs/results-ham10000-cpu.md)


def test_the_default_run_and_one_rerun_fit_one_gpu_session():
    plan = gpu_check.session_plan()
    caps = plan["section_caps_s"]
    assert set(caps) == set(gpu_check.SECTIONS) and caps == gpu_check.PLAN_S
    assert plan["budget_s"] == gpu_check.DEFAULT_BUDGET_S == sum(caps.values()) + plan["overhead_s"]
    assert plan["start_s"] + plan["budget_s"] + plan["rerun_s"] <= plan["session_s"] == 15 * 60
    assert plan["budget_s"] < 600  # one device command runs at most 10 minutes
    assert all(plan["rerun_s"] >= c + plan["overhead_s"] for c in caps.values())  # any one section can run again
    assert plan["unused_s"] >= 0
    smaller = gpu_check.session_plan(300)["section_caps_s"]  # a smaller --budget shrinks every cap to fit
    assert sum(smaller.values()) <= 300 - plan["overhead_s"] + 1e-6 and all(smaller[k] < caps[k] for k in caps)


@pytest.mark.parametrize("rate,measured", [(gpu_check.ASSUMED_TRAIN_IMAGES_PER_S, False), (1200.0, True), (2400.0, True)])
@pytest.mark.parametrize("cached", [True, False])
def test_the_train_section_plan_fits_its_cap(rate, measured, cached):
    """epochs x images / throughput (+ start-up, cache, test set) fits the train section's seconds, per model."""
    seconds = gpu_check.PLAN_S["train"] - gpu_check.OVERHEAD_S
    tp = gpu_check.plan_train(seconds, **PAPER, archs=4, images_per_s=rate, measured=measured, cached=cached)
    epoch_s = (PAPER["n_train"] + PAPER["n_val"] / gpu_check.EVAL_SPEEDUP) / rate
    assert tp["epochs"] >= 1 and tp["epochs"] <= gpu_check.PAPER_MAX_EPOCHS
    assert gpu_check.MODEL_STARTUP_S + tp["epochs"] * epoch_s <= tp["seconds_per_model"]
    assert tp["planned_seconds"] <= seconds and 4 * tp["seconds_per_model"] + tp["cache_seconds"] <= seconds + 1e-6
    assert tp["throughput"] == ("measured" if measured else "assumed")
    slower = gpu_check.plan_train(seconds, **PAPER, archs=4, images_per_s=rate / 2, measured=True, cached=cached)
    assert slower["epochs"] <= tp["epochs"]


def test_the_train_rate_comes_from_the_gpu_augmentation_row():
    rows = [{"stage": "training step", "source": "device-resident batch", "compile": False, "images_per_s": 9.0},
            {"stage": "training step", "source": "real data path, GPU augmentation", "compile": True, "images_per_s": 8.0},
            {"stage": "training step", "source": "real data path, GPU augmentation", "compile": False, "images_per_s": 7.0}]
    assert gpu_check.measured_train_rate({"results": rows}) == 7.0
    assert gpu_check.measured_train_rate({}) is None


def test_train_results_are_written_after_every_model(tmp_path):
    """A timeout keeps what finished: the JSON on disk holds every model finished before the next one starts."""
    import numpy as np

    path = tmp_path / "train.json"
    out = {"models": [], "ensemble": None}
    truth = np.arange(14) % 7
    seen = []

    def train_one(arch):
        seen.append(len(json.loads(path.read_text())["models"]) if path.exists() else 0)
        if arch == "broken":
            raise RuntimeError("out of memory")
        return {"arch": arch}, np.eye(7)[truth] * 0.9 + 0.1 / 7, truth

    gpu_train_ham.train_all(["a", "broken", "b"], train_one, out, path)
    assert seen == [0, 1, 2]
    got = json.loads(path.read_text())
    assert [m["arch"] for m in got["models"]] == ["a", "broken", "b"] and "error" in got["models"][1]
    assert got["ensemble"]["members"] == 2 and set(got["ensemble"]["test_per_class"]) >= {"MEL", "NV"}


def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    assert got["dry_run"] and got["env"]["torch"]
    assert got["plan"]["section_caps_s"] == gpu_check.DRY_PLAN_S
    cases = got["tests"]["cases"]
    assert len(cases) == 8 and all(c["status"] == "passed" for c in cases), cases
    rec = got["tests"]["records"]
    assert rec["predictor_agreement"]["top1_agreement"] >= 0.99 and rec["ddp"]["backend"] == "gloo"
    assert rec["gpu_augment_vs_cpu"]["max_diff_255"] <= 1.0
    thr = got["throughput"]["numbers"]["results"]
    assert [(r["stage"], r["source"]) for r in thr] == [
        ("augmentation only", "real data path, CPU augmentation"), ("augmentation only", "real data path, GPU augmentation"),
        ("training step", "device-resident batch"), ("training step", "real data path, CPU augmentation"),
        ("training step", "real data path, GPU augmentation")]
    assert all(r["images_per_s"] > 0 for r in thr)
    assert got["train_plan"]["throughput"] == "measured" and got["train_plan"]["epochs"] >= 1
    train = got["train"]["numbers"]
    models = train["models"]
    assert train["gpu_augment"] and len(models) == 2 and all(0 <= m["test"]["balanced_accuracy"] <= 1 for m in models)
    assert train["ensemble"]["members"] == 2 and "MEL" in train["ensemble"]["test_per_class"]
    # written incrementally into the output folder (what the device tool brings back, even after a timeout)
    assert json.loads((tmp_path / "gpu_train.json").read_text()) == train
    assert json.loads((tmp_path / "gpu_throughput.json").read_text())["results"] == thr
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## GPU check", "Device-time plan", "Train plan", "### CUDA tests", "### Training throughput",
                    "### Four models", "per class"):
        assert heading in md
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8  # the device tool brings back at most 8 files
