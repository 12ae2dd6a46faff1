"""The one screening pipeline: decoded images in, one answer per image out.

    decode (lesionlab.data.images, by the caller) -> quality checks -> the models, only for images that pass
    -> OOD score -> calibration -> conformal differential -> error score -> the answer

`Screener.screen` is what `lesionlab predict`, the service, the study's refusal report, benchmarks/bench_ood.py and
the real-data acceptance test run, so a published refusal rate is measured through the code a clinic runs. Every
decision lives in one function here: `refusal` (quality, then OOD, then the error score), `answer` (the JSON shape of a result) and
`explained_class` (the class a heatmap explains: the one the answer shows).

An image that fails a quality check costs no forward pass. `research=True` runs the models on refused images too
(their would-be result goes under `research`, never as a diagnosis); measurements of OOD scores on refused sets
use it, and the decisions are the same either way.

The error score (a bundle's `error_refusal`, lesionlab.clinic.trust.fit_error_refusal) is the estimated chance that
the answer is wrong, from the OOD score, the calibrated confidence and the conformal set size
(lesionlab.evaluation.selective.RefusalScore). The OOD gate alone refuses strangers, not likely errors: on another
clinic's dermoscopy it accepted images less accurate than those it refused (docs/cross-site-ham10000.md). An image
whose error score is above the bundle's limit is refused like any other (`likely_wrong`: no diagnosis, the
would-be result only under `research`), because an answer the models are likely to get wrong is not one to show a
clinician as decision support. Bundles made without it refuse exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from lesionlab import __version__
from lesionlab.clinic.ood_model import OODModel
from lesionlab.config import QualityConfig
from lesionlab.data.quality import ADVICE, check_quality
from lesionlab.evaluation.calibration import calibrate_probs
from lesionlab.evaluation.conformal import ConformalSets
from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
from lesionlab.evaluation.selective import RefusalScore, refusal_signals
from lesionlab.inference.outputs import image_outputs
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASS_INDEX, HAM7
from lesionlab.models.registry import file_stem

DISCLAIMER = "Decision support, not a diagnosis. A clinician must examine the lesion; histopathology decides."
RESEARCH_NOTE = ("Research use only: the models' output for an image they refused as unevaluable. Not a diagnosis "
                 "and not fit to support one.")
OOD_CODE = "out_of_distribution"
ERROR_CODE = "likely_wrong"
# the advice of the quality and OOD codes lives with the quality checks (lesionlab.data.quality.ADVICE); this one
# belongs to the error score, which only the pipeline knows
ERROR_ADVICE = ("Examine the lesion without this tool: its models are often wrong on images like this one. Retaking "
                "the image (in focus, the whole lesion in frame) may help; treat any answer for this lesion with "
                "caution.")
_ADVICE = {**ADVICE, ERROR_CODE: ERROR_ADVICE}


def refusal(quality_codes: list[tuple[str, str]], ood_score: float | None, ood_threshold: float | None,
            error_score: float | None = None, error_threshold: float | None = None) -> list[tuple[str, str]]:
    """Why an image is refused (code, reason) pairs; empty when it is evaluable.

    Quality first: an image that fails a check is refused for that alone (its OOD score is not consulted, and
    without `research` not even computed). Otherwise an OOD score above its threshold refuses it, and otherwise an
    error score (estimated chance of a wrong answer) above its threshold: the first gate that refuses names the
    reason, so each refusal has one kind of cause.
    """
    if quality_codes:
        return list(quality_codes)
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        return [(OOD_CODE, "The image does not look like the dermoscopy images the models were trained on "
                 f"(unusualness score {ood_score:.2f}, limit {ood_threshold:.2f}).")]
    if error_score is not None and error_threshold is not None and error_score > error_threshold:
        return [(ERROR_CODE, "The models are unsure about this image: their answer is likely to be wrong "
                 f"(estimated chance of a wrong answer {error_score:.0%}, limit {error_threshold:.0%}).")]
    return []


def ensemble_probabilities(raw: dict[str, np.ndarray], trust: dict[str, Any] | None) -> np.ndarray:
    """The calibrated ensemble: the mean of the members' raw probabilities, scaled by the ensemble's temperature
    (none without trust). What answers show and the melanoma threshold is chosen and verified on."""
    t = float(trust["models"][ENSEMBLE]["temperature"]) if trust and ENSEMBLE in trust["models"] else 1.0
    return calibrate_probs(mean_probabilities(list(raw.values())), t)


def melanoma_flags(ensemble: np.ndarray, threshold: float) -> np.ndarray:
    """The melanoma flag of each calibrated ensemble probability row: the label set's flag class (column 0: MEL,
    or MALIGNANT under the binary set; lesionlab.labels) at or above the threshold."""
    return ensemble[:, FLAG_COLUMN] >= threshold


FLAG_COLUMN = CLASS_INDEX["MEL"]  # 0: every label set puts its flag class first (lesionlab.labels.LabelSet)


def explained_class(answer: dict[str, Any]) -> str | None:
    """The class a heatmap of this answer explains: the one the answer shows (None: refused, nothing to explain)."""
    return answer.get("top") if answer.get("status") == "ok" else None


@dataclass
class Screener:
    """The parts the pipeline needs; a bundle (lesionlab.clinic.bundle) or a study's refusal report builds one.

    Args:
        members: loaded models (their `name` keys the trust parameters and the answer's `members`).
        quality: quality thresholds.
        ood: the fitted OOD model, or None (no OOD refusal).
        trust: trust.json-style temperatures and conformal thresholds (`models` keyed by file stem and
            `ensemble`), or None (uncalibrated, no differential).
        threshold: the melanoma threshold on the calibrated ensemble probability, or None (no flag).
        tta: run the members with test-time augmentation (a bundle: the setting its threshold was chosen under).
        identity: fields every answer carries (bundle version, inference settings, ...).
        metadata_info: what the members made of an image's metadata (a bundle's `metadata_info`), or None.
        error: the fitted error score and its threshold (a bundle's `error_refusal`), or None (no `likely_wrong`
            refusal). Its signals must be ones this screener computes: `ood` needs `ood`, `set_size` needs the
            conformal thresholds in `trust`.
    """

    members: list[Predictor]
    quality: QualityConfig
    ood: OODModel | None = None
    trust: dict[str, Any] | None = None
    threshold: float | None = None
    tta: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    metadata_info: Callable[[dict | None], dict[str, Any] | None] | None = None
    error: RefusalScore | None = None

    def __post_init__(self):
        conformal = (self.trust or {}).get("models", {}).get(ENSEMBLE, {}).get("conformal")
        self.sets = ConformalSets.from_dict(conformal) if conformal else None
        if self.error is not None:  # a bundle stores both parts together, so a mismatch is a bug, not a user error
            lacking = {"ood": self.ood is None, "set_size": self.sets is None}
            missing = [s for s in self.error.signals if lacking.get(s)]
            if missing:
                raise ValueError(f"the error score needs signal(s) {', '.join(missing)} that this screener lacks")
        # the classes the members were trained for (load_predictors checks they agree); ham7 without members
        self.label_set = self.members[0].label_set if self.members else HAM7
        self.classes = self.label_set.classes

    # -- the trust parts
    def temperature(self, name: str) -> float:
        if self.trust and name in self.trust["models"]:
            return float(self.trust["models"][name]["temperature"])
        return 1.0

    def calibrated(self, raw: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Calibrated ensemble probabilities (mean of the members' raw probabilities, then the ensemble's
        temperature) and calibrated member probabilities (trust.json keys members by file stem)."""
        ens = ensemble_probabilities(raw, self.trust)
        fitted = self.trust["models"] if self.trust else {}
        members = {n: calibrate_probs(p, self.temperature(file_stem(n))) if file_stem(n) in fitted else p
                   for n, p in raw.items()}
        return ens, members

    def describe(self) -> dict[str, Any]:
        """What /api/health and predict's JSON say about the trust parts."""
        return {
            "calibrated": bool(self.trust and self.trust["config"].get("calibration", True)),
            "ensemble_temperature": self.temperature(ENSEMBLE),
            "differential_coverage": self.sets.coverage if self.sets else None,
            "differential_method": (f"{self.sets.method}{' (per class)' if self.sets.mondrian else ''}"
                                    if self.sets else None),
            "ood_threshold": self.ood.threshold if self.ood else None,
            "error_refusal": ({"signals": list(self.error.signals), "threshold": self.error.to_dict()["threshold"],
                               "validation_refusal_rate": self.error.target_rate} if self.error else None),
            "quality": self.quality.__dict__,
        }

    # -- the pipeline
    def screen(self, images: list[Image.Image], *, metadata: list[dict] | None = None, research: bool = False
               ) -> list[dict[str, Any]]:
        """One answer per image (see `answer`), in order.

        Args:
            metadata: one mapping per image (age, sex, localization) for metadata-fusion members.
            research: also run the models on images refused for quality and add their would-be result.
        """
        return self.screen_outputs(images, metadata=metadata, research=research)[0]

    def screen_outputs(self, images: list[Image.Image], *, metadata: list[dict] | None = None, research: bool = False
                       ) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
        """`screen`, plus the members' raw outputs (probs, logits, features) of the images the models ran on (all
        of them with `research`), for measurements that compare other scores on the same forward passes."""
        if not images:
            return [], {}
        quality = [[(i.code, i.reason) for i in check_quality(im, self.quality)] for im in images]
        run = [k for k, q in enumerate(quality) if research or not q]
        outputs = self._outputs([images[k] for k in run], [metadata[k] for k in run] if metadata else None)
        ood = self.ood.score({n: o["features"] for n, o in outputs.items()}) if self.ood and run else None
        errors = None
        if run:
            ens, members = self.calibrated({n: o["probs"] for n, o in outputs.items()})
            diffs = self.sets.differential(ens) if self.sets is not None else None
            errors = self.error_scores(ens, ood) if self.error is not None else None
        at = {k: j for j, k in enumerate(run)}
        out = []
        for k, im in enumerate(images):
            j = at.get(k)
            score = float(ood[j]) if ood is not None and j is not None else None
            err = float(errors[j]) if errors is not None and j is not None else None
            result = None
            if j is not None:
                result = self.result(ens[j], {n: p[j] for n, p in members.items()},
                                     differential=diffs[j] if diffs is not None else None)
            reasons = refusal(quality[k], score, self.ood.threshold if self.ood else None,
                              err, self.error.threshold if self.error else None)
            out.append(self.answer(im, reasons, result, score, meta=metadata[k] if metadata else None,
                                   research=research, error_score=err))
        return out, outputs

    def error_scores(self, ens: np.ndarray, ood: np.ndarray | None) -> np.ndarray:
        """The estimated chance of a wrong answer per image, from calibrated ensemble probabilities and OOD scores
        (the signals exactly as lesionlab.evaluation.selective.refusal_signals makes them at fit time). A signal
        the score does not use may be absent; `__post_init__` checked the ones it uses are here."""
        sets = self.sets.sets(ens) if self.sets is not None else np.zeros(ens.shape, bool)
        return self.error.score(refusal_signals(ens, sets, ood if ood is not None else np.zeros(len(ens))))

    def warm_up(self) -> None:
        """One forward pass per member on a grey image (it would fail the quality checks, so `screen` would not run
        the models), so one-off work such as TorchScript tracing happens before the first patient."""
        size = self.members[0].spec.input_size
        self._outputs([Image.new("RGB", (size * 3 // 2, size), (128, 128, 128))], None)

    def _outputs(self, images: list[Image.Image], metadata: list[dict] | None) -> dict[str, dict[str, np.ndarray]]:
        if not images:
            return {}
        return {pr.name: image_outputs(pr, images, tta=self.tta, metadata=metadata) for pr in self.members}

    def result(self, probs: np.ndarray, members: dict[str, np.ndarray], *, differential: list[str] | None
               ) -> dict[str, Any]:
        """The diagnosis part of an answer: calibrated probabilities, top class, melanoma flag, members."""
        top = int(np.argmax(probs))
        classes, lset = self.classes, self.label_set
        flag_p = float(probs[FLAG_COLUMN])
        flagged = None if self.threshold is None else bool(melanoma_flags(probs[None], self.threshold)[0])
        is_mel = lset.flag == "MEL"  # melanoma_* fields only where the flag class is melanoma
        member_rows = {n: {"top": classes[int(np.argmax(p))], "probability": float(p.max()),
                           "flag_probability": float(p[FLAG_COLUMN]),
                           "melanoma_probability": float(p[FLAG_COLUMN]) if is_mel else None}
                       for n, p in members.items()}
        agree = sum(1 for r in member_rows.values() if r["top"] == classes[top])
        return {
            "label_set": lset.name, "classes": list(classes),
            "probabilities": {c: float(probs[k]) for k, c in enumerate(classes)},
            "top": classes[top], "top_name": lset.display_name(classes[top]), "top_probability": float(probs[top]),
            "flag_class": lset.flag, "flag_class_name": lset.display_name(lset.flag), "flag_probability": flag_p,
            "flag_threshold": self.threshold, "flagged": flagged,
            "melanoma_probability": flag_p if is_mel else None, "melanoma_threshold": self.threshold if is_mel else None,
            "melanoma_flag": flagged if is_mel else None,
            "members": member_rows, "agreement": f"{agree}/{len(member_rows)}", "members_agreeing": agree,
            "calibrated": self.trust is not None,
            "differential": differential,
            "differential_coverage": self.sets.coverage if self.sets is not None else None,
        }

    def answer(self, image: Image.Image, reasons: list[tuple[str, str]], result: dict[str, Any] | None,
               ood_score: float | None, *, meta: dict | None = None, research: bool = False,
               error_score: float | None = None) -> dict[str, Any]:
        """The one shape of an answer, for predict, the service and the study.

        Evaluable: `{"status": "ok", <result>, "ood_score", ...}`. Refused: `{"status": "unevaluable", "reasons",
        "reason_codes", "advice", "ood_score"}` and no diagnosis; with `research`, the would-be result under
        `research`. Both carry the image size, the metadata note (fusion bundles) and `identity`, and, where the
        screener has an error gate, `error_score` (the estimated chance of a wrong answer; None where the models did
        not run). Screeners without one answer without the field, as before it existed.
        """
        info = self.metadata_info(meta) if self.metadata_info else None
        if not reasons:
            body: dict[str, Any] = {"status": "ok", **(result or {})}
        else:
            body = {"status": "unevaluable", "reasons": [r for _, r in reasons],
                    "reason_codes": [c for c, _ in reasons],
                    "advice": list(dict.fromkeys(_ADVICE[c] for c, _ in reasons))}
            if research and result is not None:
                body["research"] = {**result, "note": RESEARCH_NOTE}
        body["ood_score"] = ood_score
        if self.error is not None:
            body["error_score"] = error_score
        if info:
            body["metadata"] = info
        body["image_size"] = list(image.size)
        body.update({"lesionlab_version": __version__, "disclaimer": DISCLAIMER, **self.identity})
        return body


def refusal_row(answer: dict[str, Any]) -> dict[str, Any]:
    """One row of a refusal table: quality codes, OOD score, whether OOD refused the image, its error score (NaN:
    none computed or no error gate), whether the error gate refused it, whether anything refused it."""
    codes = answer.get("reason_codes", [])
    quality = [c for c in codes if c not in (OOD_CODE, ERROR_CODE)]
    err = answer.get("error_score")
    return {"quality": ";".join(quality), "ood_score": answer["ood_score"] if answer["ood_score"] is not None else np.nan,
            "ood_refused": OOD_CODE in codes, "error_score": err if err is not None else np.nan,
            "error_refused": ERROR_CODE in codes, "refused": answer["status"] != "ok"}


def screen_table(screener: Screener, images: list[Image.Image] | None = None, *, paths: list | None = None,
                 batch_size: int = 64, research: bool = True, progress: bool = True) -> pd.DataFrame:
    """`Screener.screen` over decoded images or image files, batch by batch, as a refusal table (`refusal_row`).

    `research` (default here) computes OOD scores of quality-refused images too, for histograms and AUROCs; the
    refusals are the same as without it.
    """
    from lesionlab.data.images import load_image

    n = len(images) if images is not None else len(paths or [])
    rows = []
    for start in tqdm(range(0, n, batch_size), desc="screening", disable=not progress, leave=False):
        batch = (images[start:start + batch_size] if images is not None
                 else [load_image(p) for p in paths[start:start + batch_size]])
        rows += [refusal_row(a) for a in screener.screen(batch, research=research)]
    return pd.DataFrame(rows, columns=["quality", "ood_score", "ood_refused", "error_score", "error_refused", "refused"])
