"""Errors a user can cause. `cli.py` prints them as one line and exits non-zero; bugs still raise."""


class ReliefError(Exception):
    """Bad input: the message names the input, the place and the fix, in one sentence."""


class WriteError(ReliefError):
    """A write failed (full disk, permissions); what was there before is unchanged and the
    partial output removed. `reason` is the system's words (`No space left on device`)."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


class ReliefWarning(UserWarning):
    """Something the user should know that stops nothing (a stale lock taken over, a damaged
    checkpoint passed over for an older complete one); `cli.py` prints it as one line."""


def shown(text: object, limit: int = 60) -> str:
    """Input text as a message quotes it: as written, or its repr (cut to `limit`) when it holds a
    line break or other unprintable character or is long, so an error stays one readable line."""
    text = str(text)
    return text if text.isprintable() and len(text) <= limit else repr(text)[:limit]
