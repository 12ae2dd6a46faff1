"""Shared fixtures: tiny synthetic datasets, the real HAM10000 copy when present, CPU-only settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "0")
# ONNX exports and `--engine auto` choices (inference/engines/) go to a per-session folder, not ~/.cache, removed
# when the session ends (hundreds of MB each: left behind, they fill a CI machine's disk run after run).
if "LESIONLAB_CACHE" not in os.environ:
    os.environ["LESIONLAB_CACHE"] = tempfile.mkdtemp(prefix="lesionlab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LESIONLAB_CACHE"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_HAM = REPO.parent / "shared" / "data" / "ham10000-200x150"


def pytest_addoption(parser):
    parser.addoption("--run-realdata", action="store_true", help="run the heavy checks on ../shared real images")


def pytest_collection_modifyitems(config, items):
    """Heavy real-data checks run only with --run-realdata (`make realdata`); otherwise they are deselected."""
    if config.getoption("--run-realdata"):
        return
    heavy = [i for i in items if "realdata" in i.keywords]
    if heavy:
        config.hook.pytest_deselected(items=heavy)
        items[:] = [i for i in items if "realdata" not in i.keywords]


@pytest.fixture(scope="session")
def shared_ham() -> Path:
    if not (SHARED_HAM / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real HAM10000 copy not found at {SHARED_HAM}")
    return SHARED_HAM


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic HAM10000-layout dataset (160 images at 120x90), made once per session."""
    from lesionlab.data.synth import make_synthetic

    d = tmp_path_factory.mktemp("synth")
    make_synthetic(d, n_images=160, seed=1, size=(120, 90), progress=False)
    return d


@pytest.fixture(scope="session")
def synth_split(synth_dir, tmp_path_factory) -> Path:
    from lesionlab.data.split import make_split, write_split
    from lesionlab.data.tables import read_table

    table = read_table(synth_dir)
    sp = make_split(table.df, fractions=(0.7, 0.15, 0.15), seed=0)
    out = tmp_path_factory.mktemp("split") / "splits.csv"
    write_split(sp, out)
    return out


@pytest.fixture
def tiny_cfg():
    """A StudyConfig for seconds-long CPU runs."""
    from lesionlab.config import load_config

    return load_config(
        "demo",
        [
            "data.image_size=32", "data.batch_size=16", "data.num_workers=0", "train.epochs=2",
            "train.archs=[timm:resnet10t]", "train.pretrained=none", "train.device=cpu", "train.precision=fp32",
            "eval.bootstrap=20",
        ],
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from lesionlab.clinic.bundle import make_bundle

    d = tmp_path_factory.mktemp("bundle")
    runs = [make_tiny_checkpoint(d / "runs" / f"m{i}", seed=i) for i in range(2)]
    make_bundle(runs, d / "bundle", threshold=0.15)
    return d / "bundle"


@pytest.fixture(scope="session")
def trust_study(tmp_path_factory) -> Path:
    """A minimal study folder that a trust bundle is made from: two tiny models, a synthetic dataset at 160x120
    (large enough to pass the quality checks; images in `<study>/../data`), its split, dataset.json, the members'
    validation predictions and their inference records, all written through the StudyFolder contract."""
    from lesionlab.config import load_config
    from lesionlab.data.split import make_split, write_split
    from lesionlab.data.synth import make_synthetic
    from lesionlab.data.tables import read_table
    from lesionlab.study_folder import StudyFolder
    from lesionlab.workflows.infer import predict_split_files

    root = tmp_path_factory.mktemp("trust")
    data, sf = root / "data", StudyFolder(root / "study")
    make_synthetic(data, n_images=140, seed=3, size=(160, 120), progress=False)
    table = read_table(data)
    write_split(make_split(table.df, fractions=(0.6, 0.25, 0.15), seed=0), sf.split_file)
    runs = [make_tiny_checkpoint(sf.runs_dir / f"m{i}", seed=i) for i in range(2)]
    cfg = load_config(None, ["train.device=cpu", "train.precision=fp32"])
    sf.write_config(cfg)
    sf.write_dataset({"source": str(table.source), "layout": table.layout})
    sf.steps_file.write_text("{}")
    val = sf.frames(splits=("val",))["val"]
    predict_split_files(runs, val, sf, "val", cfg, progress=False)
    return sf.root


@pytest.fixture(scope="session")
def trust_bundle(trust_study, tmp_path_factory) -> Path:
    """A bundle with everything issue 10 adds: temperatures, conformal thresholds, OOD model, quality thresholds."""
    from lesionlab.clinic.bundle import make_bundle

    out = tmp_path_factory.mktemp("trust_bundle") / "bundle"
    make_bundle([trust_study / "runs"], out, study=trust_study)
    return out
