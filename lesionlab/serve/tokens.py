"""API tokens for users and devices: only a hash of each token is stored; comparison is constant-time.

The token is 32 random bytes (`secrets.token_urlsafe`), so a fast hash is enough: nothing is gained by a slow
password hash (bcrypt, argon2) against a 256-bit secret, which is how GitHub and PyPI store API tokens too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_json, read_json

PREFIX = "llab_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """The token file: `{"tokens": [{"name", "sha256", "created"}]}`; never holds a token itself."""

    path: Path
    entries: tuple[dict, ...]

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False) -> TokenStore:
        path = Path(path)
        if not path.exists():
            if create:
                return cls(path, ())
            raise UserError(f"{path}: no such token file; create one with `lesionlab tokens add NAME --file {path}`")
        data = read_json(path, missing=f"create one with `lesionlab tokens add NAME --file {path}`",
                         invalid="not a LesionLab token file; recreate it with `lesionlab tokens add`")
        entries = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("sha256"), str)
                for e in entries):
            raise UserError(f"{path}: not a LesionLab token file (expected a `tokens` list of name/sha256 entries)")
        return cls(path, tuple(entries))

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def add(self, name: str) -> tuple[TokenStore, str]:
        """A new token for `name`: the store to save and the token (shown once, never stored)."""
        if not _NAME.match(name):
            raise UserError(f"token name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
        if name in self.names:
            raise UserError(f"{self.path}: a token named {name!r} exists; revoke it first "
                            f"(`lesionlab tokens revoke {name} --file {self.path}`)")
        token = PREFIX + secrets.token_urlsafe(32)
        entry = {"name": name, "sha256": _digest(token),
                 "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        return TokenStore(self.path, (*self.entries, entry)), token

    def revoke(self, name: str) -> TokenStore:
        if name not in self.names:
            raise UserError(f"{self.path}: no token named {name!r} (have: {', '.join(self.names) or 'none'})")
        return TokenStore(self.path, tuple(e for e in self.entries if e["name"] != name))

    def save(self) -> None:
        atomic_write_json(self.path, {"tokens": list(self.entries)})
        self.path.chmod(0o600)

    def verify(self, token: str | None) -> str | None:
        """The name whose token this is, or None. Every entry is compared, in constant time."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for e in self.entries:
            if hmac.compare_digest(digest, e["sha256"]):
                found = e["name"]
        return found
