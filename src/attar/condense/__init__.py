"""``attar.condense``: dataset distillation (condensation) and its evaluation protocol.

``condense(data, method, ipc, out_dir, iterations, seed, ...)`` writes a condensed-set artifact
(safetensors images + labels (+ soft labels) and metadata, atomically); any later stage reads it as
``DataSpec(artifact=DIR)``. ``evaluate_condensed(artifact)`` trains fresh networks on it beside a
random real subset of equal size and the full data. Methods live in :data:`CONDENSERS`, one file
each: ``random``, ``herding``, ``kcenter``, ``dm``, ``datadam``, ``dc``, ``dsa``, ``mtt``, ``rded``, ``sre2l``, ``cda``,
``cvdd``, ``ncfm``. See docs/condense.md.
"""

from attar.condense import cvdd, datadam, dc, dm, dsa, herding, kcenter, mtt, ncfm, random_subset, rded, sre2l  # noqa: F401  (registration)
from attar.condense.api import check_request, condense
from attar.condense.evaluate import evaluate_condensed, format_evaluation
from attar.condense.render import render_grid
from attar.data.artifact import SyntheticSet, data_hash, load_synthetic, save_synthetic
from attar.condense.augment import DSA, DSAParams
from attar.condense.base import CONDENSERS, CondenseContext, Condenser

__all__ = [
    "CONDENSERS",
    "CondenseContext",
    "Condenser",
    "DSA",
    "DSAParams",
    "SyntheticSet",
    "check_request",
    "condense",
    "data_hash",
    "evaluate_condensed",
    "format_evaluation",
    "load_synthetic",
    "render_grid",
    "save_synthetic",
]
