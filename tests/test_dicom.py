"""DICOM in: real DICOM files made with pydicom in the test, decoded with the photometric interpretation honoured,
their headers as metadata (fusion bundles, subgroups), malformed ones refused in one line, found in folders, and
through predict and evaluate-external."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from corpus import display_p3_profile, make_dicom, p3_to_srgb
from helpers import lesion_like, make_tiny_checkpoint
from PIL import Image
from pydicom.pixels import convert_color_space

from lesionlab.data.dicom import header_info, localization_for, parse_age, read_header
from lesionlab.data.images import ImageError, decode_input, find_images, image_id

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"


def _decode(data: bytes, name: str = "x.dcm"):
    return decode_input(io.BytesIO(data), name=name)


def test_header_becomes_metadata_and_keeps_uids_and_acquisition():
    import pydicom

    data = make_dicom()
    d = _decode(data)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    info = d.dicom
    assert d.format == "DICOM"
    assert info.patient == {"age": 45, "sex": "female", "localization": "back", "body_site": "Skin of back"}
    assert d.metadata() == {"age": 45, "sex": "female", "localization": "back"}
    assert info.acquisition == {"manufacturer": "DermaScope Inc", "device_model": "DS-100", "modality": "XC",
                                "polarization": "POLARIZED", "contact_method": "CONTACT", "immersion_media": "GEL",
                                "magnification": "10"}
    assert info.uids() == {"study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
                           "sop_instance_uid": ds.SOPInstanceUID, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.7"}
    assert "PixelData" not in info.header and info.header.PatientID == "P001"
    json.dumps(info.to_dict())  # what predict's JSON carries
    # no PatientAge: from the birth date and the study date; BodyPartExamined when there is no region sequence;
    # sex O is unknown
    other = header_info(pydicom.dcmread(io.BytesIO(make_dicom(
        attrs={"PatientAge": None, "AnatomicRegionSequence": None, "BodyPartExamined": "UPPER ARM",
               "PatientSex": "O"})), stop_before_pixels=True))
    assert other.patient == {"age": 45, "sex": None, "localization": "upper extremity", "body_site": "UPPER ARM"}
    assert other.fusion_metadata() == {"age": 45, "localization": "upper extremity"}


def test_age_strings_and_body_sites():
    assert [parse_age(s) for s in ("045Y", "006M", "104W", "030D", "45", "", None, "X45Y")] == [
        45, 0.5, 1.99, 0.08, None, None, None, None]
    cases = {"Skin of back": "back", "Structure of palm of hand": "acral", "Skin of dorsum of hand": "hand",
             "Skin of sole of foot": "acral", "Great toe": "foot", "Skin of upper arm": "upper extremity",
             "THIGH": "lower extremity", "Skin of chest": "chest", "Skin of abdomen": "abdomen",
             "Scalp": "scalp", "Skin of external ear": "ear", "Skin of nose": "face", "Neck": "neck",
             "Trunk": "trunk", "Skin of scrotum": "genital", "Chip": None, "": None, "HEAD": None}
    assert {k: localization_for(k) for k in cases} == cases


def test_photometric_interpretations_are_honoured():
    rgb = np.asarray(lesion_like(64, 48, seed=1))
    # RGB and the VL Photographic SOP class
    assert np.array_equal(np.asarray(_decode(make_dicom(pixels=rgb, sop_class=VL_PHOTOGRAPHIC)).image), rgb)
    # YBR_FULL stored uncompressed: back to RGB (pydicom's conversion; the round trip costs at most 1-2 levels)
    got = np.asarray(_decode(make_dicom(pixels=rgb, photometric="YBR_FULL")).image).astype(int)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    assert np.abs(got - convert_color_space(ybr, "YBR_FULL", "RGB").astype(int)).max() == 0
    assert np.abs(got - rgb).max() <= 2
    # JPEG Baseline, YBR_FULL_422: decoded to RGB, as Pillow decodes the same JPEG stream on its own
    got = np.asarray(_decode(make_dicom(pixels=rgb, jpeg=True)).image).astype(int)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=1)
    assert np.abs(got - np.asarray(Image.open(buf).convert("RGB")).astype(int)).max() <= 1
    assert np.abs(got - rgb).mean() < 10
    # MONOCHROME2 and MONOCHROME1 (inverted), 8-bit and 12-bit
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    assert np.array_equal(np.asarray(_decode(make_dicom(pixels=grey, photometric="MONOCHROME2")).image)[..., 0], grey)
    assert np.array_equal(np.asarray(_decode(make_dicom(pixels=grey, photometric="MONOCHROME1")).image)[..., 0],
                          255 - grey)
    g12 = (grey.astype(np.int64) * 4095 // 252).astype(np.uint16)
    out = np.asarray(_decode(make_dicom(pixels=g12, photometric="MONOCHROME2", bits=12)).image)[..., 0]
    assert out[0, 0] == 0 and out[0, -1] == 255 and np.all(np.diff(out[0].astype(int)) >= 0)


def test_malformed_dicom_is_one_line_image_error():
    good = make_dicom(pixels=np.asarray(lesion_like(32, 24)))
    at = good.index(b"045Y") - 2  # the PatientAge element's 2-byte length (explicit VR little endian)
    bad_length = good[:at] + b"\xff\xf0" + good[at + 2:]
    cases = {
        "bad-length.dcm": bad_length,
        "preamble-only.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40,
        "cut.dcm": good[: len(good) - 300],
        "no-pixels.dcm": make_dicom(pixel_data=False),
        "hsv.dcm": good.replace(b"CS\x04\x00RGB ", b"CS\x04\x00HSV "),  # a retired photometric interpretation
    }
    assert cases["hsv.dcm"] != good
    for name, data in cases.items():
        with pytest.raises(ImageError) as e:
            _decode(data, name)
        assert str(e.value).startswith(name) and "\n" not in str(e.value), str(e.value)


def test_dicom_files_are_found_by_suffix_and_by_preamble(tmp_path):
    data = make_dicom(pixels=np.asarray(lesion_like(32, 24)))
    (tmp_path / "a.dcm").write_bytes(data)
    (tmp_path / "1.2.840.99.12345").write_bytes(data)  # PACS export named after its UID
    (tmp_path / "IM000001").write_bytes(data)
    (tmp_path / "README").write_text("not an image")
    (tmp_path / "notes.txt").write_bytes(data)  # a suffix that is not probed
    found = find_images(tmp_path)
    assert found == {"a": tmp_path / "a.dcm", "1.2.840.99.12345": tmp_path / "1.2.840.99.12345",
                     "IM000001": tmp_path / "IM000001"}
    assert image_id(tmp_path / "1.2.840.99.12345") == "1.2.840.99.12345" and image_id(tmp_path / "a.dcm") == "a"
    assert read_header(tmp_path / "IM000001").patient["sex"] == "female"


def _prediction_csv(out):
    (pred,) = [p for p in (out / "predictions").glob("*_external.csv") if not p.name.startswith("truth")]
    return pred


def _fused_bundle(root):
    """A one-member metadata-fusion bundle (age, sex, localization), as tests/test_fusion.py makes one."""
    import timm

    from lesionlab import models
    from lesionlab.clinic.bundle import make_bundle
    from lesionlab.data.metadata import MetadataEncoding
    from lesionlab.models.fusion import FusionModel, fusion_meta

    torch.manual_seed(5)
    rows = pd.DataFrame({"age": ["40", "60", "", "80"], "sex": ["male", "female", "unknown", "male"],
                         "localization": ["back", "face", "back", "unknown"]})
    enc = MetadataEncoding.fit(rows, ["age", "sex", "localization"])
    model = FusionModel(timm.create_model("resnet10t", pretrained=False, num_classes=7), enc, num_classes=7).eval()
    run = root / "runs" / "fused"
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 2 / 3,
                                   "cam_layer": "backbone.layer4", **fusion_meta(model)}, run)
    make_bundle([run], root / "bundle", threshold=0.2, tta=False, precision="fp32")
    return root / "bundle"


def test_predict_reads_header_metadata_and_explicit_values_win(tmp_path):
    from lesionlab.cli import main
    from lesionlab.clinic.bundle import EnsemblePredictor

    bundle = _fused_bundle(tmp_path)
    rgb = np.asarray(lesion_like(200, 150, seed=4))
    (tmp_path / "lesion.dcm").write_bytes(make_dicom(pixels=rgb))
    ens = EnsemblePredictor(bundle, device="cpu", precision="fp32", engine="torch")
    im = Image.fromarray(rgb)
    want_header = ens.predict([im], metadata=[{"age": 45, "sex": "female", "localization": "back"}])[0]
    want_cli = ens.predict([im], metadata=[{"age": 80, "sex": "female", "localization": "back"}])[0]
    assert want_header["probabilities"] != want_cli["probabilities"]

    def run(*extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["predict", str(tmp_path / "lesion.dcm"), "--bundle", str(bundle), "--format", "json",
                         "--device", "cpu", "--engine", "torch", *extra])
        return code, json.loads(buf.getvalue())[0]

    code, row = run()
    assert row["metadata"]["missing"] == []
    assert row["probabilities"] == pytest.approx(want_header["probabilities"], abs=1e-5)
    assert row["dicom"]["acquisition"]["polarization"] == "POLARIZED"
    assert row["dicom"]["patient"]["age"] == 45
    code, row = run("--age", "80")  # the explicit age wins; sex and site still come from the header
    assert row["metadata"]["missing"] == []
    assert row["probabilities"] == pytest.approx(want_cli["probabilities"], abs=1e-5)


def test_evaluate_external_on_dicom_writes_header_metadata_for_subgroups(tmp_path, tiny_cfg):
    from lesionlab.cli import main
    from lesionlab.labels import CLASSES
    from lesionlab.workflows.evaluate import subgroup_files

    imgs = tmp_path / "ext"
    imgs.mkdir()
    labels = ["MEL", "NV", "BCC", "NV", "MEL", "NV"]
    for k, _ in enumerate(labels):
        attrs = {"LightSourcePolarization": "POLARIZED" if k % 2 else "NON_POLARIZED",
                 "ManufacturerModelName": f"DS-{100 + k % 2}", "PatientSex": "MF"[k % 2]}
        name = f"case{k}.dcm" if k < 3 else f"1.2.840.99.{k}"  # half named after their UID, no suffix
        (imgs / name).write_bytes(make_dicom(pixels=np.asarray(lesion_like(96, 72, seed=k)), attrs=attrs))
    truth = pd.DataFrame({"image": [f"case{k}" if k < 3 else f"1.2.840.99.{k}" for k in range(len(labels))],
                          **{c: [float(lab == c) for lab in labels] for c in CLASSES}})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    run = make_tiny_checkpoint(tmp_path / "runs" / "m0", seed=0)
    out = tmp_path / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["evaluate-external", "--runs", str(run), "--images", str(imgs), "--truth",
                     str(tmp_path / "truth.csv"), "--out", str(out), "--config", "demo",
                     *[x for o in ("data.image_size=32", "data.num_workers=0", "train.device=cpu",
                                   "train.precision=fp32", "eval.bootstrap=20") for x in ("--set", o)]])
    assert code == 0, buf.getvalue()
    assert "6 DICOM image(s)" in buf.getvalue()
    meta = pd.read_csv(out / "dicom_metadata.csv", dtype=str)
    assert sorted(meta["image_id"]) == sorted(truth["image"])
    assert set(meta["polarization"]) == {"POLARIZED", "NON_POLARIZED"} and set(meta["device_model"]) == {"DS-100",
                                                                                                         "DS-101"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dicom_images"] == 6
    pred = _prediction_csv(out)
    table, _ = subgroup_files(out / "predictions" / "truth_external.csv", [pred], out / "dicom_metadata.csv",
                              tmp_path / "sub", columns=["polarization", "device_model"], n_boot=5, min_images=1)
    assert {("polarization", "POLARIZED"), ("polarization", "NON_POLARIZED"), ("device_model", "DS-100")} <= set(
        zip(table["column"], table["subgroup"], strict=True))


def test_a_dicom_icc_profile_is_converted_to_srgb():
    flat = np.full((24, 32, 3), (180, 120, 100), np.uint8)
    got = np.asarray(_decode(make_dicom(pixels=flat, attrs={"ICCProfile": display_p3_profile()})).image)[12, 16]
    assert np.abs(got.astype(float) - p3_to_srgb((180, 120, 100))).max() <= 2
    assert np.abs(got.astype(int) - (180, 120, 100)).max() > 5


def test_evaluate_external_feeds_header_metadata_to_a_fusion_model(tmp_path):
    from lesionlab.config import load_config
    from lesionlab.data.images import load_image
    from lesionlab.inference.predictor import Predictor
    from lesionlab.labels import CLASSES
    from lesionlab.workflows.external import evaluate_external

    _fused_bundle(tmp_path)
    run = tmp_path / "runs" / "fused"
    imgs = tmp_path / "ext"
    imgs.mkdir()
    ages, sexes = ["030Y", "075Y"], ["M", "F"]
    for k in range(2):
        (imgs / f"c{k}.dcm").write_bytes(make_dicom(pixels=np.asarray(lesion_like(96, 72, seed=k)),
                                                    attrs={"PatientAge": ages[k], "PatientSex": sexes[k]}))
    pd.DataFrame({"image": ["c0", "c1"], **{c: [float(c == "MEL"), float(c == "NV")] for c in CLASSES}}).to_csv(
        tmp_path / "truth.csv", index=False)
    cfg = load_config("demo", ["data.num_workers=0", "train.device=cpu", "train.precision=fp32", "eval.bootstrap=5"])
    evaluate_external([run], imgs, tmp_path / "truth.csv", tmp_path / "out", cfg, progress=False)
    got = pd.read_csv(_prediction_csv(tmp_path / "out"))[list(CLASSES)].to_numpy()
    pr = Predictor(run, device="cpu", precision="fp32")
    images = [load_image(imgs / f"c{k}.dcm") for k in range(2)]
    header = [{"age": 30, "sex": "male", "localization": "back"}, {"age": 75, "sex": "female", "localization": "back"}]
    np.testing.assert_allclose(got, pr.predict_images(images, metadata=header), atol=1e-4)
    assert not np.allclose(got, pr.predict_images(images), atol=1e-4)  # without the header it would differ


def test_a_metadata_csv_names_uid_named_dicom_files_by_their_whole_name(tmp_path):
    from lesionlab.clinic.predict_files import metadata_lookup

    (tmp_path / "m.csv").write_text("image_id,age\n1.2.840.99.5,61\nphoto,33\n")
    lookup = metadata_lookup(tmp_path / "m.csv", {"sex": "male"})
    assert lookup([tmp_path / "1.2.840.99.5", tmp_path / "photo.jpg"]) == [{"sex": "male", "age": "61"},
                                                                           {"sex": "male", "age": "33"}]
