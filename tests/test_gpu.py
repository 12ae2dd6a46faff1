"""The CUDA path: bf16 + channels_last training steps, save/resume, Predictor and Grad-CAM against CPU fp32, NCCL DDP,
and the GPU augmentation path (lesionlab.data.gpu_augment) against the CPU transforms.

These run on a GPU through `benchmarks/gpu_check.sh` (which sets LESIONLAB_HAM to a real HAM10000 copy) and skip
themselves without CUDA. `gpu_check.sh --dry-run` (tests/test_gpu_check_dryrun.py, part of `make test`) runs
them on the CPU at toy sizes with gloo, so the code stays exercised on machines without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Bitwise-reproducible cuBLAS needs this before the first cuBLAS handle (deterministic resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_common  # noqa: E402

from lesionlab import models, runtime  # noqa: E402

DRY = gpu_common.dry()
CUDA = torch.cuda.is_available()
DEVICE = gpu_common.device()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or DRY), reason="needs CUDA (benchmarks/gpu_check.sh runs these on a GPU)"),
]
SIZE = 32 if DRY else 224
if CUDA and not DRY:
    torch.set_num_threads(os.cpu_count() or 1)  # conftest keeps CI at 2 threads; the CPU fp32 reference needs all
TINY = "timm:resnet10t"


def _cfg(**train):
    from lesionlab.config import load_config

    sets = [f"data.image_size={SIZE}", "train.precision=" + ("fp32" if DRY else "auto"), "data.batch_size=" + ("16" if DRY else "64"),
            f"data.num_workers={0 if DRY else os.cpu_count()}", "train.pretrained=none", f"train.device={DEVICE.type}",
            "train.lr=0.001", "train.patience=10"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("ham10000-cpu", sets)


@pytest.fixture(scope="module")
def data():
    return gpu_common.env_frames(limit=48 if DRY else 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One uint8 image cache for every training run in this module."""
    return tmp_path_factory.mktemp("cache")


# The CPU dry run takes one tiny model (the paper's four at 32 px took minutes on a 2-core VM); the GPU run all four.
@pytest.mark.parametrize("arch", [TINY] if DRY else models.PAPER_ARCHS)
def test_bf16_channels_last_training_steps_lower_the_loss(arch):
    torch.manual_seed(0)
    model, _ = models.create_model(arch, pretrained="none")
    model = runtime.prepare_model(model, DEVICE, channels_last=True).train()
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    batch = 4 if DRY else 32
    amp = None if DRY else torch.bfloat16  # the CPU dry run checks the code path in fp32 (CPU bf16 is slow without AMX)
    x = runtime.to_device(torch.randn(batch, 3, SIZE, SIZE), DEVICE, channels_last=True)
    y = (torch.arange(batch) % 7).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3 if DRY else 5):
        with runtime.autocast(DEVICE, amp):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        assert out.dtype == (torch.float32 if DRY else torch.bfloat16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gpu_common.record(f"train_step_loss/{arch}", losses)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_checkpoint_and_resume_state_round_trip_on_device(data, cache, tmp_path):
    """Weights saved from the device load back bit for bit; an interrupted run resumes from last.pt."""
    from safetensors.torch import load_file

    from lesionlab.training.fit import RESUME_FILE, fit

    cfg = _cfg(epochs=2, max_steps_per_epoch=2 if DRY else 20)
    part = fit(TINY, data["train"], data["val"], cfg, tmp_path / "run", cache_dir=cache,
               progress=False, stop_after_epochs=1)
    assert part == {"arch": TINY, "interrupted_after_epoch": 0}
    state = torch.load(tmp_path / "run" / RESUME_FILE, map_location="cpu", weights_only=True)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))  # best = epoch 1 = the state in last.pt
    assert saved.keys() == state["model"].keys() and all(torch.equal(saved[k], state["model"][k]) for k in saved)
    model, _ = models.load_checkpoint(tmp_path / "run", device=DEVICE)
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in model.state_dict().items())
    done = fit(TINY, data["train"], data["val"], cfg, tmp_path / "run", cache_dir=cache,
               progress=False, resume=True)
    assert done["epochs"] == 2


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(data, cache, tmp_path):
    """train.deterministic on the device: 2 epochs straight == 1 epoch, killed, resumed for the 2nd."""
    from safetensors.torch import load_file

    from lesionlab.training.fit import fit

    cfg = _cfg(epochs=2, deterministic=True, max_steps_per_epoch=2 if DRY else 10)
    try:
        fit(TINY, data["train"], data["val"], cfg, tmp_path / "full", cache_dir=cache, progress=False)
        fit(TINY, data["train"], data["val"], cfg, tmp_path / "part", cache_dir=cache, progress=False,
            stop_after_epochs=1)
        fit(TINY, data["train"], data["val"], cfg, tmp_path / "part", cache_dir=cache, progress=False,
            resume=True)
    finally:
        torch.use_deterministic_algorithms(False)  # fit() switches it on process-wide
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    same = [k for k in a if torch.equal(a[k], b[k])]
    gpu_common.record("resume_identical_tensors", f"{len(same)}/{len(a)}")
    assert len(same) == len(a)


