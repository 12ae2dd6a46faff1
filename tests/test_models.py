import time

import pytest
import torch

from lesionlab import models
from lesionlab.exceptions import UserError, WeightsUnavailable
from lesionlab.models import registry


@pytest.mark.parametrize("name", models.PAPER_ARCHS)
def test_paper_architectures_build_with_seven_outputs_and_train(name):
    model, spec = models.create_model(name, pretrained="none")
    assert models.cam_layer_name(model, spec) == "layer4"
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.get_classifier().weight.grad is not None


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UserError, match="resnet101, resnext101_32x4d, seresnet101, seresnext101_32x4d"):
        models.resolve("resnet50x")
    with pytest.raises(UserError, match="timm has no model"):
        models.resolve("timm:not_a_model")
    spec = models.resolve("timm:resnet10t")
    model, _ = models.create_model("timm:resnet10t", pretrained="none")
    assert models.cam_layer_name(model, spec) == "layer4"
    assert models.expand_archs("all") == list(models.PAPER_ARCHS)


def test_offline_imagenet_request_fails_fast_with_the_options(monkeypatch):
    monkeypatch.setattr(registry, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        models.create_model("timm:resnet10t.a1_in1k", pretrained="imagenet")
    assert time.perf_counter() - t < 20
    assert "--weights FILE" in str(e.value) and "--pretrained none" in str(e.value)


def test_local_weights_file_loads_and_replaces_the_head(tmp_path):
    import timm
    from safetensors.torch import save_file

    imagenet = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    save_file(imagenet.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(imagenet.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        model, _ = models.create_model("timm:resnet10t", weights=tmp_path / f)
        assert model.fc.out_features == 7
        assert torch.equal(model.conv1[0].weight, imagenet.conv1[0].weight)
    other = timm.create_model("resnet18", pretrained=False, num_classes=7)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="right model"):
        models.create_model("timm:resnet10t", weights=tmp_path / "other.safetensors")


def test_pickled_payloads_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights-only"):
        models.read_state_dict(tmp_path / "evil.pth")


def test_checkpoint_roundtrip(tmp_path):
    model, spec = models.create_model("timm:resnet10t", pretrained="none")
    models.save_checkpoint(model, {"arch": spec.name, "timm_id": spec.timm_id, "input_size": 32}, tmp_path)
    loaded, meta = models.load_checkpoint(tmp_path)
    assert meta["classes"][0] == "MEL" and not loaded.training
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model(x), loaded(x))
    with pytest.raises(UserError, match="does not exist"):
        models.load_checkpoint(tmp_path / "nope")
