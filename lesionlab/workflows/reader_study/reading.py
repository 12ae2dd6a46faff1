"""What a reader sees and submits: phases, case order, washout, resuming, answers and their checks.

A reader reads every case of the study twice, once per modality, in two phases: phase 1 in the modality they
start with (`unaided`, or `aided` for half the readers of a crossover study), phase 2 in the other, opened only
after phase 1 is complete and the study's washout has passed. Within a phase the cases come in a random order
seeded by the study seed, the reader's seed and the phase. The current case is the first one of that order
without a read, so a reader whose browser crashed mid-case comes back to that case, and nothing is lost.

Time per case is measured on the server: from the reader's last opening of the case to the submission.

Every function here takes an open SQLAlchemy session (see `db.ReaderDB.read` / `.write`): the service and the
tests call the same code.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lesionlab.labels import DISPLAY_NAMES
from lesionlab.workflows.reader_study.db import Admin, Case, Opening, Read, Reader, Study, utcnow
from lesionlab.workflows.reader_study.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ReaderStudyError,
    Unauthorized,
)
from lesionlab.workflows.reader_study.schema import LEVELS, MANAGEMENT, MODALITIES
from lesionlab.workflows.reader_study.tokens import token_hash, token_matches

SCALES: dict[str, tuple[float, float, bool]] = {"1-6": (1, 6, True), "0-100": (0, 100, False)}  # min, max, integer


# ----------------------------------------------------------------------------- tokens


def reader_for_token(s: Session, token: str | None) -> Reader:
    """The reader a token belongs to; Unauthorized (401) for a missing or unknown token."""
    if not token:
        raise Unauthorized("no reader token: open the invitation link you were sent")
    reader = s.scalar(sa.select(Reader).where(Reader.token_hash == token_hash(token)))
    if reader is None or not token_matches(token, reader.token_hash):
        if s.scalar(sa.select(Admin.id).where(Admin.token_hash == token_hash(token))) is not None:
            raise Forbidden("this is an admin token; readers read with their own invitation link")
        raise Unauthorized("unknown reader token: check the invitation link (it must be copied whole)")
    return reader


def has_admin(s: Session) -> bool:
    return s.scalar(sa.select(sa.func.count()).select_from(Admin)) > 0


def check_admin(s: Session, token: str | None) -> None:
    """Unauthorized (401) without a token or with an unknown one, Forbidden (403) for a reader's token."""
    if not token:
        raise Unauthorized("an admin token is needed (--admin-token, or LESIONLAB_ADMIN_TOKEN)")
    hashes = s.scalars(sa.select(Admin.token_hash)).all()
    # every stored hash is compared, in constant time each, so the answer's timing says nothing about the token
    if not any([token_matches(token, h) for h in hashes]):
        if s.scalar(sa.select(Reader.id).where(Reader.token_hash == token_hash(token))) is not None:
            raise Forbidden("a reader's token cannot administer a study; use the admin token")
        raise Unauthorized("unknown admin token: use the one printed when the database's first study was created")


def study_named(s: Session, name: str) -> Study:
    study = s.scalar(sa.select(Study).where(Study.name == name))
    if study is None:
        names = s.scalars(sa.select(Study.name).order_by(Study.name)).all()
        raise NotFound(f"no reader study named {name!r} in this database (studies: {', '.join(names) or 'none'})")
    return study


# ----------------------------------------------------------------------------- phases and order


def modalities(study: Study, reader: Reader) -> list[str]:
    """The reader's modality per phase (index 0 = phase 1)."""
    if not study.aided:
        return ["unaided"]
    return [reader.first_modality] + [m for m in MODALITIES if m != reader.first_modality]


def case_order(study: Study, reader: Reader, phase: int, case_ids: list[int]) -> list[int]:
    """The reader's seeded random order of the study's cases (database ids, given in position order) in a phase."""
    rng = np.random.default_rng([study.seed, reader.seed, phase])
    return [case_ids[k] for k in rng.permutation(len(case_ids))]


def _case_ids(s: Session, study: Study) -> list[int]:
    return list(s.scalars(sa.select(Case.id).where(Case.study_id == study.id).order_by(Case.position)))


def _read_case_ids(s: Session, reader: Reader, modality: str) -> set[int]:
    return set(s.scalars(sa.select(Read.case_id).where(Read.reader_id == reader.id, Read.modality == modality)))


def _washout_end(s: Session, study: Study, reader: Reader, first_modality: str) -> dt.datetime | None:
    """When phase 2 opens: the study's washout after the reader's last phase-1 answer."""
    done = reader.phase1_done_at or s.scalar(sa.select(sa.func.max(Read.submitted_at)).where(
        Read.reader_id == reader.id, Read.modality == first_modality))
    return None if done is None else done + dt.timedelta(days=study.washout_days)


