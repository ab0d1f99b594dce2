"""The adapter contract, the ``ADAPTERS`` registry and the pieces every adapter shares.

An :class:`Adapter` is registered in ``ADAPTERS`` with a strict ``Params`` model (the generic
:mod:`attar.registry`, so its mistakes read like every other method's) and changes a model *in place*:
``apply(model, calib, seed)`` freezes what must not train, swaps target modules for adapter
modules and leaves the classification head trainable. Adapter modules are attar's own
:class:`AdapterModule` (SSF, sparse deltas), which fold themselves back with ``merged()``, or PEFT's
LoRA layers (``attar.adapt.lora``), which PEFT merges; both carry ``attar_adapter = True``, so
:func:`merge_adapters` turns any adapted model back into the base architecture, ready to save as a
Hugging Face folder or to feed ``attar merge``.

Target modules are named by patterns: a pattern matches a module whose dotted name equals it, ends
with ``.<pattern>``, or matches it as a full regular expression. A pattern that matches nothing is
an error that lists the module names that exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from pydantic import Field
from torch import nn

from attar.errors import AttarError
from attar.registry import Params, Registry


class AdapterModule(nn.Module):
    """A module standing in for a base module (``base``); ``merged()`` returns the equivalent plain module."""

    #: lets lower layers (``text.hf`` refusing to save an unmerged model) recognise adapters without importing adapt
    attar_adapter: bool = True
    base: nn.Module

    def merged(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


def is_adapter(module: nn.Module) -> bool:
    """An attar adapter module or a PEFT layer that ``attar.adapt`` injected (both are tagged)."""
    return bool(getattr(module, "attar_adapter", False))


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(m) for m in model.modules())


def base_of(module: nn.Module) -> nn.Module:
    """The plain module an adapter module wraps (``base`` for attar's, ``get_base_layer()`` for PEFT's)."""
    return module.base if isinstance(module, AdapterModule) else module.get_base_layer()


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an adapter module adds to the one it wraps."""
    own = {id(p) for p in base_of(module).parameters()}
    return [p for p in module.parameters() if id(p) not in own]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    new.train(getattr(parent, child).training)  # a swapped-in module keeps the train/eval mode of the one it replaces
    setattr(parent, child, new)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter module into its base, in place; returns ``model`` (now the plain architecture).

    Sparse masks' trained entries and SSF's scale/shift become ordinary weights; LoRA's ``s·B@A`` is
    added to the (residual) base weight by PEFT's own ``merge``. Gradient hooks of parameter masks are
    removed. Parameters keep their ``requires_grad`` flags so the model can be trained further.
    """
    for name, mod in list(model.named_modules()):
        if not name or not is_adapter(mod):
            continue
        if isinstance(mod, AdapterModule):
            _set_module(model, name, mod.merged())
        else:  # a PEFT layer: what PEFT's merge_and_unload does for each of them
            mod.merge()
            _set_module(model, name, mod.get_base_layer())
    for hook in getattr(model, "_attar_adapter_hooks", []):
        hook.remove()
    if hasattr(model, "_attar_adapter_hooks"):
        model._attar_adapter_hooks = []
    return model


# ---------------------------------------------------------------- module selection


def head_names(model: nn.Module) -> list[str]:
    """Module paths of the classification head: ``model.head_names`` if set, else the last Linear."""
    names = getattr(model, "head_names", None)
    if names:
        return list(names)
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return found[-1:]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _listing(names: list[str], limit: int = 40) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{shown}. Their last components: {', '.join(leaves)}"


def match_modules(
    model: nn.Module,
    patterns: Sequence[str],
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    what: str = "adapter",
    exclude_head: bool = True,
) -> list[str]:
    """Names of ``types`` modules matching any pattern (head excluded); every pattern must match one."""
    heads = head_names(model) if exclude_head else []
    adapted = [n for n, m in model.named_modules() if n and is_adapter(m)]
    candidates = [n for n, m in model.named_modules()
                  if n and isinstance(m, types) and not _under(n, heads) and not _under(n, adapted)]
    if not patterns:
        raise AttarError(f"{what}: 'targets' is empty; name at least one module pattern, e.g. ['query', 'value'].")
    picked: list[str] = []
    for pat in patterns:
        hits = [n for n in candidates if _matches(pat, n)]
        taken = [n for n in adapted if _matches(pat, n)]
        if not hits and taken:
            raise AttarError(
                f"{what}: the modules matching {pat!r} already hold an adapter ({', '.join(taken[:3])}"
                f"{', …' if len(taken) > 3 else ''}); merge it first (attar.adapt.merge_adapters) to stack another."
            )
        if not hits:
            kinds = "/".join(t.__name__ for t in types)
            raise AttarError(
                f"{what}: target pattern {pat!r} matches no {kinds} module of the {type(model).__name__}. "
                f"The {kinds} modules are: {_listing(candidates) if candidates else '(none)'}. "
                "A pattern matches a module whose name equals it, ends with '.<pattern>', or fully matches it as a regex."
            )
        picked += [h for h in hits if h not in picked]
    return [n for n in candidates if n in picked]  # model order


def set_trainable(model: nn.Module, train_head: bool) -> None:
    """Freeze everything, then unfreeze the head when ``train_head``."""
    model.requires_grad_(False)
    if train_head:
        for n in head_names(model):
            model.get_submodule(n).requires_grad_(True)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): total counts the base model only; sparse-delta adapters count only their trained entries."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = {id(p) for m in model.modules() if is_adapter(m) for p in adapter_parameters(m)}
    return trainable, sum(p.numel() for p in model.parameters() if id(p) not in added)


# ---------------------------------------------------------------- calibration data


@dataclass
class Calibration:
    """A few training batches for data-aware initialisers (LoRA-GA gradients, EVA activations).

    ``loss`` maps ``(logits, y)`` to a scalar; ``token_mask`` (optional) maps a batch ``x`` to the
    ``[B, L]`` mask of real tokens, so padding does not enter activation statistics.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    token_mask: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_data(cls, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: int, batch_size: int, seed: int) -> "Calibration":
        g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        order = torch.randperm(len(x), generator=g)
        out = [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, min(len(x), batches * batch_size), batch_size)]
        return cls(out, token_mask=getattr(model, "token_mask", None))


