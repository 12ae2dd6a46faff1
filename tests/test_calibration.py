"""Temperature scaling and calibration metrics: hand-worked cases and independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import brier_score_loss, log_loss

from lesionlab.data.isic_csv import probs_frame, read_isic_csv, write_isic_csv
from lesionlab.evaluation import calibration as cal
from lesionlab.exceptions import UserError


def _sample(n: int, k: int = 7, *, t_true: float = 1.0, scale: float = 3.0, seed: int = 0):
    """Logits and labels drawn from softmax(logits / t_true): a model that is calibrated at temperature t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, size=(n, k))
    p = softmax(z / t_true, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return z, np.minimum(y, k - 1)


def test_fit_temperature_recovers_the_true_temperature():
    z, y = _sample(6000, t_true=2.0)
    assert cal.fit_temperature(z, y) == pytest.approx(2.0, rel=0.08)
    z, y = _sample(6000, t_true=0.5, scale=1.0, seed=1)
    assert cal.fit_temperature(z, y) == pytest.approx(0.5, rel=0.08)


def test_fit_temperature_matches_torch_lbfgs_and_a_grid():
    """Independent fits: Guo et al.'s recipe (torch LBFGS on the cross-entropy) and a brute-force grid."""
    z, y = _sample(800, t_true=1.7, seed=2)
    t = cal.fit_temperature(z, y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zt, yt = torch.tensor(z), torch.tensor(y)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    assert t == pytest.approx(float(log_t.detach().exp()), rel=1e-4)
    grid = np.linspace(0.5, 4, 3501)
    nlls = [cal.nll(y, cal.apply_temperature(z, g)) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nlls))], abs=2e-3)
    assert cal.nll(y, cal.apply_temperature(z, t)) <= min(nlls) + 1e-9


def test_temperature_from_probabilities_equals_from_logits():
    """softmax(log p / T) == softmax(z / T): a per-row constant does not matter, so probabilities suffice."""
    z, y = _sample(500, seed=3)
    p = softmax(z, axis=1)
    assert cal.fit_temperature(cal.log_probs(p), y) == pytest.approx(cal.fit_temperature(z, y), rel=1e-6)
    np.testing.assert_allclose(cal.calibrate_probs(p, 1.8), softmax(z / 1.8, axis=1), atol=1e-12)
    np.testing.assert_allclose(cal.calibrate_probs(p, 1.0), p, atol=1e-12)


def test_probabilities_written_to_csv_keep_what_scaling_needs(tmp_path):
    """The ISIC CSVs keep tiny probabilities: scaling from the file matches scaling the float32 logits."""
    z = np.array([[20.0, 0.0, -3.0, 1.0, 2.0, -5.0, 0.5], [0.1, 0.2, 0.3, -25.0, 0.0, 1.0, 2.0]], np.float32)
    p32 = torch.softmax(torch.tensor(z), dim=1).numpy()  # what the Predictor writes
    assert p32.min() < 5e-7  # a value that 6 fixed decimals turned into 0
    write_isic_csv(tmp_path / "p.csv", probs_frame(["a", "b"], p32))
    back = read_isic_csv(tmp_path / "p.csv", kind="prediction").iloc[:, 1:].to_numpy(float)
    np.testing.assert_array_equal(back.astype(np.float32), p32)  # exact round trip of the float32 values
    for t in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(cal.calibrate_probs(back, t), softmax(z.astype(float) / t, axis=1), rtol=1e-5,
                                   atol=1e-9)


def test_ece_hand_worked():
    # confidences 0.9, 0.9 (one right, one wrong) share bin (13/15, 14/15]: |0.5 - 0.9| * 2/4;
    # 0.6 right, alone in its bin: |1 - 0.6| * 1/4; 0.4 wrong, alone in its bin: |0 - 0.4| * 1/4
    p = np.array([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0], [0.4, 0.3, 0.3]])
    y = np.array([0, 1, 0, 1])
    assert cal.ece(y, p) == pytest.approx(0.4 * 0.5 + 0.4 * 0.25 + 0.4 * 0.25)
    assert cal.mce(y, p) == pytest.approx(0.4)
    assert cal.brier(y, p) == pytest.approx(np.mean([0.01 + 0.01, 0.81 + 0.9025 + 0.0025, 0.16 + 0.16,
                                                     0.16 + 0.49 + 0.09]))
    assert cal.nll(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.05, 0.6, 0.3])))


