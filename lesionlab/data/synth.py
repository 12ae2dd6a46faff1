"""Synthetic dermoscopy-like data in the HAM10000 layout, for the demo and the tests.

Each class has a visible signature (colour, shape, texture) so that a small CNN learns it in a few epochs;
each lesion has 1-6 images that are rotation / zoom / lighting variants of it. Not medical data.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from lesionlab.data.tables import HAM_METADATA
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv
from lesionlab.labels import CLASS_TO_DX, CLASSES

# HAM10000 image counts per class (Tschandl et al. 2018).
HAM_COUNTS = {"MEL": 1113, "NV": 6705, "BCC": 514, "AKIEC": 327, "BKL": 1099, "DF": 115, "VASC": 142}


LOCALIZATIONS = ["back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "scalp", "neck"]


# With `metadata_signal` > 0, a lesion's body site is its class's site with that probability (a signal that only a
# metadata-fusion model can use; tests/test_fusion.py).
CLASS_SITE = {"MEL": "back", "NV": "lower extremity", "BCC": "face", "AKIEC": "scalp", "BKL": "trunk",
              "DF": "foot", "VASC": "neck"}


# Per class: base RGB colour, secondary colour, radius range (share of the short side), lobes, texture.
STYLE = {
    "MEL": dict(c1=(45, 25, 20), c2=(70, 80, 120), r=(0.28, 0.38), lobes=7, irregular=0.45, texture="blotch"),
    "NV": dict(c1=(125, 80, 50), c2=(110, 70, 45), r=(0.20, 0.30), lobes=0, irregular=0.05, texture="none"),
    "BCC": dict(c1=(225, 160, 165), c2=(190, 30, 40), r=(0.20, 0.30), lobes=0, irregular=0.15, texture="vessels"),
    "AKIEC": dict(c1=(200, 80, 70), c2=(245, 235, 225), r=(0.22, 0.32), lobes=5, irregular=0.30, texture="scale"),
    "BKL": dict(c1=(175, 135, 85), c2=(80, 55, 35), r=(0.22, 0.32), lobes=4, irregular=0.20, texture="dots"),
    "DF": dict(c1=(150, 95, 70), c2=(240, 230, 220), r=(0.12, 0.18), lobes=0, irregular=0.05, texture="ring"),
    "VASC": dict(c1=(150, 20, 60), c2=(90, 10, 70), r=(0.16, 0.24), lobes=0, irregular=0.10, texture="lobules"),
}


def _class_counts(n_images: int, min_per_class: int) -> dict[str, int]:
    total = sum(HAM_COUNTS.values())
    counts = {c: max(min_per_class, round(n_images * k / total)) for c, k in HAM_COUNTS.items()}
    counts["NV"] = max(min_per_class, counts["NV"] + n_images - sum(counts.values()))
    return counts


def _lesion_sizes(n: int, rng: np.random.Generator, min_lesions: int = 3, force_six: bool = False) -> list[int]:
    """Split n images into lesions of 1-6 images (mostly 1-2, as in HAM10000), at least `min_lesions` of them.

    `force_six` starts with a 6-image lesion (when n allows), so the multi-image case is always present.
    """
    min_lesions = min(min_lesions, n)
    sizes: list[int] = [6] if force_six and n >= 6 + min_lesions else []
    left = n - sum(sizes)
    p = np.array([0.62, 0.2, 0.08, 0.05, 0.03, 0.02])
    while left > 0:
        still_needed = max(0, min_lesions - len(sizes) - 1)  # lesions that must follow this one
        k = int(min(rng.choice(6, p=p) + 1, left - still_needed))
        sizes.append(max(1, k))
        left -= sizes[-1]
    return sizes


def _blob(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, lobes: int, irregular: float, phase: np.ndarray, fill):
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    rad = np.ones_like(t)
    for k in range(1, 6):
        rad += irregular * phase[k, 0] / k * np.cos(k * t + phase[k, 1])
    if lobes:
        rad += irregular * 0.6 * np.cos(lobes * t + phase[0, 1])
    rad = np.clip(rad, 0.45, 1.6) * r
    draw.polygon(list(zip(cx + rad * np.cos(t), cy + rad * 0.8 * np.sin(t), strict=True)), fill=fill)


@functools.lru_cache(maxsize=4)
def _vignette(w: int, h: int) -> np.ndarray:
    """Dark dermoscope corners: a radial brightness factor (h, w, 1)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    return np.clip(1.25 - 0.45 * d2, 0.35, 1.0)[..., None].astype(np.float32)


