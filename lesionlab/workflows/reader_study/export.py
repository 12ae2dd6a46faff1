"""Export a study's reads: the reads table (schema.READ_COLUMNS), the cases table (schema.CASE_COLUMNS) and the
long format MRMC software reads (schema.MRMC_COLUMNS: reader, modality, case, truth, rating), one per task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from lesionlab.io import atomic_write_csv
from lesionlab.labels import MALIGNANT
from lesionlab.workflows.reader_study.db import Case, Read, Reader, ReaderDB
from lesionlab.workflows.reader_study.reading import check_admin, study_named
from lesionlab.workflows.reader_study.schema import CASE_COLUMNS, MRMC_COLUMNS, READ_COLUMNS, TASKS


def _float(v: float | None) -> float:
    return np.nan if v is None else float(v)


def study_tables(db: ReaderDB, study: str, *, admin_token: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reads, cases) of a study as DataFrames with READ_COLUMNS and CASE_COLUMNS (admin token required).

    Reads are sorted by reader (invitation order), modality order of the schema, case key.
    """
    with db.read() as s:
        check_admin(s, admin_token)
        st = study_named(s, study)
        cases = s.scalars(sa.select(Case).where(Case.study_id == st.id).order_by(Case.key)).all()
        by_id = {c.id: c for c in cases}
        case_rows = [{"case": c.key, "image_id": c.image_id, "truth": c.truth, "ai_top": c.ai_top,
                      "ai_mel_prob": _float(c.ai_mel_prob), "ai_malignant_prob": _float(c.ai_malignant_prob),
                      "ai_melanoma_flag": bool(c.ai_melanoma_flag)} for c in cases]
        q = (sa.select(Read, Reader).join(Reader, Read.reader_id == Reader.id).where(Reader.study_id == st.id)
             .order_by(Reader.id, Read.phase, Read.case_id))
        read_rows = []
        for read, reader in s.execute(q).all():
            c = by_id[read.case_id]
            read_rows.append({
                "reader": reader.name, "reader_level": reader.level or "",
                "reader_years": _float(reader.years), "modality": read.modality, "phase": read.phase,
                "case": c.key, "truth": c.truth, "diagnosis": read.diagnosis, "rating": read.rating,
                "management": read.management, "seconds": read.seconds, "ai_top": c.ai_top,
                "ai_mel_prob": _float(c.ai_mel_prob), "ai_malignant_prob": _float(c.ai_malignant_prob),
                "ai_melanoma_flag": bool(c.ai_melanoma_flag)})
    reads = pd.DataFrame(read_rows, columns=list(READ_COLUMNS))
    return reads, pd.DataFrame(case_rows, columns=list(CASE_COLUMNS))


def mrmc_long(reads: pd.DataFrame, task: str) -> pd.DataFrame:
    """The long MRMC table of one task: reader, modality, case, truth (0/1), rating.

    truth is 1 for melanoma (task "melanoma") or for any malignant class, MEL/BCC/AKIEC (task "malignancy");
    rating is the reader's malignancy confidence for both tasks (the one rating a reader gives per case).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} must be one of {TASKS}")
    positive = {"MEL"} if task == "melanoma" else set(MALIGNANT)
    out = reads[["reader", "modality", "case", "rating"]].copy()
    out["truth"] = reads["truth"].isin(positive).astype(int)
    return out[list(MRMC_COLUMNS)]


def export_study(db: ReaderDB, study: str, out_dir: str | Path, *, admin_token: str | None) -> dict[str, Path]:
    """Write reads.csv, cases.csv and mrmc_<task>.csv per task into `out_dir` (atomically); returns the files."""
    reads, cases = study_tables(db, study, admin_token=admin_token)
    out = Path(out_dir)
    files = {"reads": out / "reads.csv", "cases": out / "cases.csv"}
    atomic_write_csv(files["reads"], reads)
    atomic_write_csv(files["cases"], cases)
    for task in TASKS:
        files[f"mrmc_{task}"] = out / f"mrmc_{task}.csv"
        atomic_write_csv(files[f"mrmc_{task}"], mrmc_long(reads, task))
    return files
