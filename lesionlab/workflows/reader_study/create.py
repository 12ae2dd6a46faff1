"""Create a reader study: pick the cases, compute the AI's answer for each, store them, invite readers.

Cases come from a study folder's test split (a lesion-unique sample, stratified by class) or from images + an
ISIC ground-truth CSV. The AI's answer for the aided arm is computed once, here, through the same calls the
clinician page makes (`EnsemblePredictor.predict`, then `.explain` for the heatmap; see `serve/app.py`
/api/predict), and stored: the aided phase shows exactly what the clinician page would have shown for the image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from PIL import Image

from lesionlab.clinic.shown import page_answer
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, MALIGNANT
from lesionlab.workflows.reader_study.db import Admin, Case, Reader, ReaderDB, Study, utcnow
from lesionlab.workflows.reader_study.errors import Conflict
from lesionlab.workflows.reader_study.reading import SCALES, check_admin, has_admin, study_named
from lesionlab.workflows.reader_study.tokens import new_token, token_hash

log = logging.getLogger(__name__)
JPEG_QUALITY = 95


@dataclass
class CreatedStudy:
    """What `create_study` made: the study name, its case count, the new admin token (only when this call created
    the database's admin), and one token per invited reader (shown once; the database keeps only hashes)."""

    name: str
    cases: int
    admin_token: str | None = None
    invitations: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- choosing the cases


def allocate(counts: dict[str, int], n: int) -> dict[str, int]:
    """Cases per class proportional to `counts`, summing to `n` (largest remainder; ties to the larger class, then
    class order). Written by hand because scikit-learn's equivalent (`_approximate_mode`) is private; the test
    checks it against `train_test_split(stratify=...)`."""
    total = sum(counts.values())
    if n > total:
        raise UserError(f"--cases {n}: only {total} distinct lesions are available; ask for at most {total}")
    exact = {c: n * k / total for c, k in counts.items()}
    out = {c: int(np.floor(v)) for c, v in exact.items()}
    rest = n - sum(out.values())
    order = sorted(counts, key=lambda c: (-(exact[c] - out[c]), -counts[c], list(counts).index(c)))
    for c in order[:rest]:
        out[c] += 1
    return out


def sample_cases(frame: pd.DataFrame, n: int, seed: int, lesion_of: dict[str, str] | None = None,
                 classes: Iterable[str] = CLASSES) -> pd.DataFrame:
    """A lesion-unique sample of `n` rows stratified by class: one random image per lesion, then per class a random
    sample of the lesions, the count per class proportional to the class's share of lesions (`allocate`).

    Args:
        frame: rows with image_id, label and path.
        n: number of cases.
        seed: sampling seed.
        lesion_of: image id -> lesion id (each image its own lesion when None).
        classes: the label set's classes (rows of other labels are left out).
    """
    classes = list(classes)
    if n < 1:
        raise UserError(f"--cases {n}: a study needs at least one case")
    df = frame[["image_id", "label", "path"]].copy()
    df = df[df["label"].isin(classes) & df["path"].notna()]
    df["lesion"] = df["image_id"].map(lesion_of) if lesion_of else df["image_id"]
    df["lesion"] = df["lesion"].fillna(df["image_id"])
    rng = np.random.default_rng(seed)
    df = df.iloc[rng.permutation(len(df))].drop_duplicates("lesion")  # one random image per lesion
    counts = {c: int(k) for c, k in df["label"].value_counts().reindex(classes).dropna().items() if k > 0}
    per = allocate(counts, n)
    picks = [g.iloc[rng.choice(len(g), per[c], replace=False)] for c, g in df.groupby("label", sort=False) if per.get(c)]
    return pd.concat(picks).drop(columns="lesion").sort_values("image_id").reset_index(drop=True)


def cases_from_study(study: str | Path, *, n: int, seed: int, data: str | Path | None = None) -> pd.DataFrame:
    """A lesion-unique stratified sample of a study folder's test split (rows image_id, label, path)."""
    from lesionlab.study_folder import StudyFolder

    sf = StudyFolder(study)
    test = sf.frames(data, splits=("test",))["test"]
    if test.empty:
        raise UserError(f"{sf.root}: the test split has no images that were found; pass --data")
    return sample_cases(test, n, seed, sf.lesion_of())


def cases_from_files(images: str | Path, truth: str | Path, *, n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Cases from an image folder and an ISIC ground-truth CSV (all of them, or a stratified sample of `n`)."""
    from lesionlab.data.subsets import external_table

    df = external_table(images, truth)
    if df.empty:
        raise UserError(f"no image of {truth} was found under {images}")
    return df if n is None else sample_cases(df, n, seed)


# ----------------------------------------------------------------------------- the AI's answer


def ai_answer(ens: Any, image: Image.Image) -> dict[str, Any]:
    """The clinician page's answer for one image, explanation included (`clinic.shown.page_answer`, the function
    /api/predict?explain=true uses too), as plain JSON types, as the page receives them."""
    return json.loads(json.dumps(page_answer(ens, image)))


def ai_summary(answer: dict[str, Any] | None) -> dict[str, Any]:
    """The AI's answer as the reads table records it (schema.CASE_COLUMNS' ai_* fields)."""
    if answer is None or answer.get("status") != "ok":
        return {"ai_top": "", "ai_mel_prob": None, "ai_malignant_prob": None, "ai_melanoma_flag": False}
    p = answer["probabilities"]
    return {"ai_top": answer["top"], "ai_mel_prob": float(p["MEL"]),
            "ai_malignant_prob": float(sum(p[c] for c in MALIGNANT)),
            "ai_melanoma_flag": bool(answer.get("melanoma_flag") or False)}


def _jpeg(image: Image.Image) -> bytes:
    """The image readers see: decoded with its EXIF orientation applied (as the models saw it), re-encoded without
    metadata (no file names, dates or devices reach the readers)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the study


