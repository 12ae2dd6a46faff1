"""Steps keyed by what they depend on: the machinery under the study protocol (lesionlab.workflows.study).

Every step runs through `Steps.run`, which decides from a fingerprint whether the step's outputs on disk still
match what it depends on. A step's fingerprint is the SHA-256 of

- the config values it reads (`config=`: a mapping from a prefix to a config section, a dict or a value;
  flattened into dotted keys such as `train.lr`, which are stored, so a reason can name the key that changed),
- the SHA-256 of its input files (`inputs=`: paths, or a mapping label -> path / list of paths for large sets
  such as every image; content hashes are memoised by (size, mtime) in `.hashes.json`, as DVC does),
- the fingerprints of its upstream steps (`upstream=`: names of steps already run or reused in this run),
- the SHA-256 of the code it runs (`code=`: packages or modules, e.g. `("lesionlab.evaluation",)`; every .py file
  under each, found with importlib, hashed with its relative path; `code_digest`). The package version is recorded
  but not fingerprinted: it is "0.1.0" on every commit, and the code hash is what sees a fix. Hashing per package
  is what lets a fix to the report re-run the report but not training.

A step whose fingerprint equals the recorded one, whose recorded run finished, whose upstream steps were not re-run
since, whose outputs all exist and whose `check` (if any) has no objection is reused. Otherwise it runs: its
declared `outputs` (paths inside the study folder) are deleted first, unless the step is `resumable` and merely
new or unfinished, or only `continuable` config keys changed (training resumes its `last.pt`, or continues it to
more epochs); never after a change to its code, inputs or upstream steps. A step that re-runs gives its downstream
steps a new run id, so they re-run too. `steps.json` records per step: fingerprint, status (ran / reused), reason
("new", "config changed: train.lr", "code changed: lesionlab.evaluation", "input changed: splits.csv", "upstream
changed: train resnet101", "outputs missing: ...", ...), seconds (of the run that made the outputs, for a reused
step too), the flattened config values, code and input digests, upstream fingerprints, the package version and
outputs. The log says the same. Steps recorded earlier but not part of this run are pruned (`Steps.prune`): their
outputs are removed. How the study adds its steps, and what `--fresh` deletes: lesionlab.workflows.study.

One study at a time per folder: `folder_lock` holds an flock on `<folder>/.lock` for the whole run, so a second
`lesionlab study` into the same folder stops at once instead of training into the same run folders and racing on
steps.json.

Why not a library: joblib.Memory caches a function's return value keyed on its arguments, not files written into
a study folder, and cannot say which config key changed; doit's `config_changed`/`file_dep` give a yes/no
(keeping state in a dbm file beside the dodo loader) and no per-key reason; pytask has no "explain why" yet
(pytask-dev/pytask#466); DVC and pydra are pipeline engines with their own CLI/YAML or workflow graph that would
take over the study's control flow. What is needed here is ~150 lines over hashlib and JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lesionlab import __version__
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.study_folder import StudyFolder

# The step log is the study's log (`lesionlab study` output; filtered and tested under this name).
log = logging.getLogger("lesionlab.workflows.study")

STEPS_FILE = "steps.json"
HASHES_FILE = ".hashes.json"
LOCK_FILE = StudyFolder.LOCK  # the study folder contract names it


def section(obj: Any, *, keep: Iterable[str] | None = None, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A config section (dataclass or dict) as a dict, restricted to `keep` keys or without `drop` keys."""
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    if keep is not None:
        d = {k: d[k] for k in keep}
    return {k: v for k, v in d.items() if k not in set(drop)}


