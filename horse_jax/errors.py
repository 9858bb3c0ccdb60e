"""Errors a user can cause.

Everything a user can get wrong (a bad path, a malformed record, an unknown module name, a shape
mismatch) raises `UserError` with one line that names the file, record or field. The CLI prints that
line and exits non-zero without a traceback; library callers can catch it like any exception.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""
