"""The GPU augmentation path (lesionlab.data.gpu_augment) against the CPU path, on the CPU.

One preprocessing path: for the same parameters the batched device functions give the CPU transform's tensors
(within 1/255 before normalisation; bitwise on the CPU), both paths draw their parameters from one sampler, and
`auto` selects the device path for CUDA only. tests/test_gpu.py repeats the comparison on a real GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode, v2

from lesionlab.data.dataset import EpochSampler, make_dataset
from lesionlab.data.gpu_augment import (
    DeviceLoader,
    WorkerStep,
    augment_batch,
    on_device,
    training_transforms,
    use_gpu_augment,
)
from lesionlab.data.transforms import (
    DataSpec,
    RandomGeometry,
    SquareFrame,
    apply_geometry,
    build_train_transform,
    draw_geometry,
    frame_size,
)
from lesionlab.exceptions import UserError

TOL = 1 / 255 + 1e-6  # one uint8 step, in [0, 1] units


def _unnormalise(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    return x * torch.tensor(spec.std).view(-1, 3, 1, 1) + torch.tensor(spec.mean).view(-1, 3, 1, 1)


def _cpu_reference(frame: torch.Tensor, geometry: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """The CPU path's steps after the frame, for given parameters."""
    x = apply_geometry(frame, geometry, size=spec.input_size)
    return v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), list(spec.mean), list(spec.std))


def _frames(n: int, f: int, seed: int) -> torch.Tensor:
    """Noise (every resampling error shows) and smooth gradients (rounding near .5 is exercised)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n - n // 2, 3, f, f), dtype=torch.uint8, generator=g)
    coarse = torch.randint(0, 256, (n // 2, 3, 6, 6), generator=g).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(f, f), mode="bilinear").round().to(torch.uint8)
    return torch.cat([noise, smooth])


@pytest.mark.parametrize("size,crop", [(32, 2 / 3), (33, 2 / 3), (40, 0.9)], ids=["even", "odd-margin", "black-corners"])
def test_device_functions_give_the_cpu_tensors_for_fixed_parameters(size, crop):
    spec = DataSpec(input_size=size, crop_fraction=crop, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    f = frame_size(size, crop)
    frames = _frames(12, f, seed=size)
    angles = torch.tensor([0.0, 90.0, 180.0, -90.0, 45.0, -180.0, 12.345, -77.7, 133.3, 0.01, -0.5, 179.99],
                          dtype=torch.float64)
    flips = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]] * 3, dtype=torch.float64)
    geometry = torch.cat([angles[:, None], flips], 1)
    out = augment_batch(frames, geometry, spec=spec)
    ref = torch.stack([_cpu_reference(frames[i], geometry[i], spec) for i in range(len(frames))])
    assert out.shape == ref.shape == (12, 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    diff = (_unnormalise(out, spec) - _unnormalise(ref, spec)).abs().max()
    assert diff <= TOL, float(diff) * 255
    if crop > 0.75:  # rotated corners leave the frame: the black fill (torchvision's sampled mask) is reproduced
        assert (_unnormalise(ref, spec)[4, :, 0, 0] < 0.02).all()
    # evaluation: no geometry is the plain centre crop
    ev = augment_batch(frames, None, spec=spec)
    ev_ref = torch.stack([_cpu_reference(fr, torch.zeros(3, dtype=torch.float64), spec) for fr in frames])
    assert (_unnormalise(ev, spec) - _unnormalise(ev_ref, spec)).abs().max() <= TOL


def test_cpu_path_is_torchvisions_own_augmentation_bit_for_bit():
    """RandomGeometry (the shared sampler) leaves the CPU path's outputs and RNG exactly as v2.RandomRotation etc. did."""
    spec = DataSpec(input_size=33)

    def old(rotation, hflip, vflip):
        steps = [SquareFrame(frame_size(spec.input_size, spec.crop_fraction))]
        if rotation > 0:
            steps.append(v2.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
        steps.append(v2.CenterCrop(spec.input_size))
        steps += [v2.RandomHorizontalFlip()] if hflip else []
        steps += [v2.RandomVerticalFlip()] if vflip else []
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])

    img = _frames(2, 70, seed=1)[0][:, :60]  # 70x60: the frame step resizes it
    for rotation, hflip, vflip in [(180, False, False), (180, True, True), (0, True, False), (30, False, True)]:
        a, b = old(rotation, hflip, vflip), build_train_transform(spec=spec, rotation=rotation, hflip=hflip, vflip=vflip)
        assert any(isinstance(t, RandomGeometry) for t in b.transforms)
        for seed in range(6):
            torch.manual_seed(seed)
            x, after_a = a(img), torch.rand(1)
            torch.manual_seed(seed)
            y, after_b = b(img), torch.rand(1)
            assert torch.equal(x, y) and torch.equal(after_a, after_b), (rotation, hflip, vflip, seed)


