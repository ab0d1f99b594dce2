"""One exception type for every user-facing mistake.

The CLI prints an ``AttarError`` as a plain paragraph (no traceback), so its
message must say what was wrong, where, and how to fix it.
"""


class AttarError(Exception):
    """A problem the user can fix: bad recipe, bad data, mismatched model."""
