"""User-facing errors: one-line messages for people, never tracebacks."""




class UserError(Exception):
    """Bad input or option; the message names the file, row or option and what to do."""

    exit_code = 2


class WeightsUnavailable(UserError):
    """Pretrained weights could not be loaded (offline, no cache)."""

