"""Models: architectures, pretrained teachers, artifacts, size/latency.

Every model is an :class:`AttarModel`: ``pre`` (input preprocessing such as
``pre.normalize``; empty when none) then ``net``. Hooks target
``net.<path>``; ``model.head_path`` names the final Linear and
``model.stage_paths`` the main intermediate outputs. Naming per architecture is
documented in :mod:`attar.models.archs` and :mod:`attar.models.pretrained`.
"""

from attar.models.archs import ARCHS
from attar.models.build import build_model, check_same_classes, load_model, save_model
from attar.models.layers import AttarModel, Normalize, RepeatChannels, Resize
from attar.models.pretrained import PRETRAINED
from attar.models.size import model_size

__all__ = [
    "ARCHS",
    "PRETRAINED",
    "AttarModel",
    "Normalize",
    "RepeatChannels",
    "Resize",
    "build_model",
    "check_same_classes",
    "load_model",
    "model_size",
    "save_model",
]
