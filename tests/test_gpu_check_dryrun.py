"""`benchmarks/gpu_check.sh --dry-run` runs end to end on the CPU, so the GPU check cannot rot between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    assert got["dry_run"] and got["env"]["torch"]
    cases = got["tests"]["cases"]
    assert len(cases) == 6 and all(c["status"] == "passed" for c in cases), cases
    rec = got["tests"]["records"]
    assert rec["predictor_agreement"]["top1_agreement"] >= 0.99 and rec["ddp"]["backend"] == "gloo"
    thr = got["throughput"]["numbers"]["results"]
    assert [r["source"] for r in thr] == ["device-resident batch", "real data path"]
    assert all(r["images_per_s"] > 0 for r in thr)
    models = got["train"]["numbers"]["models"]
    assert len(models) == 2 and all(0 <= m["test"]["balanced_accuracy"] <= 1 for m in models)
    assert got["train"]["numbers"]["ensemble"]["members"] == 2
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## GPU check", "### CUDA tests", "### Training throughput", "### Four models"):
        assert heading in md
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