def test_classwise_ece_hand_worked():
    p = np.array([[0.8, 0.2], [0.8, 0.2], [0.1, 0.9]])
    y = np.array([0, 1, 1])
    # class 0: bin of 0.8 holds two images, one positive: |0.5 - 0.8| * 2/3; bin of 0.1: |0 - 0.1| * 1/3
    # class 1: bin of 0.2: |0.5 - 0.2| * 2/3; bin of 0.9: |1 - 0.9| * 1/3
    want0 = 0.3 * 2 / 3 + 0.1 / 3
    assert cal.classwise_ece(y, p) == pytest.approx((want0 + want0) / 2)


def test_metrics_match_torchmetrics_and_scikit_learn():
    from torchmetrics.classification import MulticlassCalibrationError

    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(7, 0.4), size=2000)
    y = rng.integers(0, 7, 2000)
    y[:1200] = p[:1200].argmax(1)  # a model that is right more often than chance
    for norm, ours in (("l1", cal.ece), ("max", cal.mce)):
        tm = MulticlassCalibrationError(num_classes=7, n_bins=15, norm=norm)
        assert ours(y, p) == pytest.approx(float(tm(torch.tensor(p), torch.tensor(y))), abs=1e-6)
    assert cal.nll(y, p) == pytest.approx(log_loss(y, p, labels=np.arange(7)), rel=1e-9)
    assert cal.brier(y, p) == pytest.approx(brier_score_loss(y, p, labels=np.arange(7)), rel=1e-9)


def test_scaling_fixes_overconfidence():
    z, y = _sample(3000, t_true=2.5, seed=5)  # softmax(z) is overconfident by a factor 2.5 on the logit scale
    raw = softmax(z, axis=1)
    t = cal.fit_temperature(cal.log_probs(raw), y)
    after = cal.calibrate_probs(raw, t)
    assert t > 2
    assert cal.ece(y, after) < 0.03 < cal.ece(y, raw)
    assert cal.nll(y, after) < cal.nll(y, raw)
    assert (after.argmax(1) == raw.argmax(1)).all()  # scaling never changes the predicted class


def test_confidence_intervals_resample_lesions():
    z, y = _sample(400, t_true=2.0, seed=6)
    p = softmax(z, axis=1)
    groups = np.repeat(np.arange(200), 2)
    res = cal.calibration_with_ci(y, p, groups=groups, n_boot=200)
    assert set(res) == {"ece", "mce", "classwise_ece", "brier", "nll"}
    for name in ("brier", "nll", "ece"):
        assert res[name]["lo"] <= res[name]["value"] <= res[name]["hi"]
    # binned measures are biased upwards under resampling (binning noise only adds gaps; classwise ECE has many
    # sparse bins), so a percentile interval may sit just above the point estimate; it must stay near it
    ce = res["classwise_ece"]
    assert ce["lo"] < ce["hi"] and ce["lo"] < 1.5 * ce["value"]
    ba = cal.before_after(y, p, 2.0, groups=groups, n_boot=50)
    assert ba["after"]["ece"]["value"] < ba["before"]["ece"]["value"]
    assert cal.calibration_with_ci(y, p, n_boot=0)["ece"]["lo"] is None


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="labels"):
        cal.fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(UserError, match="inf"):
        cal.fit_temperature(np.array([[0.0, -np.inf]]), np.array([0]))
    with pytest.raises(UserError):
        cal.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def test_reliability_diagram(tmp_path):
    from lesionlab.report.figures import plot_reliability

    z, y = _sample(300, t_true=2.0, seed=7)
    p = softmax(z, axis=1)
    curves = {"before": cal.reliability_curve(y, p), "after": cal.reliability_curve(y, cal.calibrate_probs(p, 2.0))}
    assert len(curves["before"]["count"]) == 15 and sum(curves["before"]["count"]) == 300
    plot_reliability(curves, tmp_path / "rel.png", title="test")
    assert (tmp_path / "rel.png").stat().st_size > 1000