def test_both_paths_draw_their_parameters_from_one_sampler():
    spec = DataSpec(input_size=32)
    frame = _frames(2, frame_size(32, 2 / 3), seed=5)[0]
    worker = WorkerStep(spec=spec, rotation=180, hflip=True, vflip=True)
    cpu_geometry = RandomGeometry(size=32, rotation=180, hflip=True, vflip=True)
    for seed in range(20):
        torch.manual_seed(seed)
        drawn = draw_geometry(rotation=180, hflip=True, vflip=True)
        torch.manual_seed(seed)
        item = worker(frame)
        torch.manual_seed(seed)
        cpu_out = cpu_geometry(frame)
        assert torch.equal(item["geometry"], drawn) and torch.equal(item["image"], frame)
        assert torch.equal(cpu_out, apply_geometry(frame, drawn, size=32))  # the CPU path used these parameters
        torch.manual_seed(seed)  # and they are torchvision's own draws
        assert drawn[0].item() == v2.RandomRotation(180).make_params([])["angle"]
    # the distribution: angle ~ U(-180, 180), each flip ~ Bernoulli(1/2), independent
    draws = []
    for seed in range(2000):
        torch.manual_seed(seed)
        draws.append(worker(frame)["geometry"])
    g = torch.stack(draws).numpy()
    assert stats.kstest(g[:, 0], stats.uniform(loc=-180, scale=360).cdf).pvalue > 1e-3
    assert g[:, 0].min() >= -180 and g[:, 0].max() <= 180
    for k in (1, 2):
        assert set(np.unique(g[:, k])) == {0.0, 1.0}
        assert stats.binomtest(int(g[:, k].sum()), len(g), 0.5).pvalue > 1e-3
    assert abs(np.corrcoef(g[:, 1], g[:, 2])[0, 1]) < 0.1
    off = WorkerStep(spec=spec)(frame)["geometry"]
    assert torch.equal(off, torch.zeros(3, dtype=torch.float64))


def test_gpu_augment_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_gpu_augment("auto", cuda) and use_gpu_augment("auto", "cuda:1")
    assert not use_gpu_augment("auto", cpu) and not use_gpu_augment("off", cuda)
    assert use_gpu_augment("on", cpu) and use_gpu_augment("on", cuda)
    assert not use_gpu_augment("auto", cuda, color_jitter=0.2)  # no batched colour jitter: the CPU path
    with pytest.raises(UserError, match="color_jitter"):
        use_gpu_augment("on", cuda, color_jitter=0.2)
    with pytest.raises(UserError, match="auto, on, off"):
        use_gpu_augment("gpu", cuda)
    from lesionlab.config import load_config

    assert load_config("paper").data.gpu_augment == "auto"
    for value, want in (("off", False), ("on", True), ("auto", False)):  # YAML reads on/off as booleans
        cfg = load_config("paper", [f"data.gpu_augment={value}"])
        assert use_gpu_augment(cfg.data.gpu_augment, "cpu") is want
    spec = DataSpec(input_size=32)
    tr, ev = training_transforms(spec=spec, rotation=180, hflip=False, vflip=False, color_jitter=0, device_side=True)
    assert isinstance(tr, WorkerStep) and isinstance(ev, WorkerStep) and ev.rotation == 0
    tr, ev = training_transforms(spec=spec, rotation=180, hflip=False, vflip=False, color_jitter=0, device_side=False)
    assert isinstance(tr, v2.Compose) and isinstance(ev, v2.Compose)
    loader = torch.utils.data.DataLoader([])
    assert on_device(loader, spec=spec, device="cpu", enabled=False) is loader
    assert isinstance(on_device(loader, spec=spec, device="cpu", enabled=True), DeviceLoader)


