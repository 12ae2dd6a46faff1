"""Multi-reader multi-case (MRMC) analysis of reader AUCs: Obuchowski-Rockette with Hillis degrees of freedom.

Written by hand because no maintained Python MRMC library exists (the established implementations are R packages:
RJafroc, MRMCaov, and the Iowa OR-DBM MRMC program; iMRMC is Java). It follows their definitions exactly:

- the figure of merit per reader and modality is the empirical (trapezoidal, Mann-Whitney) AUC;
- the error variance `Var` and the covariances `Cov1` (same reader, different modalities), `Cov2` (same modality,
  different readers) and `Cov3` (different both) are averages of the jackknife-over-cases covariance matrix of
  the reader-modality AUCs;
- the random-reader random-case ("RRRC") test of equal modality AUCs uses the Hillis (2007) denominator
  `MS(T*R) + J * max(Cov2 - Cov3, 0)` and denominator degrees of freedom
  `ddf = den^2 / (MS(T*R)^2 / ((I-1)(J-1)))`, for I modalities and J readers.

tests/test_mrmc.py reproduces the published Van Dyke analysis (RJafroc `dataset02`, MRMCaov `VanDyke`) to the
digits printed in those packages' documentation, and checks the fast jackknife against a brute-force one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lesionlab.evaluation.metrics import rank_auc


def empirical_auc(truth: np.ndarray, rating: np.ndarray) -> float:
    """Trapezoidal ROC AUC of `rating` for the 0/1 `truth` (ties count one half); NaN without both classes."""
    return rank_auc(np.asarray(truth).astype(bool), rating)


def _placements(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-case sums of the Mann-Whitney kernel: for each negative, sum over positives of psi(neg, pos), and for
    each positive, sum over negatives (psi = 1 if pos > neg, 1/2 if tied, 0 otherwise).

    Computed with sorted searches instead of the negatives x positives kernel matrix, so a study with thousands of
    cases per reader stays small in memory.
    """
    pos_sorted = np.sort(pos)
    neg_sorted = np.sort(neg)
    above = len(pos) - np.searchsorted(pos_sorted, neg, side="right")
    tied = np.searchsorted(pos_sorted, neg, side="right") - np.searchsorted(pos_sorted, neg, side="left")
    neg_sums = above + 0.5 * tied
    below = np.searchsorted(neg_sorted, pos, side="left")
    tied = np.searchsorted(neg_sorted, pos, side="right") - below
    pos_sums = below + 0.5 * tied
    return neg_sums.astype(float), pos_sums.astype(float)


def auc_and_jackknife(truth: np.ndarray, rating: np.ndarray) -> tuple[float, np.ndarray]:
    """Empirical AUC and its K leave-one-case-out values (the jackknife over cases), in case order.

    Deleting a negative removes its row of the kernel and one from the negatives' count (likewise for a
    positive), so every leave-one-out AUC follows from the per-case kernel sums in O(K log K).

    Raises:
        ValueError: when there are fewer than two positives or two negatives (a leave-one-out AUC would be
            undefined) or the ratings are not finite.
    """
    truth = np.asarray(truth).astype(bool)
    rating = np.asarray(rating, float)
    if not np.isfinite(rating).all():
        raise ValueError("ratings contain NaN or infinite values")
    m, n = int((~truth).sum()), int(truth.sum())
    if m < 2 or n < 2:
        raise ValueError(f"the jackknife AUC needs at least two positive and two negative cases (got {n} and {m})")
    neg_sums, pos_sums = _placements(rating[~truth], rating[truth])
    total = neg_sums.sum()
    jk = np.empty(len(truth))
    jk[~truth] = (total - neg_sums) / ((m - 1) * n)
    jk[truth] = (total - pos_sums) / (m * (n - 1))
    return float(total / (m * n)), jk


