"""Metadata fusion: the encoding, the fused model, its checkpoint, training on a metadata signal, inference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lesionlab.data.metadata import MISSING, MetadataEncoding, clean_value, read_metadata
from lesionlab.exceptions import UserError
from lesionlab.models.fusion import FusionModel, MetadataDataset, build_from_meta, fusion_meta, split_inputs


def _train_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "age": ["40", "60", "", "80"],  # HAM10000 leaves 57 ages empty
        "sex": ["male", "female", "unknown", "male"],
        "localization": ["back", "face", "back", "unknown"],
    })


def test_encoding_by_hand_with_missing_and_unseen_values():
    enc = MetadataEncoding.fit(_train_rows(), ["age", "sex", "site"])  # `site` is an alias of localization
    assert enc.fields == ["age", "sex", "localization"]
    assert enc.numeric["age"]["mean"] == pytest.approx(60.0)
    assert enc.categories == {"sex": ["female", "male"], "localization": ["back", "face"]}
    assert enc.columns == ["age", "age_missing", "sex=female", "sex=male", "sex_missing",
                           "localization=back", "localization=face", "localization_missing"]
    std = enc.numeric["age"]["std"]
    x, missing = enc.encode([{"age": 70, "sex": "female", "localization": "face"},
                             {"age": "", "sex": "other", "site": "scalp"},  # unseen values count as missing
                             {}])
    np.testing.assert_allclose(x[0], [10 / std, 0, 1, 0, 0, 0, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(x[1], [0, 1, 0, 0, 1, 0, 0, 1])
    assert missing == [[], ["age", "sex", "localization"], ["age", "sex", "localization"]]
    np.testing.assert_array_equal(x[2], enc.encode(None, n=1)[0][0])
    # the spec survives the JSON sidecar
    again = MetadataEncoding.from_dict(enc.to_dict())
    np.testing.assert_array_equal(again.encode(_train_rows())[0], enc.encode(_train_rows())[0])
    assert clean_value(3.0) == "3" and clean_value(" Unknown ") == MISSING


def test_encoding_names_a_missing_column():
    with pytest.raises(UserError, match="train.metadata names 'fitzpatrick'"):
        MetadataEncoding.fit(_train_rows(), ["fitzpatrick"])


def test_read_metadata_accepts_image_column_and_site_alias(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("image,age,site\nISIC_1,55,back\n")
    df = read_metadata(f)
    assert list(df.columns) == ["image_id", "age", "localization"]


def _fused(seed: int = 0) -> FusionModel:
    import timm

    torch.manual_seed(seed)
    enc = MetadataEncoding.fit(_train_rows(), ["age", "sex", "localization"])
    return FusionModel(timm.create_model("resnet10t", pretrained=False, num_classes=7), enc, num_classes=7).eval()


def test_fused_model_uses_metadata_and_defaults_to_missing():
    model = _fused()
    x = torch.randn(2, 3, 32, 32)
    meta = torch.from_numpy(model.encoding.encode([{"age": 30, "sex": "male", "localization": "face"}] * 2)[0])
    with torch.no_grad():
        with_meta, without = model(x, meta), model(x)
        all_missing = model(x, torch.from_numpy(model.encoding.encode(None, n=2)[0]))
    assert with_meta.shape == (2, 7)
    assert not torch.allclose(with_meta, without)
    torch.testing.assert_close(without, all_missing)
    # timm's interface: body + head, pre-logits width = image features + metadata MLP
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True, meta=meta).shape == (2, model.num_features)


def test_gradcam_of_a_fused_model_does_not_depend_on_the_metadata():
    """The head is linear over [image, metadata], so Grad-CAM on the backbone sees the image branch only."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _fused()
    x = torch.randn(1, 3, 64, 64)

    class Fixed(torch.nn.Module):
        def __init__(self, meta):
            super().__init__()
            self.m, self.meta = model, meta

        def forward(self, inp):
            return self.m(inp, self.meta)

    maps = []
    for row in ({"age": 20, "sex": "male", "localization": "back"}, {"age": 90, "sex": "female", "localization": "face"}):
        meta = torch.from_numpy(model.encoding.encode([row])[0])
        with GradCAM(model=Fixed(meta), target_layers=[model.backbone.layer4]) as cam:
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(0)])[0])
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