def _image_table(tmp_path, n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = (120, 90) if i % 2 else (90, 70)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "label": ["NV", "MEL"] * (n // 2)})


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "decoded"])
def test_dataset_items_are_the_same_through_either_path(tmp_path, cached):
    """Same (index, per-sample seed): CPU dataset item == device augmentation of the GPU path's item, cached or not."""
    df = _image_table(tmp_path)
    spec = DataSpec(input_size=32)
    kw = {"input_size": 32, "crop_fraction": spec.crop_fraction, "cache_dir": tmp_path / "c" if cached else None,
          "progress": False}
    opts = {"spec": spec, "rotation": 180.0, "hflip": True, "vflip": False, "color_jitter": 0.0}
    cpu_tf, _ = training_transforms(**opts, device_side=False)
    gpu_tf, _ = training_transforms(**opts, device_side=True)
    cpu_ds, gpu_ds = make_dataset(df, cpu_tf, **kw), make_dataset(df, gpu_tf, **kw)
    sampler = EpochSampler(len(df), seed=7)
    sampler.set_epoch(3)
    for idx in sampler:
        a, ya = cpu_ds[idx]
        item, yb = gpu_ds[idx]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 48, 48) and ya == yb
        b = augment_batch(item["image"][None], item["geometry"][None], spec=spec)[0]
        assert (_unnormalise(a, spec) - _unnormalise(b, spec)).abs().max() <= TOL


def test_device_loader_batches_plain_and_with_metadata(tmp_path):
    from lesionlab.models.fusion import MetadataDataset, split_inputs

    df = _image_table(tmp_path)
    spec = DataSpec(input_size=32)
    tf, _ = training_transforms(spec=spec, rotation=90.0, hflip=False, vflip=False, color_jitter=0.0, device_side=True)
    ds = make_dataset(df, tf, input_size=32, crop_fraction=spec.crop_fraction, cache_dir=None)
    sampler = EpochSampler(len(df), seed=0)
    loader = DeviceLoader(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler), spec=spec, device="cpu")
    assert len(loader) == 2 and loader.dataset is ds and loader.sampler is sampler
    x, y = next(iter(loader))
    order = [i for i, _ in sampler][:4]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [ds.targets[i] for i in order]
    assert x.is_contiguous(memory_format=torch.channels_last)
    first = ds[list(sampler)[0]][0]
    assert torch.equal(x[0], augment_batch(first["image"][None], first["geometry"][None], spec=spec)[0])
    meta = MetadataDataset(ds, np.zeros((len(df), 2), np.float32))
    mloader = DeviceLoader(torch.utils.data.DataLoader(meta, batch_size=4, sampler=sampler), spec=spec, device="cpu")
    mx, _ = next(iter(mloader))
    images, metadata = split_inputs(mx)
    assert torch.equal(images, x) and metadata.shape == (4, 2)
    with pytest.raises(TypeError, match="WorkerStep"):
        DeviceLoader(torch.utils.data.DataLoader([(torch.zeros(3), 0)]), spec=spec, device="cpu").convert(torch.zeros(1))


def test_fit_through_either_path_trains_the_same_model_on_the_cpu(tiny_cfg, synth_dir, synth_split, tmp_path):
    """`fit` with data.gpu_augment on (forced on the CPU) and off: the same batches, so the same run."""
    from lesionlab.data.split import read_split
    from lesionlab.data.subsets import subset_frame
    from lesionlab.data.tables import read_table
    from lesionlab.training.fit import HISTORY_FILE, fit

    table, sp = read_table(synth_dir), read_split(synth_split)
    train, val = subset_frame(table, sp, "train").head(24), subset_frame(table, sp, "val").head(8)
    hist = {}
    for mode in ("on", "off"):
        tiny_cfg.data.gpu_augment = mode
        tiny_cfg.train.epochs, tiny_cfg.train.max_steps_per_epoch = 1, 2
        fit("timm:resnet10t", train, val, tiny_cfg, tmp_path / mode, cache_dir=tmp_path / "cache", progress=False)
        hist[mode] = pd.read_csv(tmp_path / mode / HISTORY_FILE)
    cols = ["train_loss", "val_loss", "val_accuracy"]
    assert np.allclose(hist["on"][cols].to_numpy(), hist["off"][cols].to_numpy(), rtol=1e-5, atol=1e-6), hist
