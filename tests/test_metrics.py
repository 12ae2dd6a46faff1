"""Metrics on small cases worked out by hand, cross-checked against scikit-learn."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.metrics import (
    agreement,
    auc_one_vs_rest,
    balanced_accuracy,
    confusion,
    per_class_from_confusion,
    rank_auc,
    summarize,
)
from lesionlab.evaluation.operating_points import (
    at_threshold,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
)


def _onehotish(pred, k=3, conf=0.8):
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_per_class_by_hand():
    # truth:      0 0 0 1 1 2
    # prediction: 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    cm = confusion(y, pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    pc = per_class_from_confusion(cm)
    # class 0: TP=2 FP=0 FN=1 TN=3 ; class 1: TP=1 FP=1 FN=1 TN=3 ; class 2: TP=1 FP=1 FN=0 TN=4
    assert np.allclose(pc["precision"], [1.0, 0.5, 0.5])
    assert np.allclose(pc["sensitivity"], [2 / 3, 0.5, 1.0])
    assert np.allclose(pc["specificity"], [1.0, 0.75, 0.8])
    assert np.allclose(pc["f1"], [4 / 5, 2 / 4, 2 / 3])
    assert np.allclose(pc["precision"], precision_score(y, pred, average=None))
    assert np.allclose(pc["sensitivity"], recall_score(y, pred, average=None))
    assert np.allclose(pc["f1"], f1_score(y, pred, average=None))
    assert balanced_accuracy(y, pred) == pytest.approx((2 / 3 + 0.5 + 1) / 3)


def test_summarize_shape_and_auc_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 200)
    p = rng.dirichlet(np.ones(7), 200)
    p[np.arange(200), y] += 0.3
    p /= p.sum(1, keepdims=True)
    m = summarize(y, p)
    assert set(m) >= {"classes", "n", "per_class", "macro", "accuracy", "balanced_accuracy", "confusion"}
    assert m["classes"] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"] and m["n"] == 200
    for k, c in enumerate(m["classes"]):
        assert m["per_class"][c]["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
        assert set(m["per_class"][c]) == {"precision", "sensitivity", "specificity", "f1", "auc", "support"}
    assert m["macro"]["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert np.array(m["confusion"]).sum() == 200 and np.array(m["confusion"]).trace() == round(m["accuracy"] * 200)


def test_class_without_positives_gets_null_auc_and_a_note():
    y = np.array([0, 0, 1, 1])
    p = _onehotish(np.array([0, 1, 1, 2]), k=7)
    m = summarize(y, p)
    assert m["per_class"]["BCC"]["auc"] is None and m["per_class"]["BCC"]["sensitivity"] is None
    assert m["per_class"]["BCC"]["precision"] == 0.0  # predicted once, never right
    assert any("BCC" in n for n in m["notes"])
    assert m["macro"]["sensitivity"] == pytest.approx(0.5)  # mean over MEL (1/2) and NV (1/2) only, not 7 classes


def test_degenerate_inputs():
    one_class = summarize(np.zeros(5, int), _onehotish(np.zeros(5, int), k=7))
    assert one_class["accuracy"] == 1.0 and one_class["per_class"]["MEL"]["auc"] is None  # no negatives
    const = summarize(np.array([0, 1, 0, 1]), np.full((4, 7), 1 / 7))
    assert const["per_class"]["MEL"]["auc"] == 0.5  # constant scores: AUC 0.5, ties argmax to class 0
    assert const["confusion"][1][0] == 2
    ties = auc_one_vs_rest(np.array([0, 0, 1, 1]), np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.9, 0.1]]))
    assert ties[0] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.9]))


def test_hand_written_metrics_match_sklearn_with_ties_and_absent_classes():
    """confusion, balanced_accuracy, rank_auc and auc_one_vs_rest are numpy versions of sklearn's (for speed)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(5, 80))
        y = rng.integers(0, 7 if trial % 3 else 4, n)  # some trials leave classes out of the truth
        p = np.round(rng.dirichlet(np.ones(7), n), 1)  # rounding makes many ties
        pred = p.argmax(1)
        assert (confusion(y, pred) == confusion_matrix(y, pred, labels=np.arange(7))).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
        auc = auc_one_vs_rest(y, p)
        for k in range(7):
            pos = y == k
            if pos.any() and (~pos).any():
                assert auc[k] == pytest.approx(roc_auc_score(pos, p[:, k]))
                assert rank_auc(pos, p[:, k]) == pytest.approx(roc_auc_score(pos, p[:, k]))
            else:
                assert np.isnan(auc[k]) and np.isnan(rank_auc(pos, p[:, k]))
    assert np.isnan(balanced_accuracy(np.array([], int), np.array([], int)))
    with pytest.raises(ValueError, match="0..6"):
        confusion(np.array([0, 7]), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        auc_one_vs_rest(np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        rank_auc(np.array([True, False]), np.array([np.inf, 0.1]))


def test_operating_points_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.3, 0.7, 0.35, 0.2, 0.1, 0.05, 0.0])
    # threshold 0.3 flags 4/4 positives and 2/6 negatives (0.7, 0.35)
    r = specificity_at_sensitivity(y.astype(bool), s, 1.0)
    assert r["sensitivity"] == 1.0 and r["specificity"] == pytest.approx(4 / 6) and r["threshold"] == 0.3
    r = sensitivity_at_specificity(y.astype(bool), s, 1.0)
    assert r["sensitivity"] == 0.5 and r["threshold"] == 0.8
    thr = threshold_for_sensitivity(y, s, 0.75)
    assert thr == 0.4
    at = at_threshold(y, s, thr)
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (3, 1, 1, 5)


def test_bootstrap_ci_contains_point_and_resamples_lesions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 150)
    p = rng.dirichlet(np.ones(7), 150)
    p[np.arange(150), y] += 0.5
    ci = bootstrap_ci(y, p / p.sum(1, keepdims=True), n_boot=100, seed=0)
    for key in ("accuracy", "macro_auc", "MEL_sensitivity"):
        assert ci[key]["lo"] <= ci[key]["value"] <= ci[key]["hi"]
    # duplicated images of one lesion: resampling lesions gives wider intervals than pretending they are independent
    yy, pp = np.repeat(y[:30], 5), np.repeat(p[:30], 5, axis=0)
    groups = np.repeat(np.arange(30), 5)
    wide = bootstrap_ci(yy, pp, groups=groups, n_boot=200, seed=0)["accuracy"]
    narrow = bootstrap_ci(yy, pp, n_boot=200, seed=0)["accuracy"]
    assert (wide["hi"] - wide["lo"]) > (narrow["hi"] - narrow["lo"])


def test_agreement():
    a = agreement(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]))
    assert a["agreement"] == 0.75


def test_threshold_search_keeps_collinear_roc_points():
    # ROC points (0, .5), (1/6, .75), (2/6, 1) are collinear; sklearn's default drops the middle one,
    # which is exactly the threshold that reaches sensitivity 0.75 with the best specificity.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    s = np.array([0.8, 0.6, 0.4, 0.2, 0.4, 0.2, 0.1, 0.075, 0.05, 0.0])
    assert threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.4)
    assert specificity_at_sensitivity(y, s, 0.75)["specificity"] == pytest.approx(5 / 6)
