"""Simulated readers, for the demo's reader-study section and the tests: reads with set skill and AI reliance.

Every reader's malignancy impression of a case is a latent score: `skill * malignant + case difficulty + noise`
(the binormal model of signal-detection theory, `skill` being d'). The case term is shared by all readers and both
phases, so reads of the same case correlate as real ones do (what the MRMC analysis has to account for). Aided, a
reader blends their own (fresh) impression with the AI's malignant probability on the same scale, with weight
`follow_ai`, and adopts the AI's shown class as their diagnosis with probability `follow_ai`: a good AI lifts
weak readers most and a wrong AI misleads (Tschandl et al. 2020). Ratings are the latent cut at five thresholds
(a 1-6 scale), management follows the rating, and the time per case is log-normal. Nothing here is a real
reader: reports made from these reads must say SIMULATED (`run_analysis(..., simulated=True)`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, MALIGNANT
from lesionlab.workflows.reader_study.schema import CASE_COLUMNS, LEVELS, READ_COLUMNS

# Default reader per level: skill (d') and reliance on the AI, falling with experience as in Tschandl et al.;
# median seconds per unaided case; years of experience.
LEVEL_DEFAULTS: dict[str, dict[str, float]] = {
    "resident": {"skill": 1.0, "follow_ai": 0.6, "seconds": 22.0, "years": 2.0},
    "board-certified": {"skill": 1.6, "follow_ai": 0.45, "seconds": 18.0, "years": 8.0},
    "expert": {"skill": 2.2, "follow_ai": 0.3, "seconds": 15.0, "years": 18.0},
}
RATING_SCALE = 6
# Cut points on the latent, relative to the midpoint skill/2 between benign and malignant means: five cuts make
# six rating levels; rating >= 4 is "malignant" (diagnosis and excision).
CUTS = np.array([-1.3, -0.6, 0.0, 0.6, 1.3])
CALL_RATING = 4
AIDED_EXTRA_SECONDS = 6.0  # reading the AI's panel
READ_CONSISTENCY = 0.6  # share of a reader's per-case noise that persists from one reading of a case to the next
KEEP_ANSWER = 0.8  # chance a reader keeps the unaided diagnosis (when it fits the aided impression) before the AI


def default_readers(n: int) -> list[dict[str, Any]]:
    """`n` readers cycling through the levels (resident, board-certified, expert) with their default settings."""
    if n < 1:
        raise UserError(f"simulate at least one reader (got {n})")
    out = []
    for i in range(n):
        level = LEVELS[i % len(LEVELS)]
        out.append({"reader": f"sim-{i + 1:02d}", "level": level, **LEVEL_DEFAULTS[level]})
    return out


def _reader_spec(r: dict[str, Any], i: int) -> dict[str, Any]:
    level = r.get("level", LEVELS[i % len(LEVELS)])
    base = LEVEL_DEFAULTS.get(level, LEVEL_DEFAULTS["board-certified"])
    spec = {"reader": str(r.get("reader", f"sim-{i + 1:02d}")), "level": level, **base, **r}
    spec["level"] = level
    if not 0 <= float(spec["follow_ai"]) <= 1:
        raise UserError(f"reader {spec['reader']}: follow_ai {spec['follow_ai']} must lie in 0..1")
    return spec


def _check_cases(cases: pd.DataFrame, classes: Sequence[str]) -> None:
    missing = [c for c in CASE_COLUMNS if c not in cases.columns]
    if missing:
        raise UserError(f"the cases table lacks column(s) {', '.join(missing)}; expected {', '.join(CASE_COLUMNS)}")
    bad = sorted(set(cases["truth"]) - set(classes))
    if bad:
        raise UserError(f"case truth {bad[0]!r} is not a class of the label set ({', '.join(classes)})")
    if cases["case"].duplicated().any():
        raise UserError(f"case {cases['case'][cases['case'].duplicated()].iloc[0]!r} appears twice in the cases table")


def _ai_latent(p: np.ndarray, skill: float) -> np.ndarray:
    """The AI's malignant probability on the reader's latent scale: probit, centred on the reader's midpoint."""
    return stats.norm.ppf(np.clip(p, 0.005, 0.995)) + skill / 2


