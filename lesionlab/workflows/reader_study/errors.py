"""Reader-study errors: each carries the HTTP status the reader service answers with (the CLI prints one line)."""

from __future__ import annotations

from lesionlab.exceptions import UserError


class ReaderStudyError(UserError):
    """Bad input to a reader study; `status` is the HTTP status the reader service answers with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Unauthorized(ReaderStudyError):
    """No token, or a token the database does not know (401)."""

    status = 401


class Forbidden(ReaderStudyError):
    """A known token that may not do this (a reader token on an admin action) (403)."""

    status = 403


class NotFound(ReaderStudyError):
    """A study or case that does not exist for this token (404)."""

    status = 404


class Conflict(ReaderStudyError):
    """A request that contradicts what is stored (another answer for a read already recorded) (409)."""

    status = 409
