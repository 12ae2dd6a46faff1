"""Results out as FHIR R4: one DiagnosticReport per image, with its Observations, in a `collection` Bundle.

Shape (what FHIR implementers expect for a report with results):

    Bundle (type collection)
      Device            the LesionLab bundle that answered: its version (manifest hash) and LesionLab's version
      DiagnosticReport  per image: status, code, subject, conclusion (+ conclusionCode), result -> its Observations,
                        imagingStudy / media as logical references to the DICOM source (UIDs) when there is one
      Observation       per class probability (7), the top diagnosis, the differential (conformal set), the
                        melanoma flag with its threshold, the out-of-distribution score; or, for a refused image,
                        its evaluability with one component per refusal reason; each `device` -> the Device
      OperationOutcome  per input that could not be read (predict only)

Observations are Bundle entries referenced by `urn:uuid:` fullUrls, not `contained` resources: FHIR allows contained
resources only for content that cannot stand on its own, and a receiving system (an EHR, an integration engine that
turns a collection into a transaction) stores each Observation as a resource of its own; a collection Bundle is
the neutral carrier (no server semantics) that a lab or imaging interface sends.

Built as plain JSON and validated with fhir.resources 8.x's `fhir.resources.R4B` models (the package's default
models are R5; R4B is wire-compatible with R4 for Bundle, DiagnosticReport, Observation, Device and
OperationOutcome, the only resources used here). fhir.resources checks structure, cardinality and data types, not
terminology bindings.

Codes: the diagnoses use SNOMED CT where the concept is well known and matches the class; everything else is in
the local code system `LOCAL_SYSTEM` (a receiving system maps it, or uses the display text):

    class  SNOMED CT                                         local code (always present)
    MEL    372244006 Malignant melanoma (disorder)           MEL
    BCC    254701007 Basal cell carcinoma of skin (disorder) BCC
    AKIEC  201101007 Actinic keratosis (disorder)            AKIEC  (the class also holds Bowen's disease)
    NV     400096001 Melanocytic naevus (disorder)           NV
    AK     201101007 Actinic keratosis (disorder)            AK     (isic2019: actinic keratosis, SCC apart)
    BKL    -  (groups seborrhoeic keratosis, solar lentigo,  BKL
              lichen-planus-like keratosis)
    DF     -                                                 DF
    VASC   -  (groups angiomas, angiokeratomas, pyogenic     VASC
              granulomas, haemorrhage)

Probabilities are unitless UCUM quantities (`1`). Dates are the time the report was made (UTC).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable
from typing import Any

from lesionlab import __version__
from lesionlab.clinic.screening import DISCLAIMER
from lesionlab.labels import CLASSES, DISPLAY_NAMES

LOCAL_SYSTEM = "urn:lesionlab:fhir:codes"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DICOM_UID = "urn:dicom:uid"

# class -> (SNOMED CT code, its display); absent: local code only (module docstring).
SNOMED_DIAGNOSES: dict[str, tuple[str, str]] = {
    "MEL": ("372244006", "Malignant melanoma"),
    "BCC": ("254701007", "Basal cell carcinoma of skin"),
    "AKIEC": ("201101007", "Actinic keratosis"),
    "AK": ("201101007", "Actinic keratosis"),
    "NV": ("400096001", "Melanocytic naevus"),
}


def _local(code: str, display: str) -> dict[str, str]:
    return {"system": LOCAL_SYSTEM, "code": code, "display": display}


def diagnosis_concept(cls: str) -> dict[str, Any]:
    """The CodeableConcept of a diagnosis class: SNOMED CT where known, always the local code, and its name."""
    coding = []
    if cls in SNOMED_DIAGNOSES:
        code, display = SNOMED_DIAGNOSES[cls]
        coding.append({"system": SNOMED, "code": code, "display": display})
    coding.append(_local(cls, DISPLAY_NAMES[cls]))
    return {"coding": coding, "text": DISPLAY_NAMES[cls]}


def _probability(p: float) -> dict[str, Any]:
    return {"value": round(float(p), 6), "unit": "probability", "system": UCUM, "code": "1"}


def _uid_ref(kind: str, uid: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"type": kind, "identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"}}
    if display:
        ref["display"] = display
    return ref


def bundle_identity(answer: dict[str, Any], bundle_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Who answered: the bundle's version (its manifest hash, as every answer carries it) and LesionLab's version,
    plus anything in `bundle_info` (e.g. `path`, `manifest_sha256`)."""
    info = {"bundle_version": answer.get("bundle_version"), "lesionlab_version": answer.get("lesionlab_version",
                                                                                         __version__)}
    info.update({k: v for k, v in (bundle_info or {}).items() if v is not None})
    return info


