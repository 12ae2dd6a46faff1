"""The training augmentation run batched on the training device (the GPU path, `data.gpu_augment`).

The paper's augmentation is a random rotation of the square frame, its centre crop, optional flips and the
normalisation. On the CPU path (`transforms.build_train_transform`) every DataLoader worker does all of it per
image in float32 and ships 224x224 float32 images (600 KB each) to the GPU, and 16 workers could not feed
ResNeXt-101 faster than about 1,600 images/s on an H100. Here the work is split:

- worker (CPU, per image, `WorkerStep`): the uint8 square frame (`transforms.build_frame_transform`: from the
  image cache, or decoded and resized once; colour constancy when configured) and the sample's geometry drawn by
  `transforms.draw_geometry`, the CPU path's own sampler, under the same per-sample seed
  (`dataset.LesionDataset`). It returns `{"image": uint8 (3, F, F), "geometry": (angle, hflip, vflip)}`.
- device (per batch, `augment_batch`): one `grid_sample` rotates every frame by its own angle and samples only
  the centre crop's pixels, then the flips and the normalisation; `DeviceLoader` applies it to a DataLoader.

So the resize is not repeated on the device: it is the frame, done once (the cache stores it), as on the CPU
path and at inference; the device does the per-epoch work. Both paths give the same tensors within float32
rounding (tests/test_gpu_augment.py: at most 1/255 apart before normalisation, the rotation reproducing
torchvision's `rotate` kernel: its inverse matrix, pixel-centre grid, bilinear sampling, black fill through a
sampled mask, rounding to uint8), and the parameters are identical by construction, so `train --resume` and
the per-sample seeding keep their meaning.

Pure torch on purpose, not NVIDIA DALI: what is left after the cache is a few hundred MFLOP per batch, which
torch's `grid_sample` does in well under a millisecond per batch on a GPU; DALI's strength, JPEG decoding on the
GPU, is moot once images are decoded once into the cache; its rotation kernel is not torchvision's, so the two
paths would no longer agree pixel for pixel (the one-preprocessing-path rule); and it is a large extra
dependency that the lent GPU machines do not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lesionlab.data.transforms import (
    DataSpec,
    build_eval_transform,
    build_frame_transform,
    build_train_transform,
    draw_geometry,
    frame_size,
)
from lesionlab.exceptions import UserError

MODES = ("auto", "on", "off")
# YAML 1.1 reads a bare on / off as a boolean, which the config stores as the string "True" / "False".
_ALIASES = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}


def gpu_augment_mode(value: str | bool) -> str:
    """`data.gpu_augment` as one of MODES (`on` / `off` also arrive as YAML booleans); a one-line error otherwise."""
    mode = str(value).strip().lower()
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise UserError(f"data.gpu_augment {value!r} must be one of {', '.join(MODES)}")
    return mode


def use_gpu_augment(mode: str | bool, device: torch.device | str, *, color_jitter: float = 0.0) -> bool:
    """Whether training augments on the device: `auto` = on for CUDA, off elsewhere; `on` / `off` as said.

    Colour jitter has no batched version here, so `auto` keeps the CPU path when it is on and `on` refuses it.
    `on` also works on a CPU device (the same functions; the tests and the CPU benchmark use it).
    """
    mode = gpu_augment_mode(mode)
    if mode == "off":
        return False
    if color_jitter > 0:
        if mode == "on":
            raise UserError("data.gpu_augment=on cannot apply data.color_jitter > 0; "
                            "set data.gpu_augment=auto or off, or data.color_jitter=0")
        return False
    return mode == "on" or torch.device(device).type == "cuda"


class WorkerStep(torch.nn.Module):
    """The GPU path's per-image work in a DataLoader worker: the uint8 frame and this sample's geometry.

    Returns `{"image": uint8 (3, F, F), "geometry": float64 (3,)}`; `rotation=0` and no flips (evaluation) give
    zeros, which `augment_batch` turns into the plain centre crop.
    """

    def __init__(self, *, spec: DataSpec, rotation: float = 0.0, hflip: bool = False, vflip: bool = False):
        super().__init__()
        self.frame = build_frame_transform(spec=spec)
        self.rotation, self.hflip, self.vflip = float(rotation), bool(hflip), bool(vflip)

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        frame = self.frame(img)
        geometry = draw_geometry(rotation=self.rotation, hflip=self.hflip, vflip=self.vflip)
        return {"image": frame, "geometry": geometry}


def training_transforms(*, spec: DataSpec, rotation: float, hflip: bool, vflip: bool, color_jitter: float,
                        device_side: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(train, eval) per-image transforms: the CPU path's whole ones, or the GPU path's `WorkerStep`s."""
    if not device_side:
        return (build_train_transform(spec=spec, rotation=rotation, hflip=hflip, vflip=vflip, color_jitter=color_jitter),
                build_eval_transform(spec=spec))
    return WorkerStep(spec=spec, rotation=rotation, hflip=hflip, vflip=vflip), WorkerStep(spec=spec)


