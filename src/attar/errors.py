"""One exception type for every user-facing mistake.

The CLI prints an ``AttarError`` as a plain paragraph (no traceback), so its
message must say what was wrong, where, and how to fix it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class AttarError(Exception):
    """A problem the user can fix: bad recipe, bad data, mismatched model."""


class LocatedError(ValueError):
    """A check inside a recipe's validation that knows which field it is about (``loc``, relative to where it is
    raised), so the recipe loader points at that field's line."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(msg)
        self.loc = loc


@contextlib.contextmanager
def error_context(where: str) -> Iterator[None]:
    """Prefix an ``AttarError`` raised inside the block with where it happened (``stage 'x' (stages[1].selector)``).

    Why: a method's own check knows what is wrong, the caller knows where in the recipe or command it is; each
    layer adds its part once instead of catching and re-wording. Other exceptions (attar's bugs) pass unchanged,
    with their traceback."""
    try:
        yield
    except AttarError as e:
        raise AttarError(f"{where}: {e}") from None
