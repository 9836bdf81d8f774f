"""Errors a user can cause. `cli.py` prints them as one line and exits non-zero; bugs still raise."""


class ReliefError(Exception):
    """Bad input: the message names the input, the place and the fix, in one sentence."""
