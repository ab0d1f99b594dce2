"""Forward hooks that capture intermediate tensors by module path (torchdistill-style).

Any architecture can be a teacher or a student: a feature is named by its dotted module
path (``"features.3"``, ``"layer4"``), resolved with ``get_submodule``, and captured by a
forward hook while the model runs as usual. Nothing in the model has to change.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attar.errors import AttarError

_FEATURE_DIM_ATTRS = ("out_channels", "out_features", "num_features", "embedding_dim")


def module_names(root: nn.Module) -> list[str]:
    """Every dotted submodule path of ``root`` (the root itself, ``""``, excluded)."""
    return [n for n, _ in root.named_modules() if n]


def _listing(names: list[str], limit: int = 60) -> str:
    if not names:
        return "(the model has no submodules)"
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def resolve_module(root: nn.Module, path: str, what: str) -> nn.Module:
    """``root.get_submodule(path)``, or an ``AttarError`` that lists the available paths."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise AttarError(
            f"{what}: module path {path!r} does not exist in the {type(root).__name__}. "
            f"Available module paths: {_listing(module_names(root))}."
        ) from None


def last_linear(root: nn.Module, what: str) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in registration order — by convention the classifier head."""
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise AttarError(
            f"{what}: the {type(root).__name__} has no nn.Linear layer to use as its classifier head; "
            f"name the head's module path explicitly. Available module paths: {_listing(module_names(root))}."
        )
    return found[-1]


def feature_dim(root: nn.Module, path: str) -> int | None:
    """Best-effort channel/feature size of the output of module ``path`` (None if unknown).

    Uses the module's own ``out_channels``/``out_features``/``num_features``/``embedding_dim``;
    for a parameter-free module (ReLU, pooling) the last such layer registered before it (or
    inside it). Exact for sequential stacks; the objective re-checks the captured shape at run
    time and asks for an explicit size if the guess was wrong (e.g. after ``Flatten``).
    """
    target = resolve_module(root, path, "feature size")
    own = _dim_of(target)
    if own is not None:
        return own
    last, inside, prefix = None, False, path + "."
    for name, m in root.named_modules():  # pre-order: a module's descendants follow it directly
        if inside and not name.startswith(prefix):
            break
        if name == path:
            inside = True
            continue
        d = _dim_of(m)
        if d is not None:
            last = d
    return last


def _dim_of(m: nn.Module) -> int | None:
    for attr in _FEATURE_DIM_ATTRS:
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if isinstance(x, dict):
        for v in x.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


class Capture:
    """Keeps the latest input or output tensor of one module; ``pop()`` returns it and clears it.

    Clearing on read guarantees that an objective never silently reuses a stale feature from an
    earlier batch: if the module did not run for this batch, ``pop()`` returns None.
    """

    def __init__(self, module: nn.Module, which: Literal["input", "output"] = "output"):
        self.module = module
        self.which = which
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        self.value = _first_tensor(inputs if self.which == "input" else output)

    def pop(self) -> torch.Tensor | None:
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        self.handle.remove()
        self.value = None