@pytest.fixture(scope="module")
def trained(data, cache, tmp_path_factory):
    """A paper architecture trained briefly on the device (real images), so its predictions are not all one class."""
    from lesionlab.training.fit import fit

    arch = TINY if DRY else "resnet101"
    out = tmp_path_factory.mktemp("pred") / "run"
    cfg = _cfg(epochs=1, max_steps_per_epoch=2 if DRY else 0)
    fit(arch, data["train"], data["val"], cfg, out, cache_dir=cache, progress=False)
    return out


def test_predictor_on_device_agrees_with_cpu_fp32(trained, data):
    from lesionlab.inference.predictor import Predictor

    test = data["test"].iloc[: 32 if DRY else 256]
    workers = 0 if DRY else min(8, os.cpu_count() or 1)
    # The device's own fast path (bf16 autocast on CUDA); the dry run compares CPU fp32 with itself.
    dev = Predictor(trained, device=DEVICE.type, precision="fp32" if DRY else "auto")
    ref = Predictor(trained, device="cpu", precision="fp32")
    p_dev = dev.predict_frame(test, batch_size=64, num_workers=workers, progress=False)
    p_ref = ref.predict_frame(test, batch_size=64, num_workers=workers, progress=False)
    agree = float((p_dev.argmax(1) == p_ref.argmax(1)).mean())
    gpu_common.record("predictor_agreement", {"images": len(test), "top1_agreement": agree,
                                              "max_abs_prob_diff": float(np.abs(p_dev - p_ref).max()),
                                              "classes_predicted": int(len(set(p_ref.argmax(1)))),
                                              "device_precision": str(dev.amp)})
    assert agree >= 0.99, agree


def test_gradcam_on_device_matches_cpu(trained, data):
    from PIL import Image

    from lesionlab.explain.gradcam import model_maps
    from lesionlab.inference.predictor import Predictor

    dev = Predictor(trained, device=DEVICE.type, precision="fp32")
    ref = Predictor(trained, device="cpu", precision="fp32")
    corr, diffs = [], []
    for path in data["test"]["path"].iloc[:4]:
        x = ref.prepare([Image.open(path).convert("RGB")])
        k = int(ref.predict_batch(x).argmax())
        a, b = model_maps(dev, x, k, "gradcam"), model_maps(ref, x, k, "gradcam")
        diffs.append(float(np.abs(a - b).mean()))
        corr.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else 1.0)
    gpu_common.record("gradcam_device_vs_cpu", {"min_correlation": min(corr), "max_mean_abs_diff": max(diffs)})
    assert min(corr) >= 0.99 and max(diffs) <= 0.02, (corr, diffs)


def test_ddp_step_through_torchrun(tmp_path):
    """One DistributedDataParallel step launched by torchrun: NCCL on GPUs (one process per GPU), gloo on CPU."""
    nproc = torch.cuda.device_count() if CUDA else 1
    out = tmp_path / "ddp.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ddp_step.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           "--backend", gpu_common.ddp_backend(), "--arch", TINY if DRY else "resnext101_32x4d",
           "--size", str(SIZE), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    gpu_common.record("ddp", got)
    assert got["world_size"] == nproc and got["backend"] == gpu_common.ddp_backend()
    assert got["replicas_in_sync"] and got["weights_changed"] and np.isfinite(got["loss"])


