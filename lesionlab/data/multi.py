"""Several sources in one table: each read in its own layout, joined, and the images two sources share found.

ISIC 2019 contains HAM10000's images, and a clinic's export may hold another set's files under new names. Two
checks find such images:

- by file id: the same image id in two sources is one image; the first source's row is kept, the others dropped;
- by perceptual hash (ImageHash's pHash of the decoded image, robust to re-encoding and resizing): images of
  different sources whose 64-bit hashes differ in at most `max_distance` bits are linked, and the split keeps
  linked images in one part (lesionlab.data.split's duplicate groups).

Group ids are prefixed with the source, so lesion ids of two sources never merge by accident.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.exceptions import UserError
from lesionlab.labels import LabelSet, get_label_set

log = logging.getLogger(__name__)

PHASH_MAX_DISTANCE = 4  # bits of 64; re-encoded/resized copies of one image differ by 0-4, different lesions by ~30


def read_sources(items: Sequence[Mapping[str, str | Path]], *, labels: str | LabelSet | None = None):
    """One `Table` of several sources: each item has `data` (folder) and optional `metadata` and `name`.

    Rows keep their source's `source` name (given, or the folder's name); `lesion_id` is prefixed with it.
    Image ids found in an earlier source are dropped (counted in `Table.sources[i]["duplicate_ids"]`).
    """
    from lesionlab.data.tables import Table, read_table

    lset = get_label_set(labels)
    frames, notes, index, recs = [], [], {}, []
    seen: set[str] = set()
    names: set[str] = set()
    for item in items:
        data = Path(item["data"]) if item.get("data") else None
        meta = Path(item["metadata"]) if item.get("metadata") else None
        name = str(item.get("name") or (data.name if data else meta.stem))
        if name in names:
            raise UserError(f"two sources are named {name!r}; give each a distinct name (sources[].name)")
        names.add(name)
        t = read_table(data, meta, labels=lset, source=name)
        df = t.df.copy()
        df["source"] = name
        df["lesion_id"] = name + "/" + df["lesion_id"].astype(str)
        dup = df["image_id"].isin(seen)
        if dup.any():
            notes.append(f"{name}: {int(dup.sum())} images already in an earlier source (same file id); "
                         "the earlier source's row is kept")
        seen.update(df["image_id"])
        frames.append(df[~dup])
        notes += [f"{name}: {n}" for n in t.notes]
        index.update({k: v for k, v in t.image_index.items() if k not in index})
        recs.append({"name": name, "layout": t.layout, "metadata": str(t.source), "rows": int(len(df)),
                     "duplicate_ids": int(dup.sum()), "leaky": t.leaky, "skin_tone": t.skin_tone})
    if not frames:
        raise UserError("no sources given")
    df = pd.concat(frames, ignore_index=True, sort=False).fillna("")
    df["row"] = np.arange(len(df)) + 2
    first = recs[0]
    return Table(df=df, source=Path(first["metadata"]), layout="multi", notes=notes, image_index=index, labels=lset,
                 leaky=sorted({c for r in recs for c in r["leaky"]}),
                 skin_tone=next((r["skin_tone"] for r in recs if r["skin_tone"]), ""), sources=recs)


def phash_table(paths: Sequence[str | Path], *, max_pixels: int | None = None) -> np.ndarray:
    """64-bit pHash (ImageHash) of each image as uint64; 0 for an image that cannot be decoded."""
    import imagehash

    from lesionlab.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image

    out = np.zeros(len(paths), dtype=np.uint64)
    for i, p in enumerate(paths):
        try:
            img = load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        except ImageError:
            continue
        bits = imagehash.phash(img).hash.flatten()
        out[i] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between every uint64 of `a` (rows) and of `b` (columns)."""
    x = np.bitwise_xor(a[:, None], b[None, :])
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def cross_source_duplicates(df: pd.DataFrame, *, max_distance: int = PHASH_MAX_DISTANCE,
                            hashes: np.ndarray | None = None, chunk: int = 256) -> pd.DataFrame:
    """Pairs of images of *different* sources that look the same (pHash within `max_distance` bits).

    Returns:
        A frame `from_img, to_img, distance` (the duplicates format lesionlab.data.split reads).
    """
    paths = df["path"].tolist()
    h = phash_table(paths) if hashes is None else np.asarray(hashes, dtype=np.uint64)
    src = df["source"].to_numpy()
    ids = df["image_id"].to_numpy()
    ok = h != 0
    pairs = []
    for s in range(0, len(h), chunk):
        d = hamming(h[s:s + chunk], h)
        ii, jj = np.nonzero(d <= max_distance)
        for i, j in zip(ii + s, jj, strict=True):
            if i < j and ok[i] and ok[j] and src[i] != src[j]:
                pairs.append((ids[i], ids[j], int(d[i - s, j])))
    return pd.DataFrame(pairs, columns=["from_img", "to_img", "distance"])


def source_strata(df: pd.DataFrame) -> np.ndarray:
    """The split's strata for several sources: source and class together (every part gets each source's mix)."""
    return (df["source"].astype(str) + "|" + df["label"].astype(str)).to_numpy()


def with_duplicates_note(table, pairs: pd.DataFrame):
    """The table with a note on the duplicates found (for the validation record and the report)."""
    by_id = sum(r.get("duplicate_ids", 0) for r in table.sources)
    note = (f"images in two sources: {by_id} by file id (kept once), {len(pairs)} by perceptual hash "
            f"(pHash within {PHASH_MAX_DISTANCE} bits; kept in one split)")
    return dataclasses.replace(table, notes=[*table.notes, note])
