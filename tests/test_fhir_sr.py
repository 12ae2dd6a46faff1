"""Results out: FHIR R4 (validated with fhir.resources R4B) and DICOM SR (highdicom), each read back with its own
library and compared field by field with the answer; `lesionlab predict --format fhir --sr-dir` end to end."""

from __future__ import annotations

import io
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from corpus import make_dicom
from fhir.resources.R4B.bundle import Bundle
from helpers import lesion_like

from lesionlab.clinic.dicom_sr import structured_report_bytes, write_structured_report
from lesionlab.clinic.fhir import LOCAL_SYSTEM, SNOMED, fhir_bundle, fhir_for_answer, validated
from lesionlab.data.images import decode_input
from lesionlab.labels import CLASSES

PROBS = {"MEL": 0.31, "NV": 0.4, "BCC": 0.09, "AKIEC": 0.05, "BKL": 0.08, "DF": 0.04, "VASC": 0.03}
OK = {"status": "ok", "probabilities": PROBS, "top": "NV", "top_probability": 0.4, "melanoma_probability": 0.31,
      "melanoma_threshold": 0.15, "melanoma_flag": True, "differential": ["NV", "MEL"], "differential_coverage": 0.9,
      "ood_score": 1.25, "bundle_version": "0123456789ab", "lesionlab_version": "0.9.0", "image": "a.jpg"}
REFUSED = {"status": "unevaluable", "reasons": ["The image is blurred.", "Too dark."],
           "reason_codes": ["blurred", "underexposed"], "advice": ["Refocus and retake."], "ood_score": None,
           "bundle_version": "0123456789ab", "image": "b.jpg"}


def _local(concept, code: str) -> bool:
    return any(c.system == LOCAL_SYSTEM and c.code == code for c in concept.coding)


def _parse(bundle: dict):
    """Parse the JSON back with fhir.resources; {fullUrl: resource}."""
    parsed = Bundle.model_validate_json(json.dumps(bundle))
    assert parsed.type == "collection"
    return {e.fullUrl: e.resource for e in parsed.entry}


def _observations(resources, report) -> dict[str, object]:
    """The report's observations, by their local code."""
    out = {}
    for ref in report.result:
        obs = resources[ref.reference]
        out[next(c.code for c in obs.code.coding if c.system == LOCAL_SYSTEM)] = obs
    return out


def test_fhir_bundle_round_trips_every_field():
    b = fhir_bundle([OK, REFUSED, {"image": "c.jpg", "error": "c.jpg: not a readable image"}],
                    bundle_info={"path": "/bundles/v3"}, patient_ref="Patient/42")
    res = _parse(b)
    kinds = [r.__resource_type__ for r in res.values()]
    assert kinds.count("DiagnosticReport") == 2 and kinds.count("OperationOutcome") == 1 and kinds.count("Device") == 1
    device_url, device = next((u, r) for u, r in res.items() if r.__resource_type__ == "Device")
    assert {v.value for v in device.version} == {"0123456789ab", "0.9.0"}
    ok_report, refused_report = [r for r in res.values() if r.__resource_type__ == "DiagnosticReport"]
    assert ok_report.subject.reference == "Patient/42" and ok_report.status == "final"

    obs = _observations(res, ok_report)
    for c in CLASSES:
        o = obs[f"probability-{c}"]
        assert float(o.valueQuantity.value) == pytest.approx(PROBS[c]) and o.valueQuantity.code == "1"
        assert o.device.reference == device_url and o.subject.reference == "Patient/42"
    mel = obs["probability-MEL"].component[0].valueCodeableConcept
    assert any(c.system == SNOMED and c.code == "372244006" for c in mel.coding) and _local(mel, "MEL")
    top = obs["top-diagnosis"].valueCodeableConcept
    assert _local(top, "NV") and any(c.system == SNOMED and c.code == "400096001" for c in top.coding)
    diff = obs["differential"]
    members = [comp.valueCodeableConcept for comp in diff.component if comp.valueCodeableConcept is not None]
    assert [next(c.code for c in m.coding if c.system == LOCAL_SYSTEM) for m in members] == ["NV", "MEL"]
    cover = next(comp for comp in diff.component if comp.valueQuantity is not None)
    assert float(cover.valueQuantity.value) == pytest.approx(0.9)
    flag = obs["melanoma-flag"]
    assert flag.valueBoolean is True and flag.interpretation[0].coding[0].code == "POS"
    parts = {comp.code.coding[0].code: float(comp.valueQuantity.value) for comp in flag.component}
    assert parts == {"melanoma-probability": pytest.approx(0.31), "melanoma-threshold": pytest.approx(0.15)}
    assert float(obs["ood-score"].valueQuantity.value) == pytest.approx(1.25)
    assert _local(ok_report.conclusionCode[0], "NV") and "Decision support" in ok_report.conclusion

    robs = _observations(res, refused_report)
    assert set(robs) == {"image-evaluability"}
    ev = robs["image-evaluability"]
    assert _local(ev.valueCodeableConcept, "unevaluable")
    assert [(comp.valueCodeableConcept.coding[0].code, comp.valueCodeableConcept.text) for comp in ev.component] == [
        ("blurred", "The image is blurred."), ("underexposed", "Too dark.")]
    assert refused_report.conclusionCode is None and refused_report.conclusion.startswith("Unevaluable")
    outcome = next(r for r in res.values() if r.__resource_type__ == "OperationOutcome")
    assert outcome.issue[0].severity == "error" and outcome.issue[0].expression == ["c.jpg"]
    # nothing answered: still a valid Bundle (the Device's version unknown) with the outcome
    only = _parse(fhir_bundle([{"image": "c.jpg", "error": "c.jpg: empty"}]))
    assert sorted(r.__resource_type__ for r in only.values()) == ["Device", "OperationOutcome"]