def _diagnose(rng: np.random.Generator, truth: np.ndarray, says_malignant: np.ndarray, skill: float,
              classes: Sequence[str], malignant: frozenset[str], prevalence: dict[str, float]) -> np.ndarray:
    """A class consistent with the malignancy call: the true class when the call agrees with the truth and the
    reader recognises it (more often the more skilled), otherwise a class of the called kind by prevalence."""
    p_right = float(np.clip(0.45 + 0.15 * skill, 0.3, 0.95))
    mal_cls = [c for c in classes if c in malignant]
    ben_cls = [c for c in classes if c not in malignant]
    out = np.empty(len(truth), dtype=object)
    for k, (t, call) in enumerate(zip(truth, says_malignant, strict=True)):
        agrees = (t in malignant) == bool(call)
        if agrees and rng.random() < p_right:
            out[k] = t
            continue
        pool = [c for c in (mal_cls if call else ben_cls) if c != t] or (mal_cls if call else ben_cls)
        w = np.array([prevalence.get(c, 0.0) + 0.02 for c in pool])
        out[k] = pool[rng.choice(len(pool), p=w / w.sum())]
    return out


def _management(rating: np.ndarray) -> np.ndarray:
    return np.where(rating >= CALL_RATING, "excise", np.where(rating >= 2, "follow-up", "reassure"))


def simulate_reads(cases: pd.DataFrame, *, readers: list[dict[str, Any]] | int, seed: int,
                   classes: Sequence[str] = CLASSES, malignant: Collection[str] = MALIGNANT,
                   crossover: bool = False) -> pd.DataFrame:
    """Simulated reads of `cases` (CASE_COLUMNS) in both modalities, as the reads table (READ_COLUMNS).

    Args:
        cases: the cases table: truth and the AI's answer per case.
        readers: reader specs (dicts with any of reader, level, years, skill (d'), follow_ai (0..1), seconds
            (median per unaided case)); missing fields take the level's defaults (LEVEL_DEFAULTS). Or a count:
            that many readers cycling through the levels.
        seed: everything random derives from it (same inputs, same reads).
        classes: the label set's classes (diagnoses are drawn from them).
        malignant: the malignant classes.
        crossover: half the readers read aided first (phase 1) instead of unaided first.
    """
    _check_cases(cases, classes)
    specs = default_readers(readers) if isinstance(readers, int) else [_reader_spec(r, i) for i, r in enumerate(readers)]
    mal = frozenset(malignant)
    rng = np.random.default_rng(seed)
    n = len(cases)
    truth = cases["truth"].astype(str).to_numpy()
    y = np.array([t in mal for t in truth], float)
    prevalence = (cases["truth"].value_counts(normalize=True)).to_dict()
    case_effect = rng.normal(0, 0.5, n)  # some lesions look worse than others, to every reader
    ai_p = pd.to_numeric(cases["ai_malignant_prob"], errors="coerce").to_numpy(float)
    ai_top = cases["ai_top"].fillna("").astype(str).to_numpy()
    has_ai = np.isfinite(ai_p)
    rows = []
    for i, s in enumerate(specs):
        skill, follow = float(s["skill"]), float(s["follow_ai"])
        # reader x case noise: a lasting impression (shared by both phases) plus a fresh part per reading; with
        # the case term the latent has unit variance within each class
        lasting = rng.normal(0, np.sqrt(0.75 * READ_CONSISTENCY), n)
        aided_first = crossover and i % 2 == 1
        dx_unaided = None
        for modality in ("unaided", "aided"):
            own = skill * y + case_effect + lasting + rng.normal(0, np.sqrt(0.75 * (1 - READ_CONSISTENCY)), n)
            latent = own
            if modality == "aided":
                latent = np.where(has_ai, (1 - follow) * own + follow * _ai_latent(np.nan_to_num(ai_p, nan=0.5), skill),
                                  own)
            rating = 1 + np.searchsorted(skill / 2 + CUTS, latent)
            call = rating >= CALL_RATING
            dx = _diagnose(rng, truth, call, skill, classes, mal, prevalence)
            if modality == "unaided":
                dx_unaided = dx
            else:
                # a reader mostly keeps their first answer when it still fits their malignancy call
                fits = np.array([(d in mal) == c for d, c in zip(dx_unaided, call, strict=True)])
                dx = np.where(fits & (rng.random(n) < KEEP_ANSWER), dx_unaided, dx)
                follows = has_ai & (ai_top != "") & (rng.random(n) < follow)
                dx = np.where(follows, ai_top, dx)
            median = float(s["seconds"]) + (AIDED_EXTRA_SECONDS if modality == "aided" else 0.0)
            seconds = np.round(np.exp(rng.normal(np.log(median), 0.45, n)), 1)
            phase = (1 if modality == "unaided" else 2) if not aided_first else (2 if modality == "unaided" else 1)
            rows.append(pd.DataFrame({
                "reader": s["reader"], "reader_level": s["level"], "reader_years": float(s["years"]),
                "modality": modality, "phase": phase, "case": cases["case"].astype(str).to_numpy(), "truth": truth,
                "diagnosis": dx, "rating": rating.astype(int), "management": _management(rating),
                "seconds": seconds, "ai_top": ai_top, "ai_mel_prob": pd.to_numeric(cases["ai_mel_prob"], errors="coerce"),
                "ai_malignant_prob": ai_p, "ai_melanoma_flag": cases["ai_melanoma_flag"].astype(bool).to_numpy(),
            }))
    out = pd.concat(rows, ignore_index=True)[list(READ_COLUMNS)]
    return out.sort_values(["reader", "phase", "case"], kind="stable").reset_index(drop=True)


