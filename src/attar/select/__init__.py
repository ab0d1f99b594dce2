"""Data selection inside training: selectors plug into the one trainer (see base.Selector).

Registered selectors (``selector: {name: ..., keep: ...}`` in a recipe stage):
``uniform``, ``rs2``, ``high_loss``, ``uds``, ``disagreement``, ``prune``, ``efficienttrain``.
See docs/select.md.
"""

from attar.select.base import SELECTORS, Selector, build_selector
from attar.select import disagreement, efficienttrain, high_loss, prune, rs2, uds  # noqa: F401  (registration)

__all__ = ["SELECTORS", "Selector", "build_selector"]
