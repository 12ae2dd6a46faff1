"""`make demo` stays within its time budget: 300 s of study time on 2 cores without AVX-512 or AMX (issue 16).

Nothing here is timed. `estimate()` in benchmarks/bench_demo.py counts the work a demo config asks for (per model:
optimiser steps, epochs, training images x input pixels; robustness conditions x test images; OOD fit and screened
images; inference; the cross-site matrix's small models, priced by their measured cost relative to ResNet-101) and
prices it at what an idle AVX2-only 2-core EPYC takes (fitted to the demo that took 548 s there and to the cut one
measured under AVX2 emulation; the split sizes are the study's own split of the metadata the demo synthesises). The demo config must stay under the
budget with headroom for the model's error, and within the per-kind numbers chosen when it was cut, so a config
change that makes the first thing a new user runs slower fails here first; and it must stay a demo worth running
(four models, robustness, refusals, CIs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lesionlab.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_demo import BUDGET_S, estimate, split_sizes  # noqa: E402

# The work model is fitted on one machine; a demo must estimate within this share of the budget.
HEADROOM = 0.85
# Seconds per kind of work the cut demo was sized to (estimate() on an idle 2-core AVX2-only machine, rounded up).
# Raising one is a decision: make room elsewhere, and rerun benchmarks/bench_demo.py on such a machine.
CHOSEN_S = {"training": 130, "robustness": 25, "ood": 35, "cross_site": 27, "other": 25}
# The demo as it was when it took 548 s (issue 16, item 11), for checking the model itself.
PRE_CUT = ["data.image_size=64", "train.epochs=6", "robustness.max_levels=3", "ood.fit_per_class=300",
           "data.batch_size=16", "synth_sources=1", "cross_site.enabled=false", "robustness.max_images=300"]


def test_demo_fits_its_budget_with_headroom():
    est = estimate(load_config("demo"))
    assert est["total"] <= HEADROOM * BUDGET_S, f"demo estimated at {est['total']:.0f} s: {est}"


@pytest.mark.parametrize("kind", sorted(CHOSEN_S))
def test_each_kind_of_demo_work_stays_within_what_was_chosen(kind):
    est = estimate(load_config("demo"))
    assert est[kind] <= CHOSEN_S[kind], f"demo {kind} estimated at {est[kind]:.0f} s (chosen: {CHOSEN_S[kind]} s)"
    assert sum(CHOSEN_S.values()) <= HEADROOM * BUDGET_S


def test_the_work_model_sees_the_demo_that_was_too_slow():
    # The model must not be vacuous: the pre-cut demo measured 548 s (training 367, robustness 80, OOD 46, rest 28).
    old = estimate(load_config("demo", PRE_CUT))
    assert old["total"] > BUDGET_S
    assert old["total"] == pytest.approx(548, rel=0.15)
    assert old["training"] == pytest.approx(367, rel=0.15)
    assert old["robustness"] == pytest.approx(80, rel=0.15)
    assert old["ood"] == pytest.approx(46, rel=0.25)


@pytest.mark.parametrize("override", ["train.epochs=9", "data.image_size=96", "synth_images=480",
                                      "robustness.max_levels=0", "ood.fit_per_class=1000", "eval.tta=true",
                                      "cross_site.epochs=8", "cross_site.archs=[resnet101]",
                                      "train.archs=[resnet101,resnext101_32x4d,seresnet101,seresnext101_32x4d,resnet101]"])
def test_growing_the_demo_grows_its_estimate(override):
    base = estimate(load_config("demo"))["total"]
    assert estimate(load_config("demo", [override]))["total"] > base


def test_demo_is_still_the_whole_study():
    """Cuts may not buy time by dropping what the demo is for: the paper's four models from random weights, an
    ensemble with bootstrap CIs, robustness under every perturbation, refusals, Grad-CAM."""
    cfg = load_config("demo")
    assert cfg.train.archs == ["resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d"]
    assert cfg.train.pretrained == "none"  # no downloads
    assert cfg.train.device == "cpu" and cfg.train.precision == "auto"
    assert cfg.train.epochs >= 4 and cfg.data.image_size >= 48  # a Grad-CAM map of at least 2x2 on layer4
    assert split_sizes(cfg)["test"] >= 20 and split_sizes(cfg)["train"] >= 150
    assert cfg.eval.bootstrap >= 100
    assert cfg.robustness.enabled and cfg.robustness.perturbations == [] and cfg.robustness.max_levels >= 2
    assert cfg.ood.method == "mahalanobis" and cfg.ood.fit_per_class >= 10
    assert cfg.explain.gallery
    # the cross-site matrix on synthetic clinics (issue 18): every clinic trains, every other one tests
    assert cfg.synth_sources >= 3 and cfg.cross_site.enabled and cfg.cross_site.scheme == "pairs"