def test_fhir_for_answer_references_the_dicom_source_and_invalid_fhir_is_caught():
    src = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.4.5",
           "sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.7"}
    res = _parse(fhir_for_answer(OK, None, src, image_ref="lesion.dcm"))
    report = next(r for r in res.values() if r.__resource_type__ == "DiagnosticReport")
    assert report.imagingStudy[0].identifier.value == "urn:oid:1.2.3"
    assert report.media[0].link.identifier.value == "urn:oid:1.2.3.4.5"
    assert report.subject is None
    assert all(o.derivedFrom[0].identifier.value == "urn:oid:1.2.3" for o in _observations(res, report).values())
    # the validator is really consulted: a resource without its required fields is refused
    with pytest.raises(ValueError):
        validated({"resourceType": "Bundle", "type": "collection",
                   "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "valueBoolean": True}}]})


def test_dicom_sr_round_trips_through_highdicom(tmp_path):
    data = make_dicom()
    d = decode_input(io.BytesIO(data), name="x.dcm")
    path = write_structured_report(OK, d.dicom.header, tmp_path / "x_sr.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    src = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID != src.SOPInstanceUID
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = ev.ReferencedSeriesSequence[0]
    assert (ev.StudyInstanceUID, ref.SeriesInstanceUID, ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == (
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
    values = {m.name.value: float(m.value) for m in group.get_measurements()}
    assert {c: values[f"probability-{c}"] for c in CLASSES} == pytest.approx(PROBS)
    assert values["melanoma-threshold"] == pytest.approx(0.15) and values["ood-score"] == pytest.approx(1.25)
    evals = [(q.name.value, q.value.value) for q in group.get_qualitative_evaluations()]
    assert evals == [("top-diagnosis", "400096001"), ("differential-member", "400096001"),
                     ("differential-member", "372244006"),
                     ("melanoma-flag", "373066001")]
    # a refused image: its reasons, no diagnosis
    (group,) = hd.sr.srread(write_structured_report(REFUSED, d.dicom.header, tmp_path / "r.dcm")
                            ).content.get_image_measurement_groups()
    assert [(q.name.value, q.value.value) for q in group.get_qualitative_evaluations()] == [
        ("image-evaluability", "unevaluable"), ("refusal-reason", "blurred"), ("refusal-reason", "underexposed")]
    assert group.get_measurements() == []
    # the same SR as bytes (for the service)
    again = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(structured_report_bytes(OK, d.dicom.header))))
    assert again.StudyInstanceUID == src.StudyInstanceUID


def test_predict_format_fhir_and_sr_dir_end_to_end(tiny_bundle, tmp_path, capsys):
    from lesionlab.cli import main
    from lesionlab.clinic.bundle import EnsemblePredictor

    lesion_like(200, 150, seed=11).save(tmp_path / "photo.png")
    (tmp_path / "derm.dcm").write_bytes(make_dicom(pixels=np.asarray(lesion_like(200, 150, seed=12))))
    (tmp_path / "drawing.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    code = main(["predict", str(tmp_path / "photo.png"), str(tmp_path / "derm.dcm"), str(tmp_path / "drawing.eps"),
                 "--bundle", str(tiny_bundle), "--device", "cpu", "--engine", "torch", "--format", "fhir",
                 "--patient", "Patient/7", "--sr-dir", str(tmp_path / "sr")])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err and "wrote 1 DICOM SR(s)" in err
    res = _parse(json.loads(out))
    reports = [r for r in res.values() if r.__resource_type__ == "DiagnosticReport"]
    assert len(reports) == 2 and sum(r.__resource_type__ == "OperationOutcome" for r in res.values()) == 1
    dicom_report = next(r for r in reports if r.imagingStudy)
    src = pydicom.dcmread(tmp_path / "derm.dcm", stop_before_pixels=True)
    assert dicom_report.imagingStudy[0].identifier.value == f"urn:oid:{src.StudyInstanceUID}"

    ens = EnsemblePredictor(tiny_bundle, device="cpu", precision="fp32", engine="torch")
    # the same image alone (predict batched it with the PNG: float sums differ in the last digits)
    answer = ens.predict([decode_input(open(tmp_path / "derm.dcm", "rb"), name="derm.dcm").image])[0]
    obs = _observations(res, dicom_report)
    assert answer["status"] == "ok"  # lesion_like passes the quality checks; the tiny bundle has no OOD model
    fhir_probs = {c: float(obs[f"probability-{c}"].valueQuantity.value) for c in CLASSES}
    assert fhir_probs == pytest.approx(answer["probabilities"], abs=1e-4)
    assert obs["melanoma-flag"].valueBoolean is answer["melanoma_flag"]

    (sr_path,) = (tmp_path / "sr").glob("*.dcm")
    assert sr_path.name == "derm_sr.dcm"
    sr = hd.sr.srread(sr_path)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == src.SOPInstanceUID
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name.value: float(m.value) for m in group.get_measurements()}
    assert {c: values[f"probability-{c}"] for c in CLASSES} == pytest.approx(answer["probabilities"], abs=1e-4)
