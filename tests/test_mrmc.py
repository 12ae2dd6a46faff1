"""The hand-written Obuchowski-Rockette MRMC analysis: the published Van Dyke figures to the printed digits, a
brute-force jackknife, and small cases worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lesionlab.evaluation.mrmc import (
    auc_and_jackknife,
    auc_matrix,
    crossed,
    empirical_auc,
    or_covariances,
    or_rrrc,
)

VANDYKE = Path(__file__).parent / "data" / "vandyke_mrmc.csv"


def assert_printed(value: float, printed: str) -> None:
    """`value` shows as `printed` at the printed number of decimals (R prints 7 significant digits)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(value - float(printed)) <= 0.5 * 10 ** -decimals + 1e-15, f"{value!r} does not print as {printed}"


@pytest.fixture(scope="module")
def vandyke():
    c = crossed(pd.read_csv(VANDYKE))
    return c, or_rrrc(c.truth, c.ratings, modalities=c.modalities, readers=c.readers)


def test_vandyke_data_shape(vandyke):
    c, _ = vandyke
    assert c.ratings.shape == (2, 5, 114) and int(c.truth.sum()) == 45 and not c.dropped_readers and not c.dropped_cases


def test_vandyke_reader_aucs_match_rjafroc(vandyke):
    # RJafroc StSignificanceTesting(dataset02, FOM = "Wilcoxon", method = "OR")$FOMs
    _, r = vandyke
    published = [["0.91964573", "0.85877617", "0.90386473", "0.97310789", "0.82979066"],
                 ["0.94782609", "0.90531401", "0.92173913", "0.99935588", "0.92995169"]]
    for i in range(2):
        for j in range(5):
            assert_printed(r.auc[i, j], published[i][j])
    assert_printed(r.modality_auc["1"], "0.89703704")
    assert_printed(r.modality_auc["2"], "0.94083736")
    assert_printed(r.differences[0].estimate, "-0.043800322")


def test_vandyke_or_rrrc_matches_mrmcaov(vandyke):
    # MRMCaov README: summary(mrmc(empirical_auc(truth, rating), treatment, reader, case, data = VanDyke))
    _, r = vandyke
    assert_printed(r.var_r, "0.0015349993")
    assert_printed(r.var_tr, "0.0002004025")
    assert_printed(r.var, "0.0008022883")
    assert_printed(r.cov1, "0.0003466137")
    assert_printed(r.cov2, "0.0003440748")
    assert_printed(r.cov3, "0.0002390284")
    assert_printed(r.ms_t, "0.004796171")
    assert_printed(r.ms_tr, "0.0005510306")
    assert_printed(r.denominator, "0.001076263")
    assert_printed(r.f, "4.456319")
    assert r.df1 == 1
    assert_printed(r.ddf, "15.25967")
    assert_printed(r.p_value, "0.05166569")
    d = r.differences[0]
    assert (d.first, d.second) == ("1", "2")
    assert_printed(d.estimate, "-0.04380032")
    assert_printed(d.stderr, "0.02074862")
    assert_printed(d.df, "15.25967")
    assert_printed(d.ci_lower, "-0.0879594986")
    assert_printed(d.ci_upper, "0.0003588544")
    assert_printed(d.t, "-2.110999")
    assert_printed(d.p_value, "0.05166569")
    s1, s2 = r.single
    for s, row in ((s1, ("0.8970370", "0.003082629", "0.0004839618", "0.03317360", "12.74465", "0.8252236", "0.9688505")),
                   (s2, ("0.9408374", "0.001304602", "0.0002041879", "0.02156637", "12.71019", "0.8941378", "0.9875369"))):
        for value, printed in zip((s.auc, s.ms_r, s.cov2, s.stderr, s.df, s.ci_lower, s.ci_upper), row, strict=True):
            assert_printed(value, printed)
    # RJafroc $ANOVA$IndividualTrt varEachTrt
    assert_printed(s1.var, "0.00101410277")
    assert_printed(s2.var, "0.00059047376")


def test_vandyke_from_rjafroc_printout_more_digits(vandyke):
    # RJafroc prints VarCom and the RRRC F test with more digits than MRMCaov
    _, r = vandyke
    assert_printed(r.cov1, "0.00034661371")
    assert_printed(r.cov2, "0.00034407483")
    assert_printed(r.cov3, "0.00023902837")
    assert_printed(r.var, "0.00080228827")
    assert_printed(r.f, "4.4563187")
    assert_printed(r.p_value, "0.051665686")
    assert_printed(r.ddf, "15.259675")
    assert_printed(r.differences[0].ci_lower, "-0.087959499")
    assert_printed(r.differences[0].ci_upper, "0.00035885444")