def crop_anchor(frame: int, size: int) -> int:
    """Top (= left) of the centre `size` square in a `frame` square, as torchvision's `center_crop` places it."""
    return int(round((frame - size) / 2.0))


def _base_grid(frame: int, size: int, device: torch.device) -> torch.Tensor:
    """(size*size, 3) homogeneous pixel-centre coordinates of the crop window, relative to the frame centre.

    torchvision's `_affine_grid` builds them for the whole frame; the crop's rows and columns are a slice of those
    (half-integers, exact in float32), so only the pixels the crop keeps are sampled. Made on the device itself
    (no host-to-device copy in the hot path).
    """
    off = (1.0 - frame) * 0.5 + crop_anchor(frame, size)
    coords = torch.arange(size, dtype=torch.float32, device=device) + off
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x, y, torch.ones_like(x)], dim=-1).reshape(size * size, 3)


def rotation_grid(angles: torch.Tensor, *, frame: int, size: int) -> torch.Tensor:
    """`grid_sample` grid (N, size, size, 2) of the centre crop of each frame rotated by its angle (degrees), on
    the angles' device.

    The matrix is torchvision's `rotate`: the inverse affine matrix of -angle about the centre, computed in float64,
    used in float32, scaled by half the frame; one per sample.
    """
    rad = torch.deg2rad(-torch.remainder(angles.to(torch.float64), 360.0))
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], 1).float()
    scaled = theta.transpose(1, 2) / (0.5 * frame)  # square frame: both columns by the same half side
    return torch.matmul(_base_grid(frame, size, angles.device), scaled).view(-1, size, size, 2)


def rotate_crop(frames: torch.Tensor, angles: torch.Tensor, *, size: int) -> torch.Tensor:
    """uint8 (N, 3, F, F) frames -> float32 (N, 3, size, size) in 0..255 (whole numbers): each frame rotated by its
    angle (on the frames' device), bilinear, black outside the frame, and its centre crop; `apply_geometry`'s
    rotate + crop, batched."""
    n, c, h, w = frames.shape
    if h != w:
        raise ValueError(f"expected square frames, got {h}x{w}")
    x = torch.empty((n, c + 1, h, w), dtype=torch.float32, device=frames.device)
    x[:, :c].copy_(frames)
    x[:, c].fill_(1.0)  # torchvision's fill mask: sampled alongside, it fades the image into the black fill
    grid = rotation_grid(angles.to(frames.device), frame=h, size=size)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = out[:, :c], out[:, c:]
    return img.mul_(mask).round_()


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To `device` without making the host wait: pinned and asynchronous for CUDA."""
    if device.type == "cuda" and not x.is_cuda:
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device)


def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) float32 on `device`, filled there (no host-to-device copy)."""
    t = torch.empty(len(values), dtype=torch.float32, device=device)
    for i, v in enumerate(values):
        t[i].fill_(v)
    return t.view(1, -1, 1, 1)


