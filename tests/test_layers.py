"""The package's layering is a contract checked by import-linter (issue 16, item 10; HOUSE_STYLE habit 14)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """`lint-imports` (also run by `make test`) keeps every import pointing down the layers: libraries never import
    workflows, the clinic pipeline or the entry points; evaluation never imports plotting, torch or report."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    order = [layer.split(" | ")[0] for layer in layers]
    for high, low in [("lesionlab.cli", "lesionlab.serve"), ("lesionlab.workflows", "lesionlab.clinic"),
                      ("lesionlab.clinic", "lesionlab.report"), ("lesionlab.report", "lesionlab.evaluation"),
                      ("lesionlab.inference", "lesionlab.evaluation"), ("lesionlab.evaluation", "lesionlab.data")]:
        assert order.index(high) < order.index(low), (high, low)
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_backwards_import_breaks_the_contract(tmp_path):
    """The contract is not vacuous: a library module importing a workflow is reported (checked on a copy of the
    package, so the working tree is never touched)."""
    import shutil

    shutil.copytree(REPO / "lesionlab", tmp_path / "lesionlab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "lesionlab" / "evaluation" / "_layer_probe.py").write_text("from lesionlab.workflows import study\n")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, ahead of the installed package
    r = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "lesionlab.evaluation._layer_probe -> lesionlab.workflows" in r.stdout, r.stdout[-2000:]
