"""The one screening pipeline: decoded images in, one answer per image out.

    decode (lesionlab.data.images, by the caller) -> quality checks -> the models, only for images that pass
    -> OOD score -> calibration -> conformal differential -> the answer

`Screener.screen` is what `lesionlab predict`, the service, the study's refusal report, benchmarks/bench_ood.py and
the real-data acceptance test run, so a published refusal rate is measured through the code a clinic runs. Every
decision lives in one function here: `refusal` (quality, then OOD), `answer` (the JSON shape of a result) and
`explained_class` (the class a heatmap explains: the one the answer shows).

An image that fails a quality check costs no forward pass. `research=True` runs the models on refused images too
(their would-be result goes under `research`, never as a diagnosis); measurements of OOD scores on refused sets
use it, and the decisions are the same either way.
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
from lesionlab.inference.outputs import image_outputs
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASS_INDEX, HAM7
from lesionlab.models.registry import file_stem

DISCLAIMER = "Decision support, not a diagnosis. A clinician must examine the lesion; histopathology decides."
RESEARCH_NOTE = ("Research use only: the models' output for an image they refused as unevaluable. Not a diagnosis "
                 "and not fit to support one.")
OOD_CODE = "out_of_distribution"


def refusal(quality_codes: list[tuple[str, str]], ood_score: float | None, ood_threshold: float | None
            ) -> list[tuple[str, str]]:
    """Why an image is refused (code, reason) pairs; empty when it is evaluable.

    Quality first: an image that fails a check is refused for that alone (its OOD score is not consulted, and
    without `research` not even computed). Otherwise an OOD score above the threshold refuses it.
    """
    if quality_codes:
        return list(quality_codes)
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        return [(OOD_CODE, "The image does not look like the dermoscopy images the models were trained on "
                 f"(unusualness score {ood_score:.2f}, limit {ood_threshold:.2f}).")]
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
    """

    members: list[Predictor]
    quality: QualityConfig
    ood: OODModel | None = None
    trust: dict[str, Any] | None = None
    threshold: float | None = None
    tta: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    metadata_info: Callable[[dict | None], dict[str, Any] | None] | None = None

    def __post_init__(self):
        conformal = (self.trust or {}).get("models", {}).get(ENSEMBLE, {}).get("conformal")
        self.sets = ConformalSets.from_dict(conformal) if conformal else None
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
        if run:
            ens, members = self.calibrated({n: o["probs"] for n, o in outputs.items()})
            diffs = self.sets.differential(ens) if self.sets is not None else None
        at = {k: j for j, k in enumerate(run)}
        out = []
        for k, im in enumerate(images):
            j = at.get(k)
            score = float(ood[j]) if ood is not None and j is not None else None
            result = None
            if j is not None:
                result = self.result(ens[j], {n: p[j] for n, p in members.items()},
                                     differential=diffs[j] if diffs is not None else None)
            out.append(self.answer(im, refusal(quality[k], score, self.ood.threshold if self.ood else None),
                                   result, score, meta=metadata[k] if metadata else None, research=research))
        return out, outputs

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
               ood_score: float | None, *, meta: dict | None = None, research: bool = False) -> dict[str, Any]:
        """The one shape of an answer, for predict, the service and the study.

        Evaluable: `{"status": "ok", <result>, "ood_score", ...}`. Refused: `{"status": "unevaluable", "reasons",
        "reason_codes", "advice", "ood_score"}` and no diagnosis; with `research`, the would-be result under
        `research`. Both carry the image size, the metadata note (fusion bundles) and `identity`.
        """
        info = self.metadata_info(meta) if self.metadata_info else None
        if not reasons:
            body: dict[str, Any] = {"status": "ok", **(result or {})}
        else:
            body = {"status": "unevaluable", "reasons": [r for _, r in reasons],
                    "reason_codes": [c for c, _ in reasons],
                    "advice": list(dict.fromkeys(ADVICE[c] for c, _ in reasons))}
            if research and result is not None:
                body["research"] = {**result, "note": RESEARCH_NOTE}
        body["ood_score"] = ood_score
        if info:
            body["metadata"] = info
        body["image_size"] = list(image.size)
        body.update({"lesionlab_version": __version__, "disclaimer": DISCLAIMER, **self.identity})
        return body


def refusal_row(answer: dict[str, Any]) -> dict[str, Any]:
    """One row of a refusal table: quality codes, OOD score, whether OOD or anything refused the image."""
    codes = answer.get("reason_codes", [])
    quality = [c for c in codes if c != OOD_CODE]
    return {"quality": ";".join(quality), "ood_score": answer["ood_score"] if answer["ood_score"] is not None else np.nan,
            "ood_refused": OOD_CODE in codes, "refused": answer["status"] != "ok"}


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
    return pd.DataFrame(rows, columns=["quality", "ood_score", "ood_refused", "refused"])