def auc_matrix(truth: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (I x J) and jackknife AUCs (I x J x K) for ratings shaped modalities x readers x cases."""
    ratings = np.asarray(ratings, float)
    n_mod, n_rdr, n_case = ratings.shape
    auc = np.empty((n_mod, n_rdr))
    jk = np.empty((n_mod, n_rdr, n_case))
    for i in range(n_mod):
        for j in range(n_rdr):
            auc[i, j], jk[i, j] = auc_and_jackknife(truth, ratings[i, j])
    return auc, jk


def or_covariances(jk: np.ndarray) -> dict[str, float]:
    """Obuchowski-Rockette error variance and covariances from jackknife figures of merit (I x J x K).

    The covariance matrix of the I*J reader-modality AUCs is the jackknife one, (K-1)/K * sum over cases of the
    outer product of deviations (RJafroc and MRMCaov scale the sample covariance by (K-1)^2/K, the same thing).
    Var averages its diagonal; Cov1 the pairs with the same reader and different modalities; Cov2 the same
    modality and different readers; Cov3 different both. With one modality Cov1 and Cov3 are NaN; with one reader
    Cov2 and Cov3 are NaN.
    """
    n_mod, n_rdr, n_case = jk.shape
    flat = jk.reshape(n_mod * n_rdr, n_case)
    dev = flat - flat.mean(axis=1, keepdims=True)
    cov = dev @ dev.T * (n_case - 1) / n_case
    mod = np.repeat(np.arange(n_mod), n_rdr)
    rdr = np.tile(np.arange(n_rdr), n_mod)
    same_m = mod[:, None] == mod[None, :]
    same_r = rdr[:, None] == rdr[None, :]

    def avg(mask: np.ndarray) -> float:
        return float(cov[mask].mean()) if mask.any() else float("nan")

    return {
        "var": avg(same_m & same_r),
        "cov1": avg(~same_m & same_r),
        "cov2": avg(same_m & ~same_r),
        "cov3": avg(~same_m & ~same_r),
    }


@dataclass
class ModalityCI:
    """A single modality's reader-averaged AUC with its RRRC confidence interval (that modality's data only)."""

    modality: str
    auc: float
    ms_r: float
    var: float
    cov2: float
    stderr: float
    df: float
    ci_lower: float
    ci_upper: float


@dataclass
class Difference:
    """One pairwise difference of reader-averaged AUCs (first minus second) under RRRC."""

    first: str
    second: str
    estimate: float
    stderr: float
    df: float
    t: float
    p_value: float
    ci_lower: float
    ci_upper: float


@dataclass
class ORResult:
    """The Obuchowski-Rockette RRRC analysis of I modalities x J readers x K cases."""

    modalities: list[str]
    readers: list[str]
    n_cases: int
    n_positive: int
    auc: np.ndarray  # modalities x readers
    modality_auc: dict[str, float]
    var: float
    cov1: float
    cov2: float
    cov3: float
    var_r: float
    var_tr: float
    ms_t: float
    ms_r: float
    ms_tr: float
    denominator: float
    f: float
    df1: int
    ddf: float
    p_value: float
    alpha: float
    differences: list[Difference] = field(default_factory=list)
    single: list[ModalityCI] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (AUCs as reader -> value per modality)."""
        d = asdict(self)
        d["auc"] = {m: {r: float(self.auc[i, j]) for j, r in enumerate(self.readers)}
                    for i, m in enumerate(self.modalities)}
        return d


def _t_p_ci(est: float, se: float, df: float, alpha: float) -> tuple[float, float, float, float]:
    """t statistic, two-sided p and CI for an estimate with standard error `se` on `df` degrees of freedom."""
    if se == 0:
        return float("nan"), float("nan"), est, est
    t = est / se
    q = float(stats.t.ppf(1 - alpha / 2, df))
    return float(t), float(2 * stats.t.sf(abs(t), df)), est - q * se, est + q * se