# ---------------------------------------------------------------- the adapter base class


class AdapterParams(Params):
    train_head: bool = Field(True, description="also train the classification head (a new head must be trained)")


class Adapter:
    """Base class: ``name``, ``summary``, a strict ``Params`` model, and ``apply``.

    ``Adapter(params)`` takes validated params (what ``ADAPTERS.build`` passes); ``Adapter(**fields)`` validates them.
    """

    name: ClassVar[str] = "?"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[AdapterParams]] = AdapterParams
    needs_calibration: ClassVar[bool] = False
    target_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __init__(self, p: AdapterParams | None = None, **params: Any):
        self.p = p if p is not None else ADAPTERS.parse(self.name, params)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.p.model_dump(mode="json")}

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        """Adapt ``model`` in place; returns facts worth recording (e.g. EVA's ranks)."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> list[str]:
        """Raise now if the target patterns match nothing in ``model`` (which may live on the meta device)."""
        targets = getattr(self.p, "targets", None)
        return match_modules(model, targets, self.target_types, what=f"adapter {self.name!r}") if targets is not None else []


ADAPTERS: Registry[type[Adapter]] = Registry("adapter")


register = ADAPTERS.named  # ``@register("lora")``: the class is listed under, and knows, its name


def build_adapter(spec: "Adapter | dict[str, Any] | str") -> Adapter:
    """``"lora"`` or ``{"name": "lora", "rank": 8, "init": "pissa"}`` -> a configured adapter."""
    return spec if isinstance(spec, Adapter) else ADAPTERS.build(spec)


def adapter_fields(name: str) -> dict[str, dict[str, Any]]:
    """``{field: {type, default, required, description}}`` of adapter ``name`` (for listings)."""
    return ADAPTERS.fields(name)