def case_keys(study: str, seed: int, n: int) -> list[str]:
    """Opaque case ids: they reveal neither the class nor the image id, and differ between studies (so a case id
    of another study is unknown here, answered 404, never taken for one of this study's cases)."""
    keys = [f"c{hashlib.sha256(f'{study}|{seed}|{k}'.encode()).hexdigest()[:10]}" for k in range(n)]
    if len(set(keys)) != n:  # 40 bits: a clash is astronomically unlikely, but must never pass silently
        raise UserError(f"study {study!r}: case ids clash; choose another --seed")
    return keys


def _check_names(names: Iterable[str]) -> list[str]:
    out = [str(x).strip() for x in names]
    bad = [x for x in out if not x or len(x) > 200 or any(ch in x for ch in "\n\r\t")]
    if bad:
        raise UserError(f"reader name {bad[0]!r} must be 1-200 characters on one line")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise UserError(f"reader name {dup[0]!r} is given twice; reader names must be unique")
    return out


def _admin(s: sa.orm.Session, admin_token: str | None) -> str | None:
    """Check the admin token; on a database without one, make (or adopt) it and return it to be shown once."""
    if has_admin(s):
        check_admin(s, admin_token)
        return None
    token = admin_token or new_token()
    if len(token) < 32:
        raise UserError("--admin-token for a new database must be at least 32 characters (or leave it out: one is made)")
    s.add(Admin(token_hash=token_hash(token), created_at=utcnow()))
    return token


def add_readers(s: sa.orm.Session, study: Study, names: Iterable[str]) -> dict[str, str]:
    """Invite readers to a study (in a write session): name -> token. In a crossover study every second reader
    (by invitation order) starts aided; each reader's case order is seeded by the study seed and their number."""
    names = _check_names(names)
    taken = set(s.scalars(sa.select(Reader.name).where(Reader.study_id == study.id)))
    clash = [x for x in names if x in taken]
    if clash:
        raise Conflict(f"reader {clash[0]!r} is already invited to study {study.name!r}")
    k = len(taken)
    out = {}
    for name in names:
        token = new_token()
        first = "aided" if (study.aided and study.crossover and k % 2 == 1) else "unaided"
        s.add(Reader(study_id=study.id, name=name, token_hash=token_hash(token), first_modality=first, seed=k,
                     created_at=utcnow()))
        out[name] = token
        k += 1
    s.flush()
    return out


