"""Invitation and admin tokens: random secrets handed out once; the database keeps only their SHA-256.

Tokens are 256-bit random strings (`secrets.token_urlsafe(32)`), so a plain SHA-256 is enough to store them
(a slow password hash protects low-entropy secrets; these are not guessable). Comparison is in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh URL-safe token (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The hex SHA-256 the database stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Whether `token` hashes to `stored_hash`, compared in constant time (`hmac.compare_digest`)."""
    return hmac.compare_digest(token_hash(token).encode(), stored_hash.encode())
