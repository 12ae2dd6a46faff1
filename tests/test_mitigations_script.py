"""benchmarks/mitigations.sh end to end at toy size: both colour-constancy arms trained, robustness with and
without TTA, and the summary tables (the real-data run of docs/robustness-ham10000.md uses the same script)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mitigations_script_trains_both_arms_and_summarises(synth_dir, synth_split, tmp_path):
    out = tmp_path / "mit"
    sets = ["data.image_size=32", "data.batch_size=16", "train.epochs=1", "train.precision=fp32",
            "eval.bootstrap=20", "robustness.perturbations=[hflip,color_temperature]", "robustness.max_levels=1"]
    cmd = ["bash", "benchmarks/mitigations.sh", "--data", str(synth_dir), "--split", str(synth_split),
           "--config", "demo", "--arch", "timm:resnet10t", "--seeds", "0 1", "--workers", "0", "--max-images", "6",
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for arm in ("none", "shades_of_gray"):
        for seed in (0, 1):
            meta = (out / "runs" / f"{arm}-s{seed}" / "timm_resnet10t" / "model.json").read_text()
            assert f'"color_constancy": "{arm}"' in meta
        for view in ("", "-tta"):
            assert (out / f"robustness-{arm}{view}" / "robustness.csv").exists()
    md = (out / "mitigations.md").read_text()
    for label in ("no colour constancy, no TTA", "Shades of Gray, TTA", "lesion consistency", "color_temperature"):
        assert label in md
    assert "Command: `benchmarks/mitigations.sh" in md