def single_modality_ci(auc_row: np.ndarray, jk_row: np.ndarray, modality: str, alpha: float = 0.05) -> ModalityCI:
    """RRRC confidence interval of one modality's reader-averaged AUC (Hillis 2007, single-test analysis).

    stderr^2 = MS(R)/J + max(Cov2, 0), df = (MS(R) + J max(Cov2, 0))^2 / (MS(R)^2 / (J-1)), with Var and Cov2
    from that modality's jackknife covariances alone.
    """
    n_rdr = len(auc_row)
    c = or_covariances(jk_row[None])
    mean = float(auc_row.mean())
    if n_rdr < 2:
        nan = float("nan")
        return ModalityCI(modality, mean, nan, c["var"], nan, nan, nan, nan, nan)
    ms_r = float(((auc_row - mean) ** 2).sum() / (n_rdr - 1))
    cov2 = max(c["cov2"], 0.0)
    se = float(np.sqrt(ms_r / n_rdr + cov2))
    df = (ms_r + n_rdr * cov2) ** 2 / (ms_r ** 2 / (n_rdr - 1)) if ms_r > 0 else float("inf")
    q = float(stats.t.ppf(1 - alpha / 2, df))
    return ModalityCI(modality, mean, ms_r, c["var"], c["cov2"], se, float(df), mean - q * se, mean + q * se)


def or_rrrc(truth: np.ndarray, ratings: np.ndarray, *, modalities: Sequence[str], readers: Sequence[str],
            alpha: float = 0.05) -> ORResult:
    """Obuchowski-Rockette analysis, readers and cases random, with Hillis denominator degrees of freedom.

    Args:
        truth: 0/1 per case (K).
        ratings: modalities x readers x cases (I x J x K), higher = more likely positive; fully crossed.
        modalities: names of the I modalities (differences are first minus second, in this order).
        readers: names of the J readers.
        alpha: 1 - confidence level.

    Raises:
        ValueError: fewer than two readers or two modalities, shape mismatches, or too few positives/negatives.
    """
    ratings = np.asarray(ratings, float)
    if ratings.ndim != 3:
        raise ValueError("ratings must be modalities x readers x cases")
    n_mod, n_rdr, n_case = ratings.shape
    if n_mod < 2 or n_rdr < 2:
        raise ValueError(f"an RRRC analysis needs at least two modalities and two readers (got {n_mod} and {n_rdr})")
    if len(modalities) != n_mod or len(readers) != n_rdr or len(truth) != n_case:
        raise ValueError("names and truth must match the ratings' shape")
    auc, jk = auc_matrix(truth, ratings)
    c = or_covariances(jk)
    mod_mean = auc.mean(axis=1)
    rdr_mean = auc.mean(axis=0)
    grand = auc.mean()
    ms_t = float(n_rdr * ((mod_mean - grand) ** 2).sum() / (n_mod - 1))
    ms_r = float(n_mod * ((rdr_mean - grand) ** 2).sum() / (n_rdr - 1))
    resid = auc - mod_mean[:, None] - rdr_mean[None, :] + grand
    ms_tr = float((resid ** 2).sum() / ((n_mod - 1) * (n_rdr - 1)))
    den = ms_tr + n_rdr * max(c["cov2"] - c["cov3"], 0.0)
    f = ms_t / den if den > 0 else float("nan")
    ddf = den ** 2 / (ms_tr ** 2 / ((n_mod - 1) * (n_rdr - 1))) if ms_tr > 0 else float("inf")
    if not np.isfinite(f):
        p = float("nan")
    elif np.isinf(ddf):  # no reader-by-modality variation: the F test's limit is chi-square (scipy's F gives NaN)
        p = float(stats.chi2.sf(f * (n_mod - 1), n_mod - 1))
    else:
        p = float(stats.f.sf(f, n_mod - 1, ddf))
    # Variance components by the method of moments (Hillis 2008 / MRMCaov "reader" and "treatment:reader").
    var_tr = ms_tr - c["var"] + c["cov1"] + c["cov2"] - c["cov3"]
    var_r = (ms_r - var_tr - c["var"] - (n_mod - 1) * c["cov1"] + c["cov2"] + (n_mod - 1) * c["cov3"]) / n_mod
    se_diff = float(np.sqrt(2 / n_rdr * den))
    diffs = []
    for a, b in combinations(range(n_mod), 2):
        est = float(mod_mean[a] - mod_mean[b])
        t, pv, lo, hi = _t_p_ci(est, se_diff, ddf, alpha)
        diffs.append(Difference(str(modalities[a]), str(modalities[b]), est, se_diff, float(ddf), t, pv, lo, hi))
    single = [single_modality_ci(auc[i], jk[i], str(modalities[i]), alpha) for i in range(n_mod)]
    return ORResult(
        modalities=[str(m) for m in modalities], readers=[str(r) for r in readers], n_cases=n_case,
        n_positive=int(np.asarray(truth).astype(bool).sum()), auc=auc,
        modality_auc={str(m): float(v) for m, v in zip(modalities, mod_mean, strict=True)},
        var=c["var"], cov1=c["cov1"], cov2=c["cov2"], cov3=c["cov3"], var_r=float(var_r), var_tr=float(var_tr),
        ms_t=ms_t, ms_r=ms_r, ms_tr=ms_tr, denominator=float(den), f=float(f), df1=n_mod - 1, ddf=float(ddf),
        p_value=p, alpha=alpha, differences=diffs, single=single,
    )


