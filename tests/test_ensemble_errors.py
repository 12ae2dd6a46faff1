import numpy as np
import pandas as pd
import pytest

from lesionlab.evaluation.ensemble import ensemble_frames, mean_probabilities
from lesionlab.evaluation.error_analysis import analyse_errors
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES


def test_mean_and_weighted_mean_by_hand():
    a = np.array([[0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.2, 0.8], [0.4, 0.6]])
    assert np.allclose(mean_probabilities([a, b]), [[0.4, 0.6], [0.3, 0.7]])
    assert np.allclose(mean_probabilities([a, b], [3, 1]), [[0.5, 0.5], [0.25, 0.75]])
    assert np.allclose(mean_probabilities([a]), a)
    with pytest.raises(UserError):
        mean_probabilities([a, b], [1])
    with pytest.raises(UserError):
        mean_probabilities([a, b[:1]])


def test_frames_align_by_image_id():
    f1 = pd.DataFrame({"image": ["x", "y"], **{c: [1.0, 0.0] if c == "MEL" else [0.0, 1.0 if c == "NV" else 0.0] for c in CLASSES}})
    f2 = f1.iloc[::-1].reset_index(drop=True)
    out = ensemble_frames([f1, f2])
    assert out["image"].tolist() == ["x", "y"] and out.loc[0, "MEL"] == 1.0
    with pytest.raises(UserError, match="other images"):
        ensemble_frames([f1, f1.iloc[:1]])


def test_error_analysis_shared_and_rescued():
    y = np.array([0, 0, 0, 0, 1, 1])
    def probs(pred):
        p = np.full((6, 7), 0.01)
        p[np.arange(6), pred] = 0.94
        return p
    members = {
        "best": probs(np.array([1, 1, 0, 0, 1, 1])),   # misses MEL images 0 and 1
        "m2": probs(np.array([0, 1, 0, 0, 1, 1])),     # rescues image 0
        "m3": probs(np.array([1, 1, 0, 1, 1, 1])),     # rescues nothing
    }
    res = analyse_errors(list("abcdef"), y, members, best="best", cls="MEL")
    s = res["summary"]
    assert s["errors_of_best"] == 2 and s["errors_made_by_all"] == 1 and s["rescued_by_at_least_one"] == 1
    assert s["share_made_by_all"] == 0.5 and s["rescued_by_m2"] == 1 and s["rescued_by_m3"] == 0
    assert res["images"]["rescued_by"].tolist() == ["m2", ""]
    assert res["confusions"].iloc[0].tolist() == ["MEL->NV", 2]
    ag = res["agreement"].set_index(["model_a", "model_b"])
    assert ag.loc[("best", "m2"), "agreement"] == pytest.approx(5 / 6)