def test_gpu_augmentation_matches_the_cpu_transform_on_real_images(data):
    """One preprocessing path on the device: real frames, drawn parameters, augmented on DEVICE == CPU path within 1/255."""
    import time

    from lesionlab.data.dataset import make_dataset
    from lesionlab.data.gpu_augment import augment_batch, training_transforms
    from lesionlab.data.transforms import DataSpec

    spec = DataSpec(input_size=SIZE)
    opts = {"spec": spec, "rotation": 180.0, "hflip": True, "vflip": True, "color_jitter": 0.0}
    df = data["train"].iloc[: 16 if DRY else 128]
    mk = {"input_size": SIZE, "crop_fraction": spec.crop_fraction, "cache_dir": None}
    gpu_ds = make_dataset(df, training_transforms(**opts, device_side=True)[0], **mk)
    cpu_ds = make_dataset(df, training_transforms(**opts, device_side=False)[0], **mk)
    idx = [(i, 1000 + i) for i in range(len(df))]  # (index, per-sample seed), as EpochSampler yields them
    items = [gpu_ds[k][0] for k in idx]
    frames = torch.stack([it["image"] for it in items]).to(DEVICE)
    geometry = torch.stack([it["geometry"] for it in items])
    out = augment_batch(frames, geometry, spec=spec).cpu()
    ref = torch.stack([cpu_ds[k][0] for k in idx])
    diff = ((out - ref) * torch.tensor(spec.std).view(1, 3, 1, 1)).abs()
    rec = {"images": len(df), "max_diff_255": float(diff.max()) * 255, "share_differing": float((diff > 1e-6).float().mean())}
    # the same through DeviceLoader (pinned batches; on CUDA, copied and augmented on a side stream ahead of use)
    from lesionlab.data.gpu_augment import DeviceLoader

    dl = DeviceLoader(torch.utils.data.DataLoader(gpu_ds, batch_size=8, sampler=idx, pin_memory=CUDA), spec=spec,
                      device=DEVICE)
    via_loader = torch.cat([x.cpu() for x, _ in dl])
    rec["loader_max_diff_255"] = float(((via_loader - ref) * torch.tensor(spec.std).view(1, 3, 1, 1)).abs().max()) * 255
    if CUDA:  # the augmentation kernels alone, on a batch of 128 frames already on the GPU
        big = frames[torch.arange(128) % len(frames)]
        geo = geometry[torch.arange(128) % len(frames)]
        augment_batch(big, geo, spec=spec)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            augment_batch(big, geo, spec=spec)
        torch.cuda.synchronize()
        rec["augment_images_per_s"] = round(20 * 128 / (time.perf_counter() - t))
    gpu_common.record("gpu_augment_vs_cpu", rec)
    assert rec["max_diff_255"] <= 1.0 + 1e-4 and rec["loader_max_diff_255"] <= 1.0 + 1e-4, rec


def test_fit_trains_through_the_gpu_augmentation_path(data, cache, tmp_path):
    """`fit` with data.gpu_augment on (what auto picks on CUDA; the dry run forces it on the CPU)."""
    import pandas as pd

    from lesionlab.training.fit import HISTORY_FILE, fit

    cfg = _cfg(epochs=1, max_steps_per_epoch=2 if DRY else 20)
    cfg.data.gpu_augment = "on"
    done = fit(TINY, data["train"], data["val"], cfg, tmp_path / "run", cache_dir=cache, progress=False)
    hist = pd.read_csv(tmp_path / "run" / HISTORY_FILE)
    gpu_common.record("fit_gpu_augment", {"val_loss": float(hist["val_loss"].iloc[-1]), "seconds": float(hist["seconds"].iloc[-1])})
    assert done["epochs"] == 1 and np.isfinite(hist[["train_loss", "val_loss"]].to_numpy()).all()
