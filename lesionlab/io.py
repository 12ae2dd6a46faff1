"""Small file helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename over `path`, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_csv(path: Path, df: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    kwargs.setdefault("index", False)
    atomic_write(path, lambda p: df.to_csv(p, **kwargs))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path, *, missing: str, invalid: str = "") -> Any:
    """A JSON file, or a one-line UserError naming it: `missing` says what to do when it is absent, `invalid`
    (default: the same) when it cannot be parsed."""
    from lesionlab.exceptions import UserError

    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p} does not exist; {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: unreadable ({e}); {invalid or missing}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); {invalid or missing}") from None
