"""Error types. A `UserError` is bad input: the CLI prints its one-line message and exits non-zero."""


class UserError(Exception):
    """Bad input or option; the message names the file, row or option and what to do."""

    exit_code = 2


class WeightsUnavailable(UserError):
    """Pretrained weights could not be loaded (offline, no cache)."""
