"""Conformal prediction sets: hand-worked cases, MAPIE on the same scores, and coverage on synthetic scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from lesionlab.evaluation import conformal as cp
from lesionlab.exceptions import UserError


def _scores(n: int, k: int = 7, *, seed: int = 0, alpha: float = 0.5):
    """Probabilities and labels drawn from them: a calibrated model, so any method should reach its coverage."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, alpha), size=n)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return p, np.minimum(y, k - 1)


class _Given(ClassifierMixin, BaseEstimator):
    """A 'fitted classifier' whose predict_proba returns its input: MAPIE then scores exactly our probabilities."""

    def __init__(self, k: int = 7):
        self.k = k
        self.classes_ = np.arange(k)
        self.n_features_in_ = k

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return np.asarray(X, float)

    def predict(self, X):
        return np.asarray(X).argmax(1)


def _mapie_sets(method: str, p_cal, y_cal, p_test, *, seed: int = 0):
    from mapie.classification import SplitConformalClassifier

    m = SplitConformalClassifier(estimator=_Given(), confidence_level=0.9, conformity_score=method, prefit=True,
                                 random_state=seed)
    m.conformalize(p_cal, y_cal)
    _, sets = m.predict_set(p_test)
    return m, sets[:, :, 0]


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_sets_match_mapie(method):
    p_cal, y_cal = _scores(500, seed=1)
    p_test, _ = _scores(400, seed=2)
    mapie, want = _mapie_sets(method, p_cal, y_cal, p_test, seed=7)
    ours = cp.fit_conformal(p_cal, y_cal, coverage=0.9, method=method, seed=7)
    np.testing.assert_allclose(cp.calibration_scores(p_cal, y_cal, method, seed=7), mapie.conformity_scores.ravel(),
                               atol=1e-12)
    got = ours.sets(p_test)
    assert got.sum(1).min() >= (1 if method == "aps" else 0)
    np.testing.assert_array_equal(got, want)


def test_quantile_rank_hand_worked():
    s = np.arange(1, 10) / 10  # 9 scores
    assert cp.conformal_quantile(s, 0.9) == 0.9  # ceil(10 * 0.9) = 9th smallest, despite 10 * 0.9 = 9.000000000000002
    assert cp.conformal_quantile(s, 0.8) == 0.8
    assert math.isinf(cp.conformal_quantile(s[:8], 0.9))  # ceil(9 * 0.9) = 9 > 8 scores: every class
    with pytest.raises(UserError, match="coverage"):
        cp.conformal_quantile(s, 1.0)


def test_lac_hand_worked():
    p_cal = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    y_cal = np.array([0, 1, 2, 0])  # scores 1 - p_y: 0.3, 0.5, 0.2, 0.7
    c = cp.fit_conformal(p_cal, y_cal, coverage=0.6, method="lac", classes=["A", "B", "C"])
    assert c.thresholds == pytest.approx([0.5] * 3)  # ceil(5 * 0.6) = 3rd smallest of 0.2, 0.3, 0.5, 0.7
    p = np.array([[0.55, 0.40, 0.05], [0.30, 0.20, 0.50], [0.40, 0.35, 0.25]])
    # keep the classes with 1 - p <= 0.5, i.e. p >= 0.5 (row 1: exactly 0.5 is kept); row 2: none, an empty set
    np.testing.assert_array_equal(c.sets(p), [[True, False, False], [False, False, True], [False, False, False]])
    assert c.differential(p) == [["A"], ["C"], []]


def test_aps_and_raps_hand_worked():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(cp.mass_above(p), [[0.0, 0.5, 0.8], [0.9, 0.0, 0.6]])
    np.testing.assert_array_equal(cp.ranks(p), [[1, 2, 3], [3, 1, 2]])
    # u = 0.5: score = mass above the true class + half its probability
    s = cp.calibration_scores(p, np.array([1, 2]), "aps", u=np.array([0.5, 0.5]))
    np.testing.assert_allclose(s, [0.5 + 0.15, 0.6 + 0.15])
    aps = cp.ConformalSets(method="aps", thresholds=[0.55] * 3, classes=["A", "B", "C"])
    # row 0: A (mass above 0) and B (0.5 < 0.55) make up the set; row 1: B then C (0.6 >= 0.55 stops)
    assert aps.differential(p) == [["A", "B"], ["B"]]
    raps = cp.ConformalSets(method="raps", thresholds=[0.55] * 3, raps_lambda=0.1, raps_k_reg=1, classes=["A", "B", "C"])
    # the penalty 0.1 * (rank - 1) pushes B of row 0 to 0.6: out
    assert raps.differential(p) == [["A"], ["B"]]
    s_raps = cp.calibration_scores(p, np.array([1, 2]), "raps", u=np.array([0.5, 0.5]), raps_lambda=0.1)
    np.testing.assert_allclose(s_raps, s + 0.1)


