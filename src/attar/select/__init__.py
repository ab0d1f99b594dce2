"""Data selection inside training: selectors plug into the one trainer (see base.Selector)."""

from attar.select.base import SELECTORS, Selector, build_selector

__all__ = ["SELECTORS", "Selector", "build_selector"]
