"""Selective classification (lesionlab.evaluation.selective): hand-worked curves, AURC by brute force, the refusal
threshold, and the logistic refusal score against scikit-learn and an independent scipy fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lesionlab.evaluation import selective as sel
from lesionlab.exceptions import UserError


def _aurc_brute(correct, score):
    """The definition, one image at a time: the risk of everything at or below each image's own score."""
    correct, score = np.asarray(correct, bool), np.asarray(score, float)
    risks = []
    for s in score:
        acc = score <= s
        risks.append(np.mean(~correct[acc]))
    return float(np.mean(risks))


def test_risk_coverage_by_hand():
    correct = [True, False, True, True]
    score = [0.1, 0.9, 0.2, 0.3]
    rc = sel.risk_coverage(correct, score)
    assert rc["threshold"] == [0.1, 0.2, 0.3, 0.9]
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["risk"] == [0.0, 0.0, 0.0, 0.25]
    assert sel.aurc(correct, score) == pytest.approx(0.0625)
    # the error is refused first: already the best ordering
    assert sel.excess_aurc(correct, score) == pytest.approx(0.0)
    # the worst ordering: the error trusted most
    assert sel.aurc(correct, [0.9, 0.1, 0.2, 0.3]) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_ties_enter_together():
    # two tie groups, each half wrong: any order within a group gives the same curve
    rc = sel.risk_coverage([True, False, True, False], [1, 1, 2, 2])
    assert rc == {"threshold": [1.0, 2.0], "coverage": [0.5, 1.0], "risk": [0.5, 0.5]}
    assert sel.aurc([True, False, True, False], [1, 1, 2, 2]) == pytest.approx(0.5)
    assert sel.aurc([False, True, False, True], [1, 1, 2, 2]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_aurc_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 60
    correct = rng.random(n) < 0.7
    score = rng.integers(0, 8, n).astype(float)  # many ties
    assert sel.aurc(correct, score) == pytest.approx(_aurc_brute(correct, score))
    cont = rng.random(n)  # no ties: Geifman et al.'s (1/n) sum_k risk(k most trusted)
    err = ~correct[np.argsort(cont)]
    geifman = np.mean(np.cumsum(err) / np.arange(1, n + 1))
    assert sel.aurc(correct, cont) == pytest.approx(geifman)
    assert sel.aurc(correct, cont) >= sel.optimal_aurc(correct) - 1e-12


def test_optimal_aurc_closed_form():
    # errors last, no ties: (1/n) sum over the error positions k of (k - n_right) / k
    n, wrong = 200, 50
    correct = np.r_[np.ones(n - wrong, bool), np.zeros(wrong, bool)]
    k = np.arange(n - wrong + 1, n + 1)
    assert sel.optimal_aurc(correct) == pytest.approx(np.sum((k - (n - wrong)) / k) / n)
    r = wrong / n  # and its large-n limit r + (1 - r) log(1 - r)
    assert sel.optimal_aurc(correct) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=2e-3)


def test_threshold_for_rate_and_summary():
    s = np.arange(1, 11, dtype=float)
    assert sel.threshold_for_rate(s, 0.2) == 8.0  # refuses 9 and 10
    assert np.mean(s > sel.threshold_for_rate(s, 0.2)) == pytest.approx(0.2)
    assert sel.threshold_for_rate(s, 0.0) == 10.0  # refuses nothing
    assert sel.threshold_for_rate(s, 0.05) == 10.0  # half an image cannot be refused: none is
    with pytest.raises(UserError):
        sel.threshold_for_rate(s, 1.0)
    summ = sel.selective_summary([True, True, False, True, False], [False, False, True, False, True])
    assert summ == {"n": 5, "n_refused": 2, "refusal_rate": 0.4, "accuracy_all": 0.6, "accuracy_accepted": 1.0,
                    "accuracy_refused": 0.0}
    assert sel.selective_summary([True, False], [False, False])["accuracy_refused"] is None


