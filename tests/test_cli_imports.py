"""Commands that work on CSV files alone start without torch (lazy imports in cli.py and the library)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lesionlab.data.isic_csv import probs_frame, write_isic_csv
from lesionlab.labels import CLASSES


def _csvs(tmp_path):
    """Truth for 4 images per class and two prediction CSVs (ISIC 2018 Task 3 format)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(CLASSES)), 4)
    ids = [f"ISIC_{i:07d}" for i in range(len(y))]
    write_isic_csv(tmp_path / "truth.csv", probs_frame(ids, np.eye(len(CLASSES))[y]))
    for name in ("a", "b"):
        logits = rng.normal(0, 1, (len(y), len(CLASSES))) + 2 * np.eye(len(CLASSES))[y]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        write_isic_csv(tmp_path / f"{name}.csv", probs_frame(ids, probs))
    return tmp_path / "truth.csv", tmp_path / "a.csv", tmp_path / "b.csv"


def _run_without_torch(args: list[str]) -> dict:
    """`lesionlab.cli.main(args)` in a fresh interpreter: its exit code and whether torch got imported."""
    code = ("import json, sys\nfrom lesionlab.cli import main\n"
            f"rc = main({args!r})\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["evaluate", "ensemble"])
def test_csv_commands_run_without_importing_torch(tmp_path, command):
    truth, a, b = _csvs(tmp_path)
    out = tmp_path / "out"
    if command == "evaluate":
        args = ["evaluate", "--truth", str(truth), "--pred", str(a), "--out", str(out), "--bootstrap", "10"]
    else:
        args = ["ensemble", "--pred", str(a), str(b), "--out", str(out / "ensemble.csv")]
    assert _run_without_torch(args) == {"rc": 0, "torch": False}
    if command == "evaluate":
        assert json.loads((out / "metrics.json").read_text())["n"] == 4 * len(CLASSES)
    else:
        ens = pd.read_csv(out / "ensemble.csv")
        mean = (pd.read_csv(a)[list(CLASSES)] + pd.read_csv(b)[list(CLASSES)]) / 2
        assert np.allclose(ens[list(CLASSES)], mean, atol=1e-6)