def flatten_config(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{'train': TrainConfig(...), 'arch': 'x'} -> {'train.lr': 0.001, ..., 'arch': 'x'} (JSON-ready values)."""
    out: dict[str, Any] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))  # tuples -> lists, Paths -> str
    return out


class FileHashes:
    """SHA-256 of files, memoised by (size, mtime_ns) so unchanged images are not read again (DVC's state db)."""

    def __init__(self, file: Path):
        self.file = file
        self.memo: dict[str, list] = json.loads(file.read_text()) if file.exists() else {}
        self.dirty = False

    def sha(self, path: Path) -> str:
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            return "missing"
        key = str(p.resolve())
        hit = self.memo.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(p)
        self.memo[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.file, self.memo)
            self.dirty = False


@functools.cache  # per process: the source does not change under a running study
def code_digest(name: str) -> str:
    """SHA-256 over the source of a package (every .py below it, with its relative path) or of one module.

    Args:
        name: an importable dotted name such as `lesionlab.evaluation` or `lesionlab.data.split`.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"code {name!r} is not an importable package or module")  # a bug in a step's code list
    if spec.submodule_search_locations:  # a package: its whole tree, so a new or deleted module counts too
        files = sorted((str(f.relative_to(root)), f) for root in map(Path, spec.submodule_search_locations)
                       for f in root.rglob("*.py"))
    else:
        files = [(Path(spec.origin).name, Path(spec.origin))]
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path, *, command: str = "lesionlab study") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (an flock on `folder/.lock`) for the `with` block, or raise a UserError.

    The lock file records who holds it (pid, host, start time) for the message the next process shows. The kernel
    drops the lock when its holder exits or is killed, so a file left behind never blocks; the file is not deleted on
    release either (a process could be waiting on the old file while a third locks a new one).
    """
    path = Path(folder) / LOCK_FILE
    with open(path, "a+") as f:  # a+: create if missing, never truncate what the holder wrote
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                who = json.loads(f.read())
                holder = f"pid {who['pid']} on {who['host']} since {who['since']}"
            except (ValueError, KeyError, TypeError):  # the holder has locked but not yet written its record
                holder = "details not yet recorded"
            raise UserError(f"{folder} is in use by another `{command}` ({holder}); wait for it or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        yield  # closing the file releases the lock


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two flat mappings (a key present in one only counts), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))


def name_list(keys: list[str], limit: int = 4) -> str:
    """The first `limit` names, comma-separated, and how many more ("a, b and 3 more")."""
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class Steps:
    """Run steps keyed by a fingerprint of what they depend on; see the module docstring."""

    def __init__(self, out: Path, *, version: str = __version__):
        self.out = Path(out)
        self.file = self.out / STEPS_FILE
        self.version = version
        state = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.recorded: dict[str, dict[str, Any]] = state
        self.state: dict[str, dict[str, Any]] = {}  # this run's records, in run order
        self.hashes = FileHashes(self.out / HASHES_FILE)

    # -- paths
    def rel(self, p: Path) -> str:
        """`p` relative to the study folder (as steps.json records it), or as given if outside."""
        p = Path(p)
        try:
            return str(p.resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(p)

    def _inside(self, p: Path) -> Path:
        rp = Path(p).resolve()
        if not rp.is_relative_to(self.out.resolve()) or rp == self.out.resolve():
            raise ValueError(f"step output {p} is not inside the study folder {self.out}")  # a bug in a step
        return rp

    def _input_digests(self, inputs: Sequence[Path] | Mapping[str, Path | Sequence[Path]]) -> dict[str, str]:
        items = inputs.items() if isinstance(inputs, Mapping) else ((self.rel(p), p) for p in inputs)
        out = {}
        for label, paths in items:
            if isinstance(paths, str | Path):
                out[label] = self.hashes.sha(Path(paths))
            else:  # a set of files: one digest over (relative name, content hash), order-independent
                out[label] = _digest(sorted((self.rel(p), self.hashes.sha(Path(p))) for p in paths))
        return out

    def _why(self, rec: dict[str, Any] | None, new: dict[str, Any], outputs: list[Path],
             check: Callable[[], str | None] | None) -> str | None:
        if rec is None:
            return "new"
        if "fingerprint" not in rec:
            return "new (steps.json from an older LesionLab has no fingerprints)"
        if "code" not in rec:  # made by code of unknown content: once more, so that from now on a fix is seen
            return "new (steps.json from an older LesionLab has no code fingerprint)"
        reasons = []
        if rec.get("status") not in ("ran", "reused"):
            reasons.append("did not finish")
        pkgs = changed_keys(rec["code"], new["code"])
        if pkgs:
            reasons.append(f"code changed: {name_list(pkgs)}")
        keys = changed_keys(rec.get("config", {}), new["config"])
        if keys:
            reasons.append(f"config changed: {name_list(keys)}")
        files = changed_keys(rec.get("inputs", {}), new["inputs"])
        if files:
            reasons.append(f"input changed: {name_list(files)}")
        ups = changed_keys(rec.get("upstream", {}), new["upstream"])
        if ups:
            reasons.append(f"upstream changed: {name_list(ups)}")
        else:
            reran = changed_keys(rec.get("upstream_runs", {}), new["upstream_runs"])
            if reran:
                reasons.append(f"upstream re-ran: {name_list(reran)}")
        if not reasons and rec.get("fingerprint") != new["fingerprint"]:
            reasons.append("fingerprint changed")
        if reasons:
            return "; ".join(reasons)
        missing = [self.rel(o) for o in outputs if not Path(o).exists()]
        if missing:
            return f"outputs missing: {name_list(missing)}"
        return check() if check else None

    @staticmethod
    def _continues(rec: dict[str, Any] | None, new: dict[str, Any], continuable: Collection[str]) -> bool:
        """Whether a resumable step may keep its outputs and continue from them: it is new, it did not finish, or
        only `continuable` config keys changed; never when its code, inputs or upstream steps changed."""
        if rec is None:
            return True  # a leftover folder without a record: the step's fn checks what it finds
        if "fingerprint" not in rec or "code" not in rec:
            return False  # made by code of unknown content
        if any(rec.get(k) != new[k] for k in ("code", "inputs", "upstream", "upstream_runs")):
            return False
        keys = changed_keys(rec.get("config", {}), new["config"])
        return set(keys) <= set(continuable) and bool(keys or rec.get("status") not in ("ran", "reused"))

    def run(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        config: Mapping[str, Any] | None = None,
        inputs: Sequence[Path] | Mapping[str, Path | Sequence[Path]] = (),
        upstream: Sequence[str] = (),
        outputs: Sequence[Path] = (),
        check: Callable[[], str | None] | None = None,
        resumable: bool = False,
        continuable: Collection[str] = (),
        code: Sequence[str] = (),
    ) -> Any:
        """Run `fn` unless its recorded outputs still match what it depends on; returns fn's result (None if reused).

        Args:
            config: the config values the step reads, e.g. `{"train": section(cfg.train, drop=("archs",))}`.
            inputs: files the step reads that no upstream step wrote (content-hashed).
            upstream: names of the steps (already run or reused in this run) whose outputs it reads.
            outputs: files/folders it writes, inside the study folder (checked for existence, deleted before a re-run).
            check: extra test of the outputs; returns a reason to re-run, or None.
            resumable: keep the outputs when the step is only new or unfinished (`fn` resumes from them).
            continuable: config keys whose change alone keeps a resumable step's outputs too (`fn` continues from them
                and decides whether they can serve, e.g. training to more epochs).
            code: packages or modules the step runs (`code_digest`), e.g. `("lesionlab.evaluation",)`: a change to
                their source re-runs the step.
        """
        if name in self.state:
            raise ValueError(f"step {name!r} given twice")
        unknown = [u for u in upstream if u not in self.state]
        if unknown:
            raise ValueError(f"step {name!r}: upstream step(s) {unknown} have not run yet")
        outs = [Path(o) for o in outputs]
        for o in outs:
            self._inside(o)
        new = {
            "config": flatten_config(config),
            "inputs": self._input_digests(inputs),
            "upstream": {u: self.state[u]["fingerprint"] for u in upstream},
            "upstream_runs": {u: self.state[u]["run_id"] for u in upstream},
            "code": {c: code_digest(c) for c in code},
            "version": self.version,  # recorded, not fingerprinted (see the module docstring)
        }
        new["fingerprint"] = _digest({k: new[k] for k in ("config", "inputs", "upstream", "code")})
        self.hashes.save()
        rec = self.recorded.get(name)
        t = time.perf_counter()
        reason = self._why(rec, new, outs, check)
        base = {**new, "outputs": [self.rel(o) for o in outs]}
        if reason is None:
            # seconds: what the reused outputs cost when they were made (so totals stay the study's compute time)
            self.state[name] = {"fingerprint": new["fingerprint"], "status": "reused", "reason": "unchanged",
                                "seconds": rec.get("seconds"), **base, "run_id": rec["run_id"]}
            log.info("step %s: reused (unchanged; made in %.1fs)", name, rec.get("seconds") or 0)
            self._save()
            return None
        keep = resumable and self._continues(rec, new, continuable)
        if not keep:
            for o in outs:
                remove_path(self._inside(o))
        log.info("step %s: running (%s)", name, reason)
        run_id = _digest([new["fingerprint"], time.time_ns(), os.getpid()])[:16]
        self.state[name] = {"fingerprint": new["fingerprint"], "status": "running", "reason": reason, "seconds": None,
                            **base, "run_id": run_id}
        self.recorded[name] = self.state[name]
        self._save()
        result = fn()
        secs = round(time.perf_counter() - t, 2)
        self.state[name].update(status="ran", seconds=secs)
        self._save()
        log.info("step %s: ran in %.1fs", name, secs)
        return result

    def record(self, name: str, status: str, reason: str, seconds: float) -> None:
        """Record a step that is not fingerprinted (the report, which always runs)."""
        self.state[name] = {"status": status, "reason": reason, "seconds": round(seconds, 2)}
        self._save()

    def prune(self, *, keep: Iterable[Path] = ()) -> list[str]:
        """Remove the outputs and records of steps recorded earlier but not part of this run.

        Args:
            keep: paths still in use (e.g. a synthetic data folder now given as --data): never removed.
        """
        kept = [Path(k).resolve() for k in keep]
        gone = [n for n in self.recorded if n not in self.state]
        for n in gone:
            for o in self.recorded[n].get("outputs", []):
                p = (self.out / o).resolve()
                if any(k == p or k.is_relative_to(p) for k in kept):
                    continue
                if p.is_relative_to(self.out.resolve()) and p != self.out.resolve():
                    remove_path(p)
            log.info("step %s: no longer part of this study; removed its outputs", n)
        self.recorded = {n: r for n, r in self.recorded.items() if n in self.state}
        self._save()
        return gone

    def _save(self) -> None:
        # this run's records first (in run order), then earlier records not (yet) seen in this run
        merged = {**self.state, **{n: r for n, r in self.recorded.items() if n not in self.state}}
        atomic_write_json(self.file, merged)


def remove_path(p: Path) -> None:
    """Delete a file, link or folder tree, if there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
