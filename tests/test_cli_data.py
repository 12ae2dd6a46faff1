import subprocess
import sys

import pandas as pd

from lesionlab.cli import main


def test_synth_validate_split_roundtrip(tmp_path, capsys):
    d = tmp_path / "data"
    assert main(["synth", "--out", str(d), "--images", "40", "--size", "80x60"]) == 0
    assert main(["validate", "--data", str(d)]) == 0
    assert "no problems found" in capsys.readouterr().out
    out = tmp_path / "splits.csv"
    assert main(["split", "--data", str(d), "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "no lesion is in two splits" in text and "train_images" in text
    sp = pd.read_csv(out)
    assert {"image_id", "lesion_id", "dx", "split"} <= set(sp.columns) and set(sp["split"]) == {"train", "val", "test"}
    assert main(["validate", "--data", str(d), "--split", str(out), "--no-image-check"]) == 0


def test_split_from_metadata_only(tmp_path, synth_dir):
    out = tmp_path / "s.csv"
    assert main(["split", "--metadata", str(synth_dir / "HAM10000_metadata.csv"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 160


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    (tmp_path / "d").mkdir()
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["I1"], "dx": ["mel"]}).to_csv(tmp_path / "d" / "HAM10000_metadata.csv", index=False)
    for args in (
        ["validate", "--data", str(tmp_path / "missing")],
        ["validate", "--data", str(tmp_path / "d")],
        ["split", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s.csv"), "--set", "split.seed=x"],
        ["synth", "--out", str(tmp_path / "s"), "--size", "big"],
    ):
        r = subprocess.run([sys.executable, "-m", "lesionlab.cli", *args], capture_output=True, text=True)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("lesionlab "), r.stderr
    r = subprocess.run([sys.executable, "-m", "lesionlab.cli", "validate", "--data", str(tmp_path / "d"), "--skip-invalid",
                        "--report", str(tmp_path / "skipped.csv")], capture_output=True, text=True)
    assert r.returncode == 0 and "missing image file" in pd.read_csv(tmp_path / "skipped.csv")["problem"].tolist()