def augment_batch(frames: torch.Tensor, geometry: torch.Tensor | None, *, spec: DataSpec,
                  channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, 3, F, F) frames + (N, 3) geometry (`draw_geometry` rows) -> normalised float32 (N, 3, S, S).

    The batched equal of `transforms.apply_geometry` followed by ToDtype + Normalize, on `frames.device`. Pass
    `geometry` on the CPU (as the DataLoader yields it, pinned on CUDA): which steps run is decided there, without
    waiting for the device. None (or all zeros) is the evaluation crop.
    """
    size = spec.input_size
    f = frames.shape[-1]
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected uint8 (N, 3, H, W) frames, got {frames.dtype} {tuple(frames.shape)}")
    if f != frame_size(size, spec.crop_fraction):
        raise ValueError(f"frames are {f} px; input size {size} at crop {spec.crop_fraction:g} needs "
                         f"{frame_size(size, spec.crop_fraction)} px frames (transforms.build_frame_transform)")
    host = torch.zeros((len(frames), 3), dtype=torch.float64) if geometry is None else geometry.cpu()
    rotate, hflip, vflip = bool((host[:, 0] != 0).any()), bool((host[:, 1] > 0).any()), bool((host[:, 2] > 0).any())
    dev = _to(host, frames.device) if rotate or hflip or vflip else None
    if rotate:
        x = rotate_crop(frames, dev[:, 0], size=size)
    else:
        top = crop_anchor(f, size)
        x = frames[..., top:top + size, top:top + size].float()
    if hflip:
        x = torch.where((dev[:, 1] > 0).view(-1, 1, 1, 1), x.flip(-1), x)
    if vflip:
        x = torch.where((dev[:, 2] > 0).view(-1, 1, 1, 1), x.flip(-2), x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # torchvision's ToDtype(scale=True) then Normalize, the same float32 operations in the same order.
    mean, std = _channel_values(spec.mean, x.device), _channel_values(spec.std, x.device)
    return x.mul_(1.0 / 255).sub_(mean).div_(std)


def _is_worker_batch(x: Any) -> bool:
    return isinstance(x, dict) and "image" in x and "geometry" in x


class DeviceLoader:
    """A DataLoader of `WorkerStep` items whose batches come out augmented on `device`: (float images, targets).

    Works under metadata fusion too (`models.fusion.MetadataDataset` batches `[images, metadata]`); `len`,
    `dataset` and `sampler` are the wrapped loader's, so training loops need no change.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, *, spec: DataSpec, device: torch.device | str,
                 channels_last: bool = True):
        self.loader, self.spec, self.device, self.channels_last = loader, spec, torch.device(device), channels_last

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    def convert(self, x: Any) -> Any:
        if _is_worker_batch(x):
            return augment_batch(_to(x["image"], self.device), x["geometry"], spec=self.spec,
                                 channels_last=self.channels_last)
        if isinstance(x, list | tuple) and x and _is_worker_batch(x[0]):
            return [self.convert(x[0]), *x[1:]]
        raise TypeError("DeviceLoader expects batches of WorkerStep items ({'image', 'geometry'})")

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        if self.device.type != "cuda":
            for x, y in self.loader:
                yield self.convert(x), y
            return
        # CUDA: the next batch is copied and augmented on a side stream while the model works on this one.
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(device=self.device)

        def stage(batch):
            with torch.cuda.stream(side):
                x, y = batch
                return self.convert(x), _to(y, self.device)

        it = iter(self.loader)
        ahead = next(it, None)
        ahead = stage(ahead) if ahead is not None else None
        while ahead is not None:
            main.wait_stream(side)
            x, y = ahead
            for t in (x if isinstance(x, list) else [x]) + [y]:
                if t.is_cuda:  # made on the side stream, used on the main one: keep the allocator from reusing it early
                    t.record_stream(main)
            ahead = next(it, None)
            ahead = stage(ahead) if ahead is not None else None
            yield x, y


def on_device(loader: torch.utils.data.DataLoader, *, spec: DataSpec, device: torch.device | str, enabled: bool,
              channels_last: bool = True):
    """`loader` itself for the CPU path, or wrapped in a `DeviceLoader` for the GPU path."""
    return DeviceLoader(loader, spec=spec, device=device, channels_last=channels_last) if enabled else loader