def device_resource(identity: dict[str, Any]) -> dict[str, Any]:
    """The Device that made the observations: the LesionLab bundle, identified by its version (manifest hash)."""
    bundle_version = str(identity.get("bundle_version") or "unknown")  # unknown: no image was answered
    versions = [{"type": {"text": "bundle version (manifest SHA-256, first 12 hex digits)"}, "value": bundle_version},
                {"type": {"text": "LesionLab software"}, "value": str(identity.get("lesionlab_version") or __version__)}]
    dev: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": f"{LOCAL_SYSTEM}:bundle-version", "value": bundle_version}],
        "deviceName": [{"name": "LesionLab dermoscopy decision-support bundle", "type": "model-name"}],
        "type": {"text": "Software: skin-lesion image classifier (decision support, not a diagnosis)"},
        "version": versions,
    }
    if identity.get("manifest_sha256"):
        dev["identifier"].append({"system": f"{LOCAL_SYSTEM}:manifest-sha256", "value": identity["manifest_sha256"]})
    if identity.get("path"):
        dev["note"] = [{"text": f"bundle folder: {identity['path']}"}]
    return dev


def _observation(code: dict[str, Any], *, device_url: str, subject: dict | None, when: str, **value: Any
                 ) -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                           "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging",
                                                     "display": "Imaging"}]}],
                           "code": code, "effectiveDateTime": when, "device": {"reference": device_url}}
    if subject:
        obs["subject"] = subject
    obs.update(value)
    return obs


def _observations(answer: dict[str, Any], *, device_url: str, subject: dict | None, when: str,
                  derived: list[dict] | None) -> list[dict[str, Any]]:
    def obs(code: str, display: str, text: str, **value: Any) -> dict[str, Any]:
        o = _observation({"coding": [_local(code, display)], "text": text}, device_url=device_url, subject=subject,
                         when=when, **value)
        if derived:
            o["derivedFrom"] = derived
        return o

    out: list[dict[str, Any]] = []
    if answer.get("status") == "ok":
        for c in CLASSES:
            p = answer["probabilities"][c]
            out.append(obs(f"probability-{c}", f"Model probability: {DISPLAY_NAMES[c]}",
                           f"Probability of {DISPLAY_NAMES[c]} ({c})", valueQuantity=_probability(p),
                           component=[{"code": {"coding": [_local("diagnosis", "Diagnosis")]},
                                       "valueCodeableConcept": diagnosis_concept(c)}]))
        out.append(obs("top-diagnosis", "Most likely diagnosis (model)", "Most likely diagnosis",
                       valueCodeableConcept=diagnosis_concept(answer["top"]),
                       component=[{"code": {"coding": [_local("top-probability", "Probability of the top class")]},
                                   "valueQuantity": _probability(answer["top_probability"])}]))
        if answer.get("differential") is not None:
            cov = answer.get("differential_coverage")
            comps = [{"code": {"coding": [_local("differential-member", "Diagnosis in the differential")]},
                      "valueCodeableConcept": diagnosis_concept(c)} for c in answer["differential"]]
            if cov is not None:
                comps.append({"code": {"coding": [_local("differential-coverage", "Target coverage of the set")]},
                              "valueQuantity": _probability(cov)})
            out.append(obs("differential", "Differential (conformal prediction set)",
                           "Differential: the diagnoses the true one is among at the stated coverage",
                           valueString=", ".join(answer["differential"]) or "(empty)", component=comps))
        if answer.get("melanoma_flag") is not None:
            flag = bool(answer["melanoma_flag"])
            out.append(obs("melanoma-flag", "Melanoma flag (probability at or above the bundle's threshold)",
                           "Melanoma flag", valueBoolean=flag,
                           interpretation=[{"coding": [{"system": INTERPRETATION, "code": "POS" if flag else "NEG",
                                                        "display": "Positive" if flag else "Negative"}]}],
                           component=[
                               {"code": {"coding": [_local("melanoma-probability", "Melanoma probability")]},
                                "valueQuantity": _probability(answer["melanoma_probability"])},
                               {"code": {"coding": [_local("melanoma-threshold", "Melanoma threshold")]},
                                "valueQuantity": _probability(answer["melanoma_threshold"])}]))
    else:
        reasons = answer.get("reasons", [])
        comps = [{"code": {"coding": [_local("refusal-reason", "Reason the image was refused")]},
                  "valueCodeableConcept": {"coding": [_local(code, code.replace("_", " "))], "text": reason}}
                 for code, reason in zip(answer.get("reason_codes", []), reasons, strict=False)]
        out.append(obs("image-evaluability", "Image evaluability", "Image evaluability",
                       valueCodeableConcept={"coding": [_local("unevaluable", "Unevaluable: no diagnosis given")],
                                             "text": "Unevaluable: " + " ".join(reasons)},
                       component=comps or None,
                       note=[{"text": a} for a in answer.get("advice", [])] or None))
    if answer.get("ood_score") is not None:
        out.append(obs("ood-score", "Out-of-distribution (unusualness) score", "Unusualness score",
                       valueQuantity={"value": round(float(answer["ood_score"]), 6), "unit": "score",
                                      "system": UCUM, "code": "1"}))
    return [{k: v for k, v in o.items() if v is not None} for o in out]


