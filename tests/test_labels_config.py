import pytest
import yaml

from lesionlab import labels
from lesionlab.config import load_config, save_config
from lesionlab.exceptions import UserError


def test_class_order_and_dx_codes():
    assert labels.CLASSES == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert [labels.dx_to_class(d) for d in ("mel", "NV", " bkl ", "akiec")] == ["MEL", "NV", "BKL", "AKIEC"]
    assert labels.class_index("vasc") == 6
    with pytest.raises(KeyError, match="expected one of"):
        labels.dx_to_class("lentigo")


def test_paper_config_is_the_published_protocol():
    cfg = load_config("paper")
    assert cfg.data.image_size == 224 and cfg.data.rotation == 180
    assert abs(cfg.data.crop_fraction - 2 / 3) < 1e-6
    assert cfg.train.epochs == 20 and cfg.train.class_weighting
    assert cfg.train.archs == ["resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d"]
    assert round(cfg.split.train * 10015) == 8123 and round(cfg.split.val * 10015) == 886


def test_overrides_types_and_errors(tmp_path):
    cfg = load_config("demo", ["train.epochs=7", "data.hflip=true", "train.archs=[resnet101]", "train.lr=3e-4"])
    assert cfg.train.epochs == 7 and cfg.data.hflip is True and cfg.train.archs == ["resnet101"]
    assert cfg.train.lr == pytest.approx(3e-4)
    with pytest.raises(UserError, match="unknown key train.epoch"):
        load_config("demo", ["train.epoch=3"])
    with pytest.raises(UserError, match="expects int"):
        load_config("demo", ["train.epochs=many"])
    with pytest.raises(UserError, match="section.key=value"):
        load_config("demo", ["epochs"])
    with pytest.raises(UserError, match="paper"):
        load_config("nope")
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["epochs"] == 7