def test_checkpoint_round_trip_rebuilds_the_fused_model(tmp_path):
    from lesionlab import models

    model = _fused(seed=3)
    meta = {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_fraction": 2 / 3, "cam_layer": "backbone.layer4", **fusion_meta(model)}
    models.save_checkpoint(model, meta, tmp_path)
    loaded, sidecar = models.load_checkpoint(tmp_path)
    assert isinstance(loaded, FusionModel) and sidecar["metadata"]["fields"] == ["age", "sex", "localization"]
    x = torch.randn(2, 3, 32, 32)
    m = torch.from_numpy(model.encoding.encode([{"age": 50, "sex": "male"}, {}])[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, m), model(x, m))
    assert isinstance(build_from_meta(sidecar), FusionModel)


def test_metadata_dataset_passes_indexes_and_seeds_through():
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            i = index[0] if isinstance(index, tuple) else index
            return torch.full((3, 2, 2), float(i)), i

    ds = MetadataDataset(Images(), np.arange(6, dtype=np.float32).reshape(3, 2))
    (x, m), y = ds[(2, 12345)]
    assert y == 2 and float(x[0, 0, 0]) == 2 and m.tolist() == [4.0, 5.0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    imgs, meta = split_inputs(batch[0])
    assert imgs.shape == (3, 3, 2, 2) and meta.shape == (3, 2)
    assert split_inputs(imgs)[1] is None


def test_predictor_reads_metadata_from_frames_and_arguments(tmp_path, synth_dir):
    from lesionlab import models
    from lesionlab.data.tables import read_table
    from lesionlab.inference.predictor import Predictor

    model = _fused(seed=4)
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 2 / 3,
                                   "cam_layer": "backbone.layer4", **fusion_meta(model)}, tmp_path)
    pr = Predictor(tmp_path, device="cpu", precision="fp32")
    df = read_table(synth_dir).df.head(6)
    from_frame = pr.predict_frame(df, batch_size=4, progress=False)
    without = pr.predict_frame(df.drop(columns=["age", "sex", "localization"]), batch_size=4, progress=False)
    assert not np.allclose(from_frame, without)
    from lesionlab.data.images import load_image

    images = [load_image(p) for p in df["path"]]
    rows = df[["age", "sex", "localization"]].to_dict("records")
    np.testing.assert_allclose(pr.predict_images(images, metadata=rows), from_frame, atol=1e-5)
    np.testing.assert_allclose(pr.predict_images(images), without, atol=1e-5)
    meta, missing = pr.encode_metadata([{"age": 50}], 1)
    assert meta.shape == (1, model.encoding.dim) and missing == [["sex", "localization"]]


def test_fusion_learns_a_signal_only_the_metadata_carries(tmp_path):
    """Synthetic lesions whose body site gives the class away: trained by the same `fit`, the fused model's
    validation loss ends far below the image-only one's; its checkpoint rebuilds and Grad-CAM still works."""
    from lesionlab import models
    from lesionlab.config import load_config
    from lesionlab.data.images import load_image
    from lesionlab.data.split import make_split
    from lesionlab.data.subsets import split_frames
    from lesionlab.data.synth import make_synthetic
    from lesionlab.data.tables import read_table
    from lesionlab.explain.gradcam import explain_image
    from lesionlab.inference.predictor import Predictor
    from lesionlab.training.fit import fit

    make_synthetic(tmp_path / "data", n_images=140, seed=2, size=(48, 36), metadata_signal=1.0, progress=False)
    table = read_table(tmp_path / "data")
    tr, va = split_frames(table, make_split(table.df, fractions=(0.6, 0.4, 0.0), seed=0))
    best = {}
    for name, fields in (("image", "[]"), ("fused", "[age,sex,localization]")):
        cfg = load_config("demo", ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.cache=false",
                                   "train.epochs=4", "train.lr=0.01", "train.patience=10", "train.pretrained=none",
                                   "train.device=cpu", "train.precision=fp32", f"train.metadata={fields}"])
        best[name] = fit("timm:test_resnet", tr, va, cfg, tmp_path / name, progress=False)["best_val_loss"]
    assert best["fused"] < 0.75 * best["image"], best
    meta = models.read_meta(tmp_path / "fused")
    assert meta["metadata"]["fields"] == ["age", "sex", "localization"] and meta["cam_layer"] == "backbone.layer4"
    assert "metadata" not in models.read_meta(tmp_path / "image")
    pr = Predictor(tmp_path / "fused", device="cpu", precision="fp32")
    assert isinstance(pr.model, FusionModel)
    ex = explain_image([pr], load_image(va["path"].iloc[0]), cls="MEL")  # maps from the image branch
    assert ex.ensemble.shape == ex.display.shape[:2] and np.isfinite(ex.ensemble).all()


def _fused_bundle(tmp_path):
    from lesionlab import models
    from lesionlab.clinic.bundle import make_bundle

    model = _fused(seed=5)
    run = tmp_path / "runs" / "fused"
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 2 / 3,
                                   "cam_layer": "backbone.layer4", **fusion_meta(model)}, run)
    make_bundle([run], tmp_path / "bundle", threshold=0.2, tta=False, precision="fp32")
    return tmp_path / "bundle"


