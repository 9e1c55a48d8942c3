"""Errors a researcher can fix (bad input, a busy or stale workdir): commands print them as one
line, what went wrong, where, and what to do, and exit 1. Any other exception is a bug and keeps
its traceback."""


class UserError(Exception):
    """A one-line message naming the file, key or folder at fault and the way out."""