def test_auc_and_jackknife_by_hand():
    # negatives 1, 2; positives 2, 3: kernel (1,2)=1 (1,3)=1 (2,2)=1/2 (2,3)=1 -> AUC 3.5/4
    truth = np.array([0, 0, 1, 1])
    rating = np.array([1.0, 2.0, 2.0, 3.0])
    auc, jk = auc_and_jackknife(truth, rating)
    assert auc == pytest.approx(0.875) == pytest.approx(roc_auc_score(truth, rating))
    # drop neg 1 -> (0.5 + 1)/2; drop neg 2 -> (1 + 1)/2; drop pos 2 -> (1 + 1)/2; drop pos 3 -> (1 + 0.5)/2
    assert jk.tolist() == pytest.approx([0.75, 1.0, 1.0, 0.75])
    assert empirical_auc(truth, rating) == pytest.approx(0.875)


def test_fast_jackknife_equals_brute_force():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 60)
    rating = rng.integers(1, 6, 60).astype(float) + truth  # many ties on purpose
    _, jk = auc_and_jackknife(truth, rating)
    keep = np.ones(60, bool)
    for k in range(60):
        keep[:] = True
        keep[k] = False
        assert jk[k] == pytest.approx(roc_auc_score(truth[keep], rating[keep]), abs=1e-12)


def test_or_covariances_against_numpy_cov():
    rng = np.random.default_rng(4)
    jk = rng.normal(size=(2, 3, 40))
    c = or_covariances(jk)
    k = 40
    full = np.cov(jk.reshape(6, k)) * (k - 1) ** 2 / k  # RJafroc's scaling of the sample covariance
    idx = [(i, j) for i in range(2) for j in range(3)]
    pick = {"var": [], "cov1": [], "cov2": [], "cov3": []}
    for a, (i, j) in enumerate(idx):
        for b, (i2, j2) in enumerate(idx):
            key = {(True, True): "var", (False, True): "cov1", (True, False): "cov2", (False, False): "cov3"}[(i == i2, j == j2)]
            pick[key].append(full[a, b])
    for key, vals in pick.items():
        assert c[key] == pytest.approx(np.mean(vals))


def test_modality_order_flips_sign_only(vandyke):
    c, r = vandyke
    back = or_rrrc(c.truth, c.ratings[::-1], modalities=c.modalities[::-1], readers=c.readers)
    assert back.differences[0].estimate == pytest.approx(-r.differences[0].estimate)
    assert back.p_value == pytest.approx(r.p_value)
    assert back.differences[0].ci_lower == pytest.approx(-r.differences[0].ci_upper)


def test_identical_modalities_give_zero_difference():
    rng = np.random.default_rng(5)
    truth = np.r_[np.zeros(20, int), np.ones(15, int)]
    one = rng.normal(size=(4, 35)) + truth
    r = or_rrrc(truth, np.stack([one, one]), modalities=["a", "b"], readers=list("wxyz"))
    assert r.differences[0].estimate == 0 and r.ms_t == 0
    assert np.allclose(r.auc, auc_matrix(truth, one[None])[0][0])


def test_crossed_drops_incomplete_readers_and_cases_and_refuses_duplicates():
    rows = []
    for reader in ("a", "b", "c"):
        for mod in ("unaided", "aided"):
            if reader == "c" and mod == "aided":
                continue  # c never did the aided phase
            for case in range(6):
                if reader == "b" and mod == "aided" and case == 5:
                    continue  # b stopped one case early
                rows.append((reader, mod, f"k{case}", case % 2, case))
    df = pd.DataFrame(rows, columns=["reader", "modality", "case", "truth", "rating"])
    c = crossed(df, modalities=["unaided", "aided"])
    assert c.readers == ["a", "b"] and c.dropped_readers == ["c"]
    assert c.cases == [f"k{i}" for i in range(5)] and c.dropped_cases == 1
    assert c.ratings.shape == (2, 2, 5)
    with pytest.raises(ValueError, match="twice"):
        crossed(pd.concat([df, df.iloc[:1]]))


def test_too_few_readers_or_cases_refused():
    truth = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="two readers"):
        or_rrrc(truth, np.zeros((2, 1, 4)), modalities=["a", "b"], readers=["r"])
    with pytest.raises(ValueError, match="two positive"):
        auc_and_jackknife(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0]))


def test_no_reader_by_modality_variation_uses_the_chi_square_limit():
    # every reader gains exactly the same AUC: MS(T*R) = 0, ddf infinite, F's limit is chi-square on df1
    truth = np.array([0, 0, 0, 1, 1, 1])
    base = np.array([[1, 2, 3, 2, 3, 4], [1, 3, 2, 2, 4, 3]], float)
    better = base + np.array([0, 0, 0, 2, 2, 2])
    r = or_rrrc(truth, np.stack([better, base]), modalities=["b", "a"], readers=["x", "y"])
    assert r.ms_tr == pytest.approx(0, abs=1e-15) and np.isinf(r.ddf)
    assert 0 <= r.p_value <= 1 and r.differences[0].estimate > 0
