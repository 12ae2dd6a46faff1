"""The audit log: one JSON line per API request, flushed as it is written; never image bytes or file names."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Line-buffered append: each record reaches the OS as one write when it is complete, so a crash loses
        # at most the record being written and concurrent writers never interleave within a line.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), **record},
                          default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