def test_bundle_predict_and_service_take_optional_metadata(tmp_path, tiny_bundle):
    import contextlib
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from lesionlab.cli import main
    from lesionlab.clinic.bundle import EnsemblePredictor
    from lesionlab.serve.app import create_app

    bundle = _fused_bundle(tmp_path)
    ens = EnsemblePredictor(bundle, device="cpu", precision="fp32")
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    bare = ens.predict([im])[0]
    assert bare["metadata"]["missing"] == ["age", "localization", "sex"] and "missing-value indicators" in bare["metadata"]["note"]
    full = ens.predict([im], metadata=[{"age": 70, "sex": "male", "site": "back"}])[0]
    assert full["metadata"]["missing"] == [] and "note" not in full["metadata"]
    assert full["probabilities"] != bare["probabilities"]
    # an image-only bundle says that it ignored the metadata, and says nothing when none is given
    plain = EnsemblePredictor(tiny_bundle, device="cpu", precision="fp32")
    assert "ignored" in plain.predict([im], metadata=[{"age": 70}])[0]["metadata"]["note"]
    assert "metadata" not in plain.predict([im])[0]

    img = tmp_path / "ISIC_1.png"  # lossless: the same pixels as `im`
    im.save(img)
    (tmp_path / "meta.csv").write_text("image_id,age,sex,localization\nISIC_1,70,male,back\n")
    for extra in (["--metadata", str(tmp_path / "meta.csv")], ["--age", "70", "--sex", "male", "--site", "back"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["predict", str(img), "--bundle", str(bundle), "--format", "json", "--device", "cpu", *extra]) == 0
        res = json.loads(buf.getvalue())[0]
        assert res["metadata"]["missing"] == [] and res["probabilities"] == pytest.approx(full["probabilities"], abs=1e-4)

    client = TestClient(create_app(bundle, device="cpu", precision="fp32"))
    data = img.read_bytes()
    r = client.post("/api/predict", files={"image": ("x.png", data, "image/png")}, data={"age": "70", "sex": "male", "site": "back"})
    assert r.status_code == 200 and r.json()["metadata"]["missing"] == []
    r = client.post("/api/predict?explain=true", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == 200 and "note" in r.json()["metadata"] and r.json()["heatmap"].startswith("data:image/png")


def test_ood_features_of_a_fused_model_are_the_image_branch(tmp_path):
    """Out-of-distribution scores judge the image: a fused model's features do not move with the metadata."""
    from lesionlab import models
    from lesionlab.inference.predictor import Predictor

    model = _fused(seed=6)
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 2 / 3,
                                   "cam_layer": "backbone.layer4", **fusion_meta(model)}, tmp_path)
    pr = Predictor(tmp_path, device="cpu", precision="fp32")
    x = torch.randn(2, 3, 32, 32)
    meta = pr.encode_metadata([{"age": 30, "sex": "male", "localization": "face"}] * 2, 2)[0]
    a, b = pr.outputs_batch(x), pr.outputs_batch(x, meta=meta)
    np.testing.assert_allclose(a["features"], b["features"], atol=1e-6)
    assert a["features"].shape == (2, model.backbone.num_features)
    assert not np.allclose(a["logits"], b["logits"])


def test_perturbed_inference_gives_a_fused_model_each_images_metadata(tmp_path):
    """`lesionlab robustness` on a fused model: every perturbed copy carries its image's metadata."""
    from PIL import Image

    from lesionlab import models
    from lesionlab.data.perturbations import conditions
    from lesionlab.inference.perturbed import predict_perturbed
    from lesionlab.inference.predictor import load_predictors

    model = _fused(seed=7)
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": "resnet10t", "input_size": 32,
                                   "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 2 / 3,
                                   "cam_layer": "backbone.layer4", **fusion_meta(model)}, tmp_path / "m")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"img{i}.jpg"))
        Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).save(paths[-1])
    df = pd.DataFrame({"path": paths, "age": [20, 80, np.nan, 45, 60],
                       "sex": ["male", "female", "male", "unknown", "female"],
                       "localization": ["face", "back", "trunk", "face", "back"]})
    (pr,) = load_predictors([tmp_path / "m"], device="cpu", precision="fp32")
    conds = conditions(["hflip"], max_levels=1)
    clean, pert = predict_perturbed([pr], df, conds, seed=0, chunk=2, progress=False)
    np.testing.assert_allclose(clean[pr.name], pr.predict_frame(df, progress=False), atol=1e-5)
    no_meta = pr.predict_frame(df[["path"]], progress=False)
    assert np.abs(clean[pr.name] - no_meta).max() > 1e-3  # the metadata reached the model
    recs = df.drop(columns="path").to_dict("records")
    flipped = pr.predict_images([Image.open(p).transpose(Image.FLIP_LEFT_RIGHT) for p in paths], metadata=recs)
    np.testing.assert_allclose(pert[pr.name][("hflip", 1.0)], flipped, atol=1e-5)