def lock_reader(s: Session, reader: Reader) -> Reader:
    """Lock the reader's row for the rest of a write transaction (PostgreSQL `SELECT ... FOR UPDATE`), so one
    reader's requests are taken one at a time while different readers never wait for each other. SQLite write
    transactions are serialised already (BEGIN IMMEDIATE, see db.ReaderDB)."""
    return s.scalars(sa.select(Reader).where(Reader.id == reader.id).with_for_update()
                     .execution_options(populate_existing=True)).one()


def study_info(study: Study) -> dict[str, Any]:
    """What a reader may know about the study: its name, label set, rating scale and answer choices."""
    lo, hi, integer = SCALES[study.scale]
    return {"name": study.name, "classes": [{"code": c, "name": DISPLAY_NAMES.get(c, c)} for c in study.classes],
            "scale": {"name": study.scale, "min": lo, "max": hi, "integer": integer},
            "management": list(MANAGEMENT), "levels": list(LEVELS), "aided": study.aided,
            "washout_days": study.washout_days}


def reader_state(s: Session, reader: Reader, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Where the reader stands: profile, phase, modality, progress, the current case (key only), washout."""
    now = now or utcnow()
    study = s.get(Study, reader.study_id)
    ids = _case_ids(s, study)
    mods = modalities(study, reader)
    done = {m: _read_case_ids(s, reader, m) for m in mods}
    state: dict[str, Any] = {
        "reader": reader.name, "study": study_info(study),
        "profile": {"level": reader.level, "years": reader.years},
        "needs_profile": reader.level is None or reader.years is None,
        "phases": [{"phase": k + 1, "modality": m, "done": len(done[m]), "total": len(ids)} for k, m in enumerate(mods)],
        "done": sum(len(v) for v in done.values()), "total": len(ids) * len(mods),
        "phase": None, "modality": None, "case": None, "washout_until": None, "finished": False,
    }
    for k, m in enumerate(mods):
        if len(done[m]) >= len(ids):
            continue
        if k == 1:
            end = _washout_end(s, study, reader, mods[0])
            if end is not None and now < end:
                state["washout_until"] = end.isoformat(timespec="seconds") + "Z"
                return state
        order = case_order(study, reader, k + 1, ids)
        nxt = next(c for c in order if c not in done[m])
        state.update(phase=k + 1, modality=m, case=s.get(Case, nxt).key,
                     position=order.index(nxt) + 1)
        return state
    state["finished"] = True
    return state


def set_profile(s: Session, reader: Reader, level: str, years: Any) -> None:
    """Record the reader's experience level (one of LEVELS) and years of experience (0-70)."""
    if level not in LEVELS:
        raise ReaderStudyError(f"level {level!r} must be one of {', '.join(LEVELS)}")
    try:
        y = float(years)
    except (TypeError, ValueError):
        raise ReaderStudyError(f"years {years!r} must be a number of years of experience") from None
    if not (0 <= y <= 70) or math.isnan(y):
        raise ReaderStudyError(f"years {years!r} must be between 0 and 70")
    reader.level, reader.years = level, y


def _case_by_key(s: Session, study: Study, key: str) -> Case:
    case = s.scalar(sa.select(Case).where(Case.study_id == study.id, Case.key == str(key)))
    if case is None:
        raise NotFound(f"case {key!r} is not a case of study {study.name!r}")
    return case


def case_image(s: Session, reader: Reader, key: str) -> tuple[bytes, str]:
    """The image of one case of the reader's study (NotFound for any other case)."""
    case = _case_by_key(s, s.get(Study, reader.study_id), key)
    return case.image, case.image_type


def open_current(s: Session, reader: Reader, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The reader's state with the current case, recording that it was opened now (in a write session).

    In the aided modality the case carries the AI's answer as stored at creation (what the clinician page shows
    for that image); in the unaided one it carries nothing of the model. Never the truth.
    """
    now = now or utcnow()
    reader = lock_reader(s, reader)
    state = reader_state(s, reader, now=now)
    if state["needs_profile"]:
        raise ReaderStudyError("enter your experience level and years first", status=409)
    if state["case"] is None:
        return state
    study = s.get(Study, reader.study_id)
    case = _case_by_key(s, study, state["case"])
    op = s.scalar(sa.select(Opening).where(Opening.reader_id == reader.id, Opening.case_id == case.id,
                                           Opening.modality == state["modality"]))
    if op is None:
        s.add(Opening(reader_id=reader.id, case_id=case.id, modality=state["modality"], first_at=now, last_at=now, count=1))
    else:
        op.last_at, op.count = now, op.count + 1
    state["case"] = {"key": case.key, "image": f"api/reader/cases/{case.key}/image",
                     "ai": case.ai if state["modality"] == "aided" else None}
    return state


# ----------------------------------------------------------------------------- answers


def check_answer(study: Study, answer: dict[str, Any]) -> tuple[str, float, str]:
    """(diagnosis, rating, management) of a submitted answer, or ReaderStudyError (400) naming the bad field."""
    dx, rating, mgmt = answer.get("diagnosis"), answer.get("rating"), answer.get("management")
    if dx not in study.classes:
        raise ReaderStudyError(f"diagnosis {dx!r} must be one of {', '.join(study.classes)}")
    lo, hi, integer = SCALES[study.scale]
    try:
        r = float(rating)
    except (TypeError, ValueError):
        raise ReaderStudyError(f"rating {rating!r} must be a number from {lo:g} to {hi:g}") from None
    if math.isnan(r) or not lo <= r <= hi or (integer and r != int(r)):
        raise ReaderStudyError(f"rating {rating!r} must be {'a whole number' if integer else 'a number'} "
                               f"from {lo:g} to {hi:g}")
    if mgmt not in MANAGEMENT:
        raise ReaderStudyError(f"management {mgmt!r} must be one of {', '.join(MANAGEMENT)}")
    return dx, r, mgmt


def _same(read: Read, dx: str, rating: float, mgmt: str) -> bool:
    return read.diagnosis == dx and read.rating == rating and read.management == mgmt


def submit(s: Session, reader: Reader, key: str, answer: dict[str, Any], *, now: dt.datetime | None = None
           ) -> tuple[bool, dict[str, Any]]:
    """Record a reader's answer to a case in a modality (in a write session).

    Returns (created, body): created False when the same answer was already recorded (a double submission is
    idempotent). Raises NotFound for a case of another study, Conflict for another answer to a read already
    recorded or for a case that is not open to the reader in that modality, ReaderStudyError for a bad answer.
    """
    now = now or utcnow()
    reader = lock_reader(s, reader)
    study = s.get(Study, reader.study_id)
    case = _case_by_key(s, study, key)
    modality = answer.get("modality")
    mods = modalities(study, reader)
    if modality not in mods:
        raise ReaderStudyError(f"modality {modality!r} must be one of {', '.join(mods)}")
    dx, rating, mgmt = check_answer(study, answer)
    old = s.scalar(sa.select(Read).where(Read.reader_id == reader.id, Read.case_id == case.id, Read.modality == modality))
    if old is not None:
        if _same(old, dx, rating, mgmt):
            return False, {"status": "already recorded", "case": key, "modality": modality}
        raise Conflict(f"case {key} ({modality}) was already answered; a recorded answer cannot be changed")
    state = reader_state(s, reader, now=now)
    if state["modality"] != modality:
        why = ("the washout period is not over" if state["washout_until"] else
               "this phase is finished" if state["modality"] is None else f"the current phase is {state['modality']}")
        raise Conflict(f"case {key} cannot be answered {modality}: {why}")
    op = s.scalar(sa.select(Opening).where(Opening.reader_id == reader.id, Opening.case_id == case.id,
                                           Opening.modality == modality))
    if op is None:
        raise Conflict(f"case {key} was not opened in the {modality} phase; reload the page to get your current case")
    phase = mods.index(modality) + 1
    read = Read(reader_id=reader.id, case_id=case.id, modality=modality, phase=phase, diagnosis=dx, rating=rating,
                management=mgmt, seconds=max(0.0, (now - op.last_at).total_seconds()), openings=op.count,
                submitted_at=now)
    try:
        with s.begin_nested():  # a concurrent duplicate (PostgreSQL) hits the unique constraint: compare answers
            s.add(read)
    except IntegrityError:
        old = s.scalar(sa.select(Read).where(Read.reader_id == reader.id, Read.case_id == case.id,
                                             Read.modality == modality))
        if old is not None and _same(old, dx, rating, mgmt):
            return False, {"status": "already recorded", "case": key, "modality": modality}
        raise Conflict(f"case {key} ({modality}) was already answered; a recorded answer cannot be changed") from None
    if phase == 1 and reader.phase1_done_at is None and len(_read_case_ids(s, reader, modality)) >= len(_case_ids(s, study)):
        reader.phase1_done_at = now
    return True, {"status": "recorded", "case": key, "modality": modality, "seconds": read.seconds}


def progress(s: Session, study: Study) -> list[dict[str, Any]]:
    """Per reader: name, level, years, reads done per modality, finished (for the admin; no answers)."""
    n = len(_case_ids(s, study))
    out = []
    for r in s.scalars(sa.select(Reader).where(Reader.study_id == study.id).order_by(Reader.id)):
        counts = dict(s.execute(sa.select(Read.modality, sa.func.count()).where(Read.reader_id == r.id)
                                .group_by(Read.modality)).all())
        mods = modalities(study, r)
        out.append({"reader": r.name, "level": r.level, "years": r.years, "first_modality": r.first_modality,
                    **{m: counts.get(m, 0) for m in mods}, "cases": n,
                    "finished": all(counts.get(m, 0) >= n for m in mods)})
    return out