@functools.lru_cache(maxsize=4)
def _noise_field(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((h + 64, w + 64, 3), dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    """Pixel noise: a random window of one cached field (drawing fresh normals per image is the slow part)."""
    h, w = shape[:2]
    oy, ox = rng.integers(0, 64, 2)
    return _noise_field(h, w)[oy : oy + h, ox : ox + w] * np.float32(sd)


def render_lesion(cls: str, params: dict, size: tuple[int, int], variant: dict) -> Image.Image:
    """Draw one image of a lesion: class style + lesion parameters + this image's variant."""
    w, h = size
    rng = np.random.default_rng(params["seed"] * 7 + variant["k"])
    st = STYLE[cls]
    skin = np.array(params["skin"], dtype=float)
    # skin: smooth low-frequency tone variation + fine noise, dark dermoscope vignette at the corners
    low = rng.normal(0, 6, (6, 8, 3))
    low = np.asarray(Image.fromarray(np.uint8(np.clip(low + 128, 0, 255))).resize((w, h), Image.BICUBIC), float) - 128
    vign = _vignette(w, h)
    base = (skin.astype(np.float32) + low.astype(np.float32) + _noise(rng, (h, w, 3), 4.0)) * vign

    s = min(w, h)
    zoom = variant["zoom"]
    r = params["r"] * s * zoom
    cx = w / 2 + params["dx"] * s * 0.15
    cy = h / 2 + params["dy"] * s * 0.15
    mask = Image.new("L", (w, h), 0)
    _blob(ImageDraw.Draw(mask), cx, cy, r, st["lobes"], st["irregular"], params["phase"], 255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1, s // 120)))
    lesion = np.ones((h, w, 3), np.float32) * np.array(params["c1"], dtype=np.float32)
    tex = Image.new("L", (w, h), 0)
    td = ImageDraw.Draw(tex)
    kind = st["texture"]
    prng = np.random.default_rng(params["seed"])
    if kind == "blotch":  # melanoma: blue-grey veil + black blotches, asymmetric
        for _ in range(5):
            bx, by = cx + prng.normal(0, r * 0.4), cy + prng.normal(0, r * 0.3)
            _blob(td, bx, by, r * prng.uniform(0.2, 0.45), 3, 0.5, prng.normal(0, 1, (6, 2)), 255)
    elif kind == "vessels":  # BCC: thin red branching lines
        for _ in range(7):
            pts = [(cx + prng.normal(0, r * 0.5), cy + prng.normal(0, r * 0.4))]
            for _ in range(4):
                pts.append((pts[-1][0] + prng.normal(0, r * 0.25), pts[-1][1] + prng.normal(0, r * 0.25)))
            td.line(pts, fill=255, width=max(1, s // 150))
    elif kind == "scale":  # AKIEC: white scaly speckles
        for _ in range(int(60 * zoom)):
            px, py = cx + prng.normal(0, r * 0.45), cy + prng.normal(0, r * 0.35)
            q = max(1, s // 90)
            td.rectangle([px, py, px + q, py + q], fill=255)
    elif kind == "dots":  # BKL: dark comedo-like dots
        for _ in range(30):
            px, py = cx + prng.normal(0, r * 0.45), cy + prng.normal(0, r * 0.35)
            q = max(1, s // 70)
            td.ellipse([px - q, py - q, px + q, py + q], fill=255)
    elif kind == "ring":  # DF: white central patch
        td.ellipse([cx - r * 0.45, cy - r * 0.38, cx + r * 0.45, cy + r * 0.38], fill=255)
    elif kind == "lobules":  # VASC: dark red-purple lobules
        for _ in range(6):
            px, py = cx + prng.normal(0, r * 0.4), cy + prng.normal(0, r * 0.3)
            q = r * prng.uniform(0.18, 0.3)
            td.ellipse([px - q, py - q, px + q, py + q], fill=255)
    tex_a = np.asarray(tex.filter(ImageFilter.GaussianBlur(max(1, s // 300))), np.float32)[..., None] / 255
    lesion = lesion * (1 - tex_a) + np.array(params["c2"], np.float32) * tex_a
    lesion += _noise(rng, lesion.shape, 5.0)
    a = np.asarray(mask, np.float32)[..., None] / 255 * 0.92
    img = base * (1 - a) + lesion * vign * a
    img = img * variant["light"]
    out = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    return out.rotate(variant["angle"], resample=Image.BILINEAR, fillcolor=tuple(int(v * 0.35) for v in skin))


def make_synthetic(
    out_dir: str | Path,
    *,
    n_images: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (600, 450),
    min_per_class: int = 6,
    progress: bool = True,
    metadata_signal: float = 0.0,
) -> pd.DataFrame:
    """Write `HAM10000_metadata.csv` and `images/<image_id>.jpg` under `out_dir`; return the metadata.

    Args:
        metadata_signal: probability that a lesion's body site is its class's `CLASS_SITE` (0: sites at random).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta, jobs = _plan(n_images, seed, min_per_class, metadata_signal)

    def one(job) -> None:
        iid, cls, params, variant = job
        render_lesion(cls, params, size, variant).save(out / "images" / f"{iid}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy and PIL release the GIL
        list(tqdm(pool.map(one, jobs), total=len(jobs), desc="synthesising images", disable=not progress))
    atomic_write_csv(out / HAM_METADATA, meta)
    return meta


def _plan(n_images: int, seed: int, min_per_class: int, metadata_signal: float) -> tuple[pd.DataFrame, list]:
    """The metadata of a synthetic dataset and the render job of each image (image id, class, lesion, variant)."""
    rng = np.random.default_rng(seed)
    site_rng = np.random.default_rng([seed, 1])  # its own stream: datasets without the signal stay as they were
    rows = []
    lesion_no, image_no = 0, 0
    jobs = []
    for cls, n in _class_counts(n_images, min_per_class).items():
        for k in _lesion_sizes(n, rng, force_six=cls == "NV"):
            lesion_no += 1
            st = STYLE[cls]
            tone = rng.uniform(0.75, 1.05)
            params = dict(
                seed=int(rng.integers(1 << 30)),
                skin=tuple(np.clip(np.array([225, 180, 155]) * tone + rng.normal(0, 6, 3), 0, 255)),
                c1=tuple(np.clip(np.array(st["c1"]) + rng.normal(0, 12, 3), 0, 255)),
                c2=tuple(np.clip(np.array(st["c2"]) + rng.normal(0, 10, 3), 0, 255)),
                r=rng.uniform(*st["r"]),
                dx=rng.uniform(-1, 1),
                dy=rng.uniform(-1, 1),
                phase=rng.normal(0, 1, (6, 2)),
            )
            sex = str(rng.choice(["male", "female"]))
            age = float(np.clip(round(rng.normal(62 if cls in ("MEL", "BCC", "AKIEC", "BKL") else 45, 14) / 5) * 5, 5, 85))
            loc = str(rng.choice(LOCALIZATIONS))
            if metadata_signal > 0 and site_rng.random() < metadata_signal:
                loc = CLASS_SITE[cls]
            dx_type = "histo" if cls in ("MEL", "BCC", "AKIEC") else str(rng.choice(["histo", "follow_up", "consensus"]))
            for v in range(k):
                image_no += 1
                iid = f"ISIC_{image_no:07d}"
                variant = dict(k=v, angle=float(rng.uniform(-180, 180)), zoom=float(rng.uniform(0.85, 1.15)), light=float(rng.uniform(0.85, 1.1)))
                jobs.append((iid, cls, params, variant))
                rows.append(dict(lesion_id=f"HAM_{lesion_no:07d}", image_id=iid, dx=CLASS_TO_DX[cls], dx_type=dx_type, age=age, sex=sex, localization=loc))
    return pd.DataFrame(rows), jobs


def classes_present(meta: pd.DataFrame) -> list[str]:
    return [c for c in CLASSES if (meta["dx"] == CLASS_TO_DX[c]).any()]


# ----------------------------------------------------------------------------- several synthetic clinics

# The synthetic sources of the demo (`synth_sources`), `lesionlab cross-site --synthetic` and the tests: one colour
# cast (R, G, B gains) per clinic, so a model trained at one clinic meets a shifted distribution at another.
SYNTH_SOURCES: dict[str, tuple[float, float, float]] = {
    "clinic_a": (1.0, 1.0, 1.0), "clinic_b": (1.2, 0.95, 0.75), "clinic_c": (0.8, 0.95, 1.25)}


def sources_min_per_class(n_sources: int) -> int:
    """Images per class at least, so that each of `n_sources` clinics gets every class (6 for one source)."""
    return max(6, 3 * n_sources)


def make_synthetic_sources(out_dir: str | Path, *, n_images: int = 300, seed: int = 0,
                           size: tuple[int, int] = (600, 450), sources: dict[str, tuple[float, float, float]] | None = None,
                           progress: bool = True) -> pd.DataFrame:
    """A synthetic HAM10000-layout dataset whose lesions come from several clinics, each with its own colour cast.

    Lesions of each class are dealt round-robin (seeded order) to the clinics, so every clinic has every class
    with at least as many lesions as clinics; the `dataset` column names the clinic, as HAM10000's does. Images
    are written by lesionlab.data.synth and then tinted by their clinic's (R, G, B) gains.
    """
    srcs = dict(sources or SYNTH_SOURCES)
    out = Path(out_dir)
    meta = make_synthetic(out, n_images=n_images, seed=seed, size=size, min_per_class=sources_min_per_class(len(srcs)),
                          progress=progress)
    meta["dataset"] = _clinics(meta, list(srcs), seed)
    for iid, src in zip(meta["image_id"], meta["dataset"], strict=True):
        gains = np.asarray(srcs[src], np.float32)
        if np.allclose(gains, 1.0):
            continue
        f = out / "images" / f"{iid}.jpg"
        im = np.asarray(Image.open(f).convert("RGB"), np.float32) * gains
        Image.fromarray(np.uint8(np.clip(im, 0, 255))).save(f, quality=90)
    atomic_write_csv(out / HAM_METADATA, meta)
    return meta


def _clinics(meta: pd.DataFrame, names: list[str], seed: int) -> pd.Series:
    """Each image's clinic: the lesions of each class dealt round-robin (seeded order) to the clinics."""
    rng = np.random.default_rng([seed, 7])
    site: dict[str, str] = {}
    for _, g in meta.groupby("dx", sort=True):
        lesions = list(dict.fromkeys(g["lesion_id"]))
        for k, les in enumerate(rng.permutation(lesions)):
            site[str(les)] = names[k % len(names)]
    return meta["lesion_id"].map(site)


def _clinic_casts(sources: int) -> dict[str, tuple[float, float, float]]:
    """The first `sources` synthetic clinics and their colour casts (`synth_sources`, checked here)."""
    if not 1 <= sources <= len(SYNTH_SOURCES):
        raise UserError(f"synth_sources {sources} must be between 1 and {len(SYNTH_SOURCES)} (synthetic clinics: "
                        f"{', '.join(SYNTH_SOURCES)})")
    return dict(list(SYNTH_SOURCES.items())[:sources])


def synthetic_metadata(n_images: int, seed: int, sources: int = 1) -> pd.DataFrame:
    """The metadata `synthesize` writes for these settings, without making any image (for planning a demo's work)."""
    casts = _clinic_casts(sources)
    meta = _plan(n_images, seed, sources_min_per_class(sources), 0.0)[0]
    if sources > 1:
        meta["dataset"] = _clinics(meta, list(casts), seed)
    return meta


def synthesize(out_dir: str | Path, *, n_images: int, seed: int, size: tuple[int, int], sources: int = 1,
               progress: bool = True) -> pd.DataFrame:
    """The demo's synthetic dataset: one source (`make_synthetic`), or `sources` clinics (`make_synthetic_sources`)."""
    casts = _clinic_casts(sources)
    if sources == 1:
        return make_synthetic(out_dir, n_images=n_images, seed=seed, size=size, progress=progress)
    return make_synthetic_sources(out_dir, n_images=n_images, seed=seed, size=size, progress=progress, sources=casts)
