"""Data selection: selectors that plug into the one trainer (see base.Selector), and GRAPE response selection
for fine-tuning data (attar.select.grape).

Registered selectors (``selector: {name: ..., keep: ...}`` in a recipe stage):
``uniform``, ``rs2``, ``high_loss``, ``uds``, ``disagreement``, ``prune``, ``efficienttrain``,
``stored_teacher`` (static, from a stored teacher pass).
GRAPE (``grape_select``) runs before fine-tuning, outside the trainer: per prompt, keep the candidate
response the target model finds most likely. See docs/select.md.
"""

from attar.select.base import SELECTORS, Selector, build_selector, check_selector, selector_spec_hash
from attar.select import disagreement, efficienttrain, high_loss, prune, rs2, stored, uds  # noqa: F401  (registration)
from attar.select.grape import GrapeResult, grape_select, response_logprobs

__all__ = ["SELECTORS", "Selector", "build_selector", "check_selector", "selector_spec_hash", "GrapeResult",
           "grape_select", "response_logprobs"]
