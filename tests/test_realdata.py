"""Heavy checks on the real HAM10000 copy in ../shared (run with `make realdata`; skipped in `make test`).

LESIONLAB_REALDATA_RUNS may name trained run folders (e.g. a study's runs/); otherwise a ResNet-101 is
trained here for one epoch on 2,000 real images at 64x64 so the bf16 check runs on a model that has learned
something (random weights give near-uniform probabilities, where top-1 is meaningless).
"""

import os
from pathlib import Path

import numpy as np
import pytest

from lesionlab.config import load_config
from lesionlab.data.split import make_split
from lesionlab.data.tables import read_table
from lesionlab.data.validation import validate
from lesionlab.inference.predictor import find_checkpoints, load_predictors

pytestmark = pytest.mark.realdata


def test_real_dataset_validates_clean(shared_ham):
    rep = validate(read_table(shared_ham), progress=False)
    assert rep.ok, rep.summary()


@pytest.fixture(scope="module")
def real_runs(shared_ham, tmp_path_factory):
    if os.environ.get("LESIONLAB_REALDATA_RUNS"):
        return find_checkpoints([Path(p) for p in os.environ["LESIONLAB_REALDATA_RUNS"].split(os.pathsep)])
    from lesionlab.training.fit import fit

    table = read_table(shared_ham)
    sp = make_split(table.df, fractions=(0.8, 0.1, 0.1), seed=0)
    df = table.df.merge(sp[["image_id", "split"]], on="image_id")
    tr = df[df["split"] == "train"].sample(n=2000, random_state=0)
    va = df[df["split"] == "val"].sample(n=300, random_state=0)
    cfg = load_config("ham10000-cpu", ["train.epochs=1", "data.num_workers=0"])
    out = tmp_path_factory.mktemp("real")
    fit("resnet101", tr, va, cfg, out / "resnet101", cache_dir=out / "cache", progress=False)
    return find_checkpoints([out / "resnet101"])


def test_bf16_matches_fp32_on_real_images(shared_ham, real_runs):
    df = read_table(shared_ham).df.sample(n=1000, random_state=1)
    p32 = [p.predict_frame(df, progress=False) for p in load_predictors(real_runs, device="cpu", precision="fp32")]
    p16 = [p.predict_frame(df, progress=False) for p in load_predictors(real_runs, device="cpu", precision="bf16")]
    for a, b in zip(p32 + [np.mean(p32, 0)], p16 + [np.mean(p16, 0)], strict=True):
        agree = np.mean(a.argmax(1) == b.argmax(1))
        print(f"top-1 agreement {agree:.4f}, largest probability difference {np.abs(a - b).max():.4f}")
        assert agree >= 0.99


def test_int8_bodies_are_shipped_only_at_99_percent_agreement(shared_ham, tmp_path):
    """Issue 12's optional int8: `bundle --int8` on the project's real-data study (LESIONLAB_TRUST_STUDY, default
    ~/lesionlab-runs/ham10000-cpu). Each member is quantised on 64 validation images and shipped only at >= 99% top-1
    agreement with fp32 on 500 further validation images; a shipped one must also agree on the test split."""
    import pandas as pd

    from lesionlab.clinic.bundle import make_bundle
    from lesionlab.inference import engines
    from lesionlab.inference.predictor import Predictor

    study = Path(os.environ.get("LESIONLAB_TRUST_STUDY", "~/lesionlab-runs/ham10000-cpu")).expanduser()
    if not list((study / "runs").glob("*/model.safetensors")):
        pytest.skip(f"no trained real-data study at {study} (set LESIONLAB_TRUST_STUDY)")
    m = make_bundle([study / "runs"], tmp_path / "b", study=study, data=shared_ham, int8=True, ood=False)
    sp = pd.read_csv(study / "splits.csv", dtype=str)
    test = read_table(shared_ham).df.merge(sp.loc[sp["split"] == "test", ["image_id"]], on="image_id")
    for mem in m["members"]:
        r = mem["int8"]
        assert r["accepted"] == (r["top1_agreement"] >= engines.INT8_MIN_AGREEMENT)
        line = f"{mem['name']}: int8 agreement {r['top1_agreement']:.4f} on {r['images']} validation images"
        if r["accepted"]:
            d = tmp_path / "b" / mem["dir"]
            a = Predictor(d, device="cpu", precision="fp32").predict_frame(test, progress=False)
            b = Predictor(d, device="cpu", precision="fp32", engine=engines.INT8).predict_frame(test, progress=False)
            agree = float(np.mean(a.argmax(1) == b.argmax(1)))
            line += f", {agree:.4f} on the {len(test)} test images"
            assert agree >= 0.98, line
        print(line + (" -> shipped" if r["accepted"] else " -> not shipped"))