@dataclass
class CrossedRatings:
    """A long reads table made fully crossed: ratings (I x J x K) over the readers and cases every modality has."""

    truth: np.ndarray
    ratings: np.ndarray
    modalities: list[str]
    readers: list[str]
    cases: list[str]
    dropped_readers: list[str]
    dropped_cases: int


def crossed(long: pd.DataFrame, *, modalities: Sequence[str] | None = None) -> CrossedRatings:
    """Arrange a long table (`reader, modality, case, truth, rating`; truth 0/1) into a fully crossed array.

    A real study is rarely complete (a reader stops halfway), and OR analysis needs every reader to have read every
    case in every modality, so readers missing a whole modality are dropped first, then cases any remaining reader
    did not read in some modality. What was dropped is reported, never hidden.

    Args:
        long: one row per reading; duplicates of (reader, modality, case) are an error.
        modalities: order of the modalities (default: order of first appearance).

    Raises:
        ValueError: duplicate readings, or a case whose truth differs between rows.
    """
    df = long.copy()
    for col in ("reader", "modality", "case"):
        df[col] = df[col].astype(str)
    dup = df.duplicated(["reader", "modality", "case"])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(f"reader {r['reader']} rated case {r['case']} twice in modality {r['modality']}")
    truths = df.groupby("case")["truth"].nunique()
    if (truths > 1).any():
        raise ValueError(f"case {truths[truths > 1].index[0]} has different truth values in different rows")
    mods = [str(m) for m in modalities] if modalities is not None else list(dict.fromkeys(df["modality"]))
    df = df[df["modality"].isin(mods)]
    has = df.groupby("reader")["modality"].nunique()
    readers_all = list(dict.fromkeys(df["reader"]))
    readers = [r for r in readers_all if has.get(r, 0) == len(mods)]
    df = df[df["reader"].isin(readers)]
    per_case = df.groupby("case").size()
    need = len(readers) * len(mods)
    cases = [c for c in dict.fromkeys(df["case"]) if per_case.get(c, 0) == need]
    n_cases_all = df["case"].nunique()
    df = df[df["case"].isin(cases)]
    pivot = df.pivot_table(index=["modality", "reader"], columns="case", values="rating", aggfunc="first")
    ratings = np.empty((len(mods), len(readers), len(cases)))
    for i, m in enumerate(mods):
        for j, r in enumerate(readers):
            ratings[i, j] = pivot.loc[(m, r), cases].to_numpy(float)
    truth = df.drop_duplicates("case").set_index("case").loc[cases, "truth"].to_numpy(int)
    return CrossedRatings(truth, ratings, mods, readers, cases,
                          dropped_readers=[r for r in readers_all if r not in readers],
                          dropped_cases=n_cases_all - len(cases))