def test_signals_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    sets = np.array([[True, False, False], [True, True, True]])
    sig = sel.refusal_signals(p, sets, np.array([0.0, math.e - 1]))
    assert sig["confidence"] == pytest.approx([0.3, 0.6])
    assert sig["set_size"].tolist() == [1.0, 3.0]
    assert sig["ood"] == pytest.approx([0.0, 1.0])


def _signals(n=400, seed=0):
    """Errors driven by confidence and set size; the OOD score is noise."""
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    size = rng.integers(1, 4, n).astype(float)
    ood = rng.random(n)
    wrong = rng.random(n) < 0.1 + 0.6 * conf + 0.05 * (size - 1)
    return {"ood": ood, "confidence": conf, "set_size": size}, wrong


def test_logistic_score_matches_sklearn_and_scipy():
    sig, wrong = _signals()
    rs = sel.fit_refusal_score(sig, wrong, refusal_rate=0.2)
    x = np.column_stack([sig[k] for k in sel.SIGNALS])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0)).fit(x, wrong)
    assert rs.score(sig) == pytest.approx(pipe.predict_proba(x)[:, 1], abs=1e-6)

    # independent fit: L2-penalised log-loss (sklearn's objective: 0.5 |w|^2 + C * sum log-loss, intercept free)
    z = (x - x.mean(0)) / x.std(0)
    yy = wrong.astype(float)

    def objective(theta):
        w, b = theta[:-1], theta[-1]
        t = z @ w + b
        return 0.5 * w @ w + np.sum(np.logaddexp(0, t) - yy * t)

    theta = minimize(objective, np.zeros(z.shape[1] + 1), method="BFGS", options={"gtol": 1e-8}).x
    assert rs.coef == pytest.approx(theta[:-1].tolist(), abs=1e-3)
    assert rs.intercept == pytest.approx(theta[-1], abs=1e-3)
    # confidence drives the errors: its weight is the largest; the threshold refuses 20% of the fit images
    assert int(np.argmax(rs.coef)) == sel.SIGNALS.index("confidence")
    assert np.mean(rs.refuse(sig)) == pytest.approx(0.2, abs=0.01)
    back = sel.RefusalScore.from_dict(json.loads(json.dumps(rs.to_dict())))
    assert back.score(sig) == pytest.approx(rs.score(sig))


def test_compare_refusals_finds_the_signal_that_targets_errors():
    sig, wrong = _signals(seed=1)
    scores = {name: sel.fit_refusal_score(sig, wrong, use=use, refusal_rate=0.2)
              for name, use in sel.VARIANTS.items()}
    test_sig, test_wrong = _signals(seed=2)
    gate = test_sig["ood"] > np.quantile(test_sig["ood"], 0.8)  # a gate that looks only at strangeness
    rows = {r["rule"]: r for r in sel.compare_refusals(~test_wrong, test_sig, scores, gate=gate)}
    assert set(rows) == {"gate", *sel.VARIANTS}
    for rule in ("confidence", "combined"):
        assert rows[rule]["accepted_at_least_all"]
        assert rows[rule]["accuracy_accepted"] > rows[rule]["accuracy_all"] + 0.03
        assert rows[rule]["accuracy_refused"] < rows[rule]["accuracy_all"]
    assert rows["combined"]["aurc"] < rows["ood"]["aurc"]
    # quality refusals stay refused under every score
    q = np.zeros(len(test_wrong), bool)
    q[:5] = True
    rows_q = {r["rule"]: r for r in sel.compare_refusals(~test_wrong, test_sig, scores, quality=q)}
    assert rows_q["ood"]["n_refused"] >= 5


def test_fallback_without_errors_and_bad_input():
    sig, _ = _signals(n=50)
    rs = sel.fit_refusal_score(sig, np.zeros(50, bool), refusal_rate=0.1)
    assert "fallback" in rs.info
    assert np.mean(rs.refuse(sig)) == pytest.approx(0.1, abs=0.02)
    with pytest.raises(UserError, match="confidence"):
        sel.fit_refusal_score({"ood": sig["ood"]}, np.zeros(50, bool))
    with pytest.raises(ValueError):
        sel.aurc([True, False], [0.1, float("nan")])