def _conclusion(answer: dict[str, Any]) -> str:
    if answer.get("status") != "ok":
        return "Unevaluable: no diagnosis given. " + " ".join(answer.get("reasons", [])) + f" {DISCLAIMER}"
    parts = [f"Most likely {DISPLAY_NAMES[answer['top']]} ({answer['top_probability']:.0%})."]
    if answer.get("melanoma_flag") is not None:
        parts.append(f"Melanoma probability {answer['melanoma_probability']:.1%}: "
                     f"{'AT OR ABOVE' if answer['melanoma_flag'] else 'below'} the threshold "
                     f"{answer['melanoma_threshold']:.1%}.")
    if answer.get("differential") is not None:
        parts.append(f"Differential: {', '.join(answer['differential']) or '(empty)'}.")
    return " ".join(parts) + f" {DISCLAIMER}"


def report_entries(answer: dict[str, Any], *, device_url: str, source: dict[str, Any] | None = None,
                   patient_ref: str | None = None, image_ref: str | None = None,
                   when: str | None = None) -> list[dict[str, Any]]:
    """Bundle entries (`fullUrl`, `resource`) for one answer: its DiagnosticReport first, then its Observations.

    Args:
        answer: one `Screener.answer` (status ok or unevaluable).
        device_url: the fullUrl of the Device entry (`device_resource`) the observations cite.
        source: the DICOM source (`DicomInfo.to_dict()`: study/series/SOP instance UIDs), or None.
        patient_ref: a FHIR reference to the patient (e.g. `Patient/123`), or None (no subject).
        image_ref: what the image is called (a file name) for a non-DICOM input, or None.
    """
    when = when or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    subject = {"reference": patient_ref} if patient_ref else None
    derived = None
    report: dict[str, Any] = {"resourceType": "DiagnosticReport", "status": "final",
                              "category": [{"coding": [_local("dermoscopy", "Dermoscopy")], "text": "Dermoscopy"}],
                              "code": {"coding": [_local("lesion-image-assessment",
                                                         "Skin lesion image assessment (decision support)")],
                                       "text": "Skin lesion image assessment (decision support, not a diagnosis)"},
                              "effectiveDateTime": when, "issued": when}
    if subject:
        report["subject"] = subject
    if source and source.get("sop_instance_uid"):
        image = _uid_ref("Media", source["sop_instance_uid"], image_ref)
        report["media"] = [{"comment": "source image (DICOM SOP Instance UID)", "link": image}]
        if source.get("study_instance_uid"):
            study = _uid_ref("ImagingStudy", source["study_instance_uid"])
            report["imagingStudy"] = [study]
            derived = [study]
    elif image_ref:
        report["media"] = [{"comment": "source image", "link": {"type": "Media", "display": image_ref}}]
    observations = _observations(answer, device_url=device_url, subject=subject, when=when, derived=derived)
    urls = [f"urn:uuid:{uuid.uuid4()}" for _ in observations]
    report["result"] = [{"reference": u, "display": o["code"]["text"]} for u, o in zip(urls, observations, strict=True)]
    report["conclusion"] = _conclusion(answer)
    if answer.get("status") == "ok":
        report["conclusionCode"] = [diagnosis_concept(answer["top"])]
    return ([{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": report}]
            + [{"fullUrl": u, "resource": o} for u, o in zip(urls, observations, strict=True)])


def operation_outcome(image: str, error: str) -> dict[str, Any]:
    """An OperationOutcome for an input that could not be read (no report for it)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": error, "expression": [image]}]}


def fhir_bundle(items: Iterable[dict[str, Any]], *, bundle_info: dict[str, Any] | None = None,
                patient_ref: str | None = None) -> dict[str, Any]:
    """A validated FHIR R4 collection Bundle for predict's rows (module docstring for the shape).

    Args:
        items: predict rows: an answer with `image` (and `dicom` for a DICOM source), or `{"image", "error"}`.
        bundle_info: extra identity of the bundle (`path`, `manifest_sha256`), see `bundle_identity`.
        patient_ref: a FHIR reference for every report's subject, or None.

    Returns:
        The Bundle as JSON-ready dict (what `fhir.resources.R4B` serialises after validating it).
    """
    rows = list(items)
    answers = [r for r in rows if "error" not in r]
    device_url = f"urn:uuid:{uuid.uuid4()}"
    identity = bundle_identity(answers[0] if answers else {}, bundle_info)
    entries: list[dict[str, Any]] = [{"fullUrl": device_url, "resource": device_resource(identity)}]
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for r in rows:
        if "error" in r:
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": operation_outcome(r["image"], r["error"])})
        else:
            entries += report_entries(r, device_url=device_url, source=r.get("dicom"), patient_ref=patient_ref,
                                      image_ref=r.get("image"), when=when)
    return validated({"resourceType": "Bundle", "type": "collection", "timestamp": when, "entry": entries})


def fhir_for_answer(answer: dict[str, Any], bundle_info: dict[str, Any] | None = None,
                    source: dict[str, Any] | None = None, *, patient_ref: str | None = None,
                    image_ref: str | None = None) -> dict[str, Any]:
    """The service's `format=fhir` answer: a validated collection Bundle of one DiagnosticReport (with the Device
    and the report's Observations) for one `Screener.answer`.

    Args:
        answer: the answer as `/api/predict` gives it.
        bundle_info: extra identity of the bundle (see `bundle_identity`).
        source: `Decoded.dicom.to_dict()` for a DICOM upload (UIDs referenced), else None.
        patient_ref: e.g. `Patient/123`, or None.
        image_ref: the uploaded file's name, or None.
    """
    return fhir_bundle([{**answer, "image": image_ref or "upload", **({"dicom": source} if source else {})}],
                       bundle_info=bundle_info, patient_ref=patient_ref)


def validated(bundle: dict[str, Any]) -> dict[str, Any]:
    """Validate a Bundle with fhir.resources (R4B models), each entry as its own resource type, and return the
    JSON the library serialises (so what leaves LesionLab is what the validator accepted).

    Raises:
        ValueError: the bundle is not valid FHIR (a bug here, never the user's input).
    """
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    for e in bundle.get("entry", []):
        get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
    model = Bundle.model_validate(bundle)
    return json.loads(model.model_dump_json(exclude_none=True))