def test_mondrian_thresholds_per_class():
    p_cal = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])
    y_cal = np.array([0, 0, 0, 1, 1, 1])
    c = cp.fit_conformal(p_cal, y_cal, coverage=0.5, method="lac", mondrian=True, classes=["A", "B"])
    # class A scores 0.1, 0.2, 0.4 -> ceil(4 * 0.5) = 2nd: 0.2; class B scores 0.3, 0.4, 0.45 -> 0.4
    assert c.thresholds == pytest.approx([0.2, 0.4])
    assert c.n_calibration == [3, 3]
    np.testing.assert_array_equal(c.sets(np.array([[0.75, 0.25], [0.35, 0.65]])), [[False, False], [False, True]])


def test_a_class_without_enough_calibration_images_is_always_in_the_set():
    p_cal, y_cal = _scores(300, k=3, seed=3)
    y_cal[y_cal == 2] = 0  # class 2 never seen
    c = cp.fit_conformal(p_cal, y_cal, coverage=0.9, method="lac", mondrian=True, classes=["A", "B", "C"])
    assert math.isinf(c.thresholds[2]) and c.n_calibration[2] == 0
    assert c.sets(np.array([[0.98, 0.01, 0.01]]))[0, 2]
    back = cp.ConformalSets.from_dict(json.loads(json.dumps(c.to_dict())))  # inf survives JSON as null
    assert back == c


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_coverage_on_synthetic_scores(method):
    """Over repeated calibration draws the coverage averages to the target; Mondrian holds it per class."""
    p_test, y_test = _scores(20000, seed=100)
    cov, per_class = [], []
    for rep in range(10):
        p_cal, y_cal = _scores(1000, seed=rep)
        c = cp.fit_conformal(p_cal, y_cal, coverage=0.9, method=method, seed=rep)
        cov.append(cp.set_metrics(y_test, c.sets(p_test))["coverage"])
        cm = cp.fit_conformal(p_cal, y_cal, coverage=0.9, method=method, mondrian=True, seed=rep)
        m = cp.set_metrics(y_test, cm.sets(p_test))
        per_class.append([m[f"{k}_coverage"] for k in cm.classes])
    assert 0.885 <= np.mean(cov) <= (0.935 if method == "lac" else 0.96)  # APS's last-label rule over-covers a bit
    assert min(cov) >= 0.87
    assert np.mean(per_class, axis=0).min() >= 0.88


def test_coverage_report_with_lesion_bootstrap():
    p, y = _scores(600, seed=4)
    c = cp.fit_conformal(p[:300], y[:300], coverage=0.9, method="lac", mondrian=True)
    rep = cp.coverage_report(y[300:], c.sets(p[300:]), groups=np.repeat(np.arange(150), 2), n_boot=100)
    assert rep["n"] == 300 and sum(rep["set_size_counts"]) == 300
    assert rep["coverage"]["lo"] <= rep["coverage"]["value"] <= rep["coverage"]["hi"]
    assert set(rep["per_class"]) == set(c.classes)
    mel = rep["per_class"]["MEL"]
    assert mel["n"] == int((y[300:] == 0).sum()) and 0 <= mel["coverage"]["value"] <= 1
    json.dumps(rep)  # JSON-ready
    assert cp.coverage_report(y[300:], c.sets(p[300:]), n_boot=0)["coverage"]["lo"] is None


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="method"):
        cp.fit_conformal(np.full((3, 2), 0.5), np.array([0, 1, 0]), method="nope")
    with pytest.raises(UserError, match="calibrated for 2 classes"):
        cp.fit_conformal(np.full((3, 2), 0.5), np.array([0, 1, 0]), classes=["A", "B"]).sets(np.full((1, 3), 1 / 3))


def test_class_coverage_gives_one_class_its_own_target():
    p_cal = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])
    y_cal = np.array([0, 0, 0, 1, 1, 1])
    c = cp.fit_conformal(p_cal, y_cal, coverage=0.5, method="lac", mondrian=True, classes=["A", "B"],
                         class_coverage={"A": 0.75})
    # class A at 0.75: ceil(4 * 0.75) = 3rd of 0.1, 0.2, 0.4; class B unchanged at 0.5: 0.4
    assert c.thresholds == pytest.approx([0.4, 0.4])
    assert cp.ConformalSets.from_dict(json.loads(json.dumps(c.to_dict()))).class_coverage == {"A": 0.75}
    with pytest.raises(UserError, match="unknown class C"):
        cp.fit_conformal(p_cal, y_cal, mondrian=True, classes=["A", "B"], class_coverage={"C": 0.9})
    with pytest.raises(UserError, match="mondrian"):
        cp.fit_conformal(p_cal, y_cal, classes=["A", "B"], class_coverage={"A": 0.9})
    with pytest.raises(UserError, match="map classes"):
        cp.fit_conformal(p_cal, y_cal, mondrian=True, classes=["A", "B"], class_coverage="A")