def invite_readers(db: ReaderDB, study: str, names: Iterable[str], *, admin_token: str | None) -> dict[str, str]:
    """Invite more readers to an existing study (admin token required): name -> token."""
    with db.write() as s:
        check_admin(s, admin_token)
        return add_readers(s, study_named(s, study), names)


def create_study(
    db: ReaderDB,
    *,
    name: str,
    cases: pd.DataFrame,
    bundle: Any | None,
    scale: str = "1-6",
    washout_days: float = 14.0,
    crossover: bool = False,
    seed: int = 0,
    readers: Iterable[str] = (),
    admin_token: str | None = None,
    source: str = "",
) -> CreatedStudy:
    """Store a new study: its cases (image, truth, the AI's answer), its design, and its first readers.

    Args:
        db: the open database.
        name: unique study name.
        cases: rows with image_id, label, path (`cases_from_study`, `cases_from_files`).
        bundle: an `EnsemblePredictor` (or bundle folder) for the aided arm; None for an unaided-only study.
        scale: malignancy rating scale, "1-6" or "0-100".
        washout_days: minimum days between a reader's last phase-1 answer and phase 2 (0 allowed).
        crossover: every second reader starts with the aided phase.
        seed: seeds the case keys and every reader's case order.
        readers: names of the readers to invite now (more later with `invite_readers`).
        admin_token: the database's admin token (a new database makes one and returns it).
        source: where the cases came from (recorded).
    """
    from lesionlab.data.images import ImageError, load_image

    if not name or len(name) > 200:
        raise UserError(f"--name {name!r} must be 1-200 characters")
    if scale not in SCALES:
        raise UserError(f"--scale {scale!r} must be one of {', '.join(SCALES)}")
    if not (washout_days >= 0):
        raise UserError(f"--washout-days {washout_days} must be 0 or more")
    names = _check_names(readers)
    with db.read() as s:  # fail before the slow part
        if has_admin(s):
            check_admin(s, admin_token)
        if s.scalar(sa.select(Study.id).where(Study.name == name)) is not None:
            raise UserError(f"a reader study named {name!r} already exists in this database; choose another --name")
    ens = bundle
    if bundle is not None and isinstance(bundle, str | Path):
        from lesionlab.clinic.bundle import EnsemblePredictor

        ens = EnsemblePredictor(bundle, device="cpu")
    bad = cases[~cases["label"].isin(CLASSES)]
    if len(bad):
        raise UserError(f"case {bad['image_id'].iloc[0]}: label {bad['label'].iloc[0]!r} is not one of {', '.join(CLASSES)}")
    rows = []
    for k, r in enumerate(cases.itertuples(index=False)):
        try:
            im = load_image(r.path)
        except ImageError as e:
            raise UserError(f"case {r.image_id}: {e}") from None
        answer = ai_answer(ens, im) if ens is not None else None
        rows.append({"image_id": str(r.image_id), "truth": r.label, "image": _jpeg(im), "ai": answer, **ai_summary(answer)})
        if (k + 1) % 20 == 0:
            log.info("reader study %s: %d/%d cases prepared", name, k + 1, len(cases))
    keys = case_keys(name, seed, len(rows))
    bundle_info = None
    if ens is not None:
        bundle_info = {"version": ens.version, "members": [m.name for m in ens.members],
                       "melanoma_threshold": ens.threshold, "tta": ens.tta, "precision": ens.precision}
    with db.write() as s:
        new_admin = _admin(s, admin_token)
        study = Study(name=name, created_at=utcnow(), scale=scale, washout_days=float(washout_days),
                      crossover=bool(crossover), seed=int(seed), classes=list(CLASSES), aided=ens is not None,
                      bundle=bundle_info, source=str(source))
        s.add(study)
        try:
            s.flush()
        except sa.exc.IntegrityError:
            raise UserError(f"a reader study named {name!r} already exists in this database; choose another --name") from None
        for pos, (row, key) in enumerate(zip(rows, keys, strict=True)):
            s.add(Case(study_id=study.id, key=key, position=pos, image_type="image/jpeg", **row))
        invitations = add_readers(s, study, names)
    return CreatedStudy(name=name, cases=len(rows), admin_token=new_admin, invitations=invitations)
