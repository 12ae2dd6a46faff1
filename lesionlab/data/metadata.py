"""Patient metadata (age, sex, body site, ...): reading, cleaning, and the encoding a fused model is trained with.

Pure numpy/pandas. The encoding is a small JSON-serialisable spec fitted on the training rows and stored in the
checkpoint sidecar, so inference encodes exactly as training did:

- a numeric field (all known training values are numbers, e.g. age): `(value - mean) / std`, 0 when missing,
  plus a missing indicator;
- a categorical field (sex, localization): one-hot over the training vocabulary, all zeros when missing or
  when the value was never seen in training, plus a missing indicator (set in both cases).

Missing means empty, NaN or a placeholder such as "unknown" (HAM10000 writes sex and site as "unknown").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.exceptions import UserError

MISSING = "unknown"
_MISSING_VALUES = {"", "nan", "none", "unknown", "na", "n/a", "null"}

# Names people use for the same field (the service's form says `site`; HAM10000 says `localization`).
ALIASES = {"site": "localization", "body_site": "localization", "anatom_site_general": "localization"}


def clean_value(v: Any) -> str:
    """One value as a stripped string; missing values become `MISSING`; numbers like 3.0 become '3'."""
    if isinstance(v, float | np.floating) and np.isfinite(v) and float(v).is_integer():
        v = int(v)
    s = "" if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)) else str(v).strip()
    return MISSING if s.lower() in _MISSING_VALUES else s


def clean_values(values: Sequence[Any]) -> np.ndarray:
    """`clean_value` over a sequence (object array)."""
    return np.array([clean_value(v) for v in values], dtype=object)


def _number(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def read_metadata(path: str | Path) -> pd.DataFrame:
    """A metadata table with an `image_id` (or `image`) column, read as strings (HAM10000_metadata.csv or any)."""
    from lesionlab.data.tables import read_csv_checked

    p = Path(path)
    df = read_csv_checked(p, "metadata", dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    if "image_id" not in df.columns and "image" in df.columns:
        df = df.rename(columns={"image": "image_id"})
    if "image_id" not in df.columns:
        raise UserError(f"{p}: needs an image_id (or image) column")
    df["image_id"] = df["image_id"].str.strip()
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"{p}: image {dup.iloc[0]} appears twice (row {dup.index[0] + 2})")
    return df.rename(columns={a: c for a, c in ALIASES.items() if a in df.columns and c not in df.columns})


def leaky_columns(fields: Sequence[str]) -> list[str]:
    """The fields that give the label away (a diagnosis, its one-hot columns, PAD-UFES-20's `biopsed`, ISIC 2020's
    `benign_malignant`, ...: lesionlab.data.sources.LEAKY_COLUMNS). The one place that decides which metadata
    columns a model may see: `MetadataEncoding.fit` refuses these."""
    from lesionlab.data.sources import LEAKY_COLUMNS

    return [f for f in fields if str(f).strip().lower() in LEAKY_COLUMNS or str(f).strip().lower() in
            {"label", "lesion_id", "patient_id", "image_id", "path", "source_label"}]


def check_model_columns(fields: Sequence[str], where: str = "train.metadata") -> None:
    """Raise a one-line UserError when a model would be fed a column that leaks the label or identifies the
    lesion / patient."""
    bad = leaky_columns(fields)
    if bad:
        raise UserError(f"{where} names {bad[0]!r}, a column that gives the label away (or identifies the lesion); "
                        "a model may not see it: remove it")


@dataclass
class MetadataEncoding:
    """How metadata fields become the fused model's input vector (see the module docstring)."""

    fields: list[str]
    numeric: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> {"mean", "std"}
    categories: dict[str, list[str]] = field(default_factory=dict)  # field -> training vocabulary

    @classmethod
    def fit(cls, df: pd.DataFrame, fields: Sequence[str]) -> MetadataEncoding:
        """Fit on training rows; a field is numeric when every known value is a number."""
        fields = [ALIASES.get(f, f) for f in fields]
        check_model_columns(fields)
        absent = [f for f in fields if f not in df.columns]
        if absent:
            raise UserError(f"train.metadata names {absent[0]!r}, but the dataset has no such column; "
                            f"columns: {', '.join(c for c in df.columns if c not in ('path', 'row'))}")
        enc = cls(fields=list(fields))
        for f in fields:
            vals = [v for v in clean_values(df[f].tolist()) if v != MISSING]
            nums = [_number(v) for v in vals]
            if vals and all(x is not None for x in nums):
                arr = np.asarray(nums, float)
                enc.numeric[f] = {"mean": float(arr.mean()), "std": float(arr.std()) or 1.0}
            else:
                enc.categories[f] = sorted(set(vals))
        return enc

    @property
    def columns(self) -> list[str]:
        """Name of each encoded feature, in order."""
        out: list[str] = []
        for f in self.fields:
            out += [f] if f in self.numeric else [f"{f}={c}" for c in self.categories[f]]
            out.append(f"{f}_missing")
        return out

    @property
    def dim(self) -> int:
        return len(self.columns)

    def encode(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]] | None, n: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """(N, dim) float32 features and, per row, the fields that were missing (or unseen, for categories).

        Args:
            rows: a frame, or one mapping per image (absent keys count as missing); None: `n` rows, all missing.
        """
        if rows is None:
            rows = [{}] * int(n or 0)
        recs = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
        recs = [{ALIASES.get(k, k): v for k, v in r.items()} for r in recs]
        out = np.zeros((len(recs), self.dim), np.float32)
        missing: list[list[str]] = [[] for _ in recs]
        for i, r in enumerate(recs):
            j = 0
            for f in self.fields:
                v = clean_value(r.get(f))
                if f in self.numeric:
                    x = _number(v) if v != MISSING else None
                    if x is None:
                        out[i, j + 1] = 1.0
                        missing[i].append(f)
                    else:
                        out[i, j] = (x - self.numeric[f]["mean"]) / self.numeric[f]["std"]
                    j += 2
                else:
                    vocab = self.categories[f]
                    if v in vocab:
                        out[i, j + vocab.index(v)] = 1.0
                    else:
                        out[i, j + len(vocab)] = 1.0
                        missing[i].append(f)
                    j += len(vocab) + 1
        return out, missing

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "columns": self.columns}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetadataEncoding:
        try:
            return cls(fields=list(d["fields"]), numeric=dict(d.get("numeric", {})), categories=dict(d.get("categories", {})))
        except (KeyError, TypeError):
            raise UserError(f"checkpoint sidecar: invalid metadata encoding {dict(d)!r}") from None


def lookup_rows(meta: pd.DataFrame | None, image_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One mapping per image id from a metadata table (empty for an image without a row)."""
    if meta is None:
        return [{} for _ in image_ids]
    by_id = meta.set_index("image_id").to_dict("index")
    return [by_id.get(str(i), {}) for i in image_ids]