def ai_cases_from_study(study: str | Path, *, models: Sequence[str] | None = None, n: int | None = None,
                     seed: int = 0, at_most: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The cases table (CASE_COLUMNS) of a study folder's test split, the AI being the study's calibrated ensemble.

    The ensemble's test probabilities are the mean of the members' and scaled by the ensemble temperature in
    trust.json, exactly as a bundle of these models answers (`clinic.screening.ensemble_probabilities`). No image is
    refused here (quality and OOD checks need the images): every case has an AI answer. The melanoma flag uses the
    threshold the study's ensemble evaluation chose on validation (eval/ensemble/metrics.json), or 0.5 when the
    study recorded none (the returned info says which).

    Args:
        study: the study folder.
        models: members (default: every trained model of the study).
        n: a lesion-unique sample of this many cases stratified by class (default: the whole test split).
        seed: sampling seed.
        at_most: take every lesion when the test split has fewer than `n` (else that is an error).

    Returns:
        (cases, info) where info names the models, the threshold and where it came from.
    """
    from lesionlab.clinic.screening import ensemble_probabilities, melanoma_flags
    from lesionlab.evaluation.ensemble import ENSEMBLE
    from lesionlab.study_folder import StudyFolder

    sf = StudyFolder(study)
    members = list(models) if models else sf.trained_models()
    if not members:
        raise UserError(f"{sf.root}: no trained models; run `lesionlab study` first")
    y, raw, ids = sf.probabilities(members, "test")
    probs = ensemble_probabilities(raw, sf.trust())
    threshold, source = 0.5, "default 0.5 (the study recorded no melanoma threshold)"
    m = sf.metrics(ENSEMBLE)
    at = ((m or {}).get("operating_points", {}).get("MEL", {}) or {}).get("at_threshold")
    if at and at.get("threshold") is not None:
        threshold, source = float(at["threshold"]), f"{sf.metrics_file(ENSEMBLE)} ({m['operating_points']['MEL'].get('threshold_source', 'given')})"
    lset = sf.label_set()  # the study's classes: the reader study speaks the label set the models were trained for
    classes = list(lset.classes)
    if "MEL" not in classes:
        raise UserError(f"{sf.root}: label set {lset.name!r} has no melanoma class; the reader-study analysis "
                        "(melanoma and malignancy tasks) needs one")
    mal_idx = [classes.index(c) for c in classes if c in lset.malignant]
    cases = pd.DataFrame({
        "case": [str(i) for i in ids], "image_id": [str(i) for i in ids], "truth": [classes[int(k)] for k in y],
        "ai_top": [classes[int(k)] for k in probs.argmax(axis=1)], "ai_mel_prob": probs[:, classes.index("MEL")],
        "ai_malignant_prob": probs[:, mal_idx].sum(axis=1), "ai_melanoma_flag": melanoma_flags(probs, threshold),
    })[list(CASE_COLUMNS)]
    if n is not None:
        from lesionlab.workflows.reader_study.create import sample_cases

        frame = pd.DataFrame({"image_id": cases["image_id"], "label": cases["truth"], "path": ""})
        lesion_of = sf.lesion_of()
        if at_most:
            n = min(n, len({lesion_of.get(i, i) for i in cases["image_id"]}))
        picked = sample_cases(frame, n, seed, lesion_of, classes=classes)
        cases = cases.set_index("image_id", drop=False).loc[picked["image_id"]].reset_index(drop=True)
    info = {"study": str(sf.root), "models": members, "melanoma_threshold": threshold, "threshold_source": source,
            "cases": len(cases)}
    return cases, info
