"""Results out as DICOM: a Comprehensive 3D SR (highdicom, TID 1500 Measurement Report) per DICOM input.

The SR goes back to the PACS beside the image it is about: it is in the source's study (highdicom copies the
patient and study modules from the source header), lists the source under Current Requested Procedure Evidence,
and its one measurement group names the source image (SOP Class / Instance UID) as its source image. The group
holds:

- measurements: the calibrated probability of each class (`99LESIONLAB` code `probability-<CLASS>`, UCUM `1`),
  the melanoma probability's threshold, the out-of-distribution score;
- qualitative evaluations: the top diagnosis, each diagnosis of the differential, the melanoma flag (SCT Yes/No),
  or, for a refused image, "unevaluable" and one evaluation per refusal reason code;
- the algorithm identification: "LesionLab bundle" with the bundle version (manifest hash) as its version.

Diagnosis concepts are SNOMED CT where `lesionlab.clinic.fhir.SNOMED_DIAGNOSES` has them, else the private coding
scheme `99LESIONLAB` (a private scheme designator starts with 99, PS3.16 8.2). The SR is Comprehensive 3D SR because
TID 1500 needs it (highdicom writes TID 1500 only there) and it is the SR class PACS and viewers read most widely;
it is written preliminary and unverified (`is_final=False`, `is_verified=False`): a clinician has not signed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lesionlab import __version__
from lesionlab.clinic.fhir import SNOMED_DIAGNOSES
from lesionlab.io import atomic_write
from lesionlab.labels import CLASSES, DISPLAY_NAMES

SCHEME = "99LESIONLAB"


def _concept(code: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code, scheme_designator=SCHEME, meaning=meaning[:64])


def diagnosis_code(cls: str):
    """SNOMED CT concept of a class where known, else the private one (CodeMeaning at most 64 characters)."""
    import highdicom as hd

    if cls in SNOMED_DIAGNOSES:
        code, meaning = SNOMED_DIAGNOSES[cls]
        return hd.sr.CodedConcept(value=code, scheme_designator="SCT", meaning=meaning)
    return _concept(cls, DISPLAY_NAMES[cls])


def structured_report(answer: dict[str, Any], source_header, *, series_number: int = 900, instance_number: int = 1):
    """A highdicom Comprehensive3DSR for one answer about one DICOM source image.

    Args:
        answer: one `Screener.answer` (ok or unevaluable).
        source_header: the source's pydicom Dataset (`DicomInfo.header`): patient, study and UIDs are taken from it.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    version = str(answer.get("bundle_version") or "unknown")
    algorithm = hd.sr.AlgorithmIdentification(name="LesionLab bundle", version=version,
                                              parameters=[f"lesionlab {answer.get('lesionlab_version', __version__)}"])
    unit = codes.UCUM.NoUnits
    measurements, evaluations = [], []
    if answer.get("status") == "ok":
        for c in CLASSES:
            measurements.append(hd.sr.Measurement(name=_concept(f"probability-{c}", f"Probability of {DISPLAY_NAMES[c]}"),
                                                  value=float(answer["probabilities"][c]), unit=unit,
                                                  algorithm_id=algorithm))
        evaluations.append(hd.sr.QualitativeEvaluation(name=_concept("top-diagnosis", "Most likely diagnosis"),
                                                       value=diagnosis_code(answer["top"])))
        for c in answer.get("differential") or []:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=_concept("differential-member", "Diagnosis in the differential"), value=diagnosis_code(c)))
        if answer.get("melanoma_flag") is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=_concept("melanoma-flag", "Melanoma probability at or above threshold"),
                value=codes.SCT.Yes if answer["melanoma_flag"] else codes.SCT.No))
            measurements.append(hd.sr.Measurement(name=_concept("melanoma-threshold", "Melanoma threshold"),
                                                  value=float(answer["melanoma_threshold"]), unit=unit))
    else:
        evaluations.append(hd.sr.QualitativeEvaluation(name=_concept("image-evaluability", "Image evaluability"),
                                                       value=_concept("unevaluable", "Unevaluable: no diagnosis")))
        for code in answer.get("reason_codes", []):
            evaluations.append(hd.sr.QualitativeEvaluation(name=_concept("refusal-reason", "Reason the image was refused"),
                                                           value=_concept(code, code.replace("_", " "))))
    if answer.get("ood_score") is not None:
        measurements.append(hd.sr.Measurement(name=_concept("ood-score", "Out-of-distribution score"),
                                              value=float(answer["ood_score"]), unit=unit))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion"),
        algorithm_id=algorithm,
        measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source_header.SOPClassUID,
            referenced_sop_instance_uid=source_header.SOPInstanceUID)])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="LesionLab", model_name=f"bundle {version}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept("lesion-image-assessment", "Skin lesion image assessment"),
        imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source_header], content=report, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer="LesionLab",
        is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = "LesionLab decision support (not a diagnosis)"
    return sr


def structured_report_bytes(answer: dict[str, Any], source_header) -> bytes:
    """`structured_report` as the bytes of a DICOM Part 10 file (what a service sends back or stores to a PACS)."""
    import io

    buf = io.BytesIO()
    structured_report(answer, source_header).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_structured_report(answer: dict[str, Any], source_header, path: str | Path) -> Path:
    """`structured_report` written (atomically) as a DICOM file at `path`."""
    sr = structured_report(answer, source_header)
    path = Path(path)
    atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
    return path
