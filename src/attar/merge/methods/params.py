"""The parameters merge methods take, as typed fields with their allowed ranges.

A method's ``Params`` (a strict :class:`attar.registry.Params`) is the one place its parameters are named,
defaulted, described and range-checked: the config loader, ``merge_state_dicts``, a recipe's ``merge``
stage and ``attar methods`` all read it. Fields marked :data:`PER_MODEL` may be set per model
(``models[i].parameters``) as well as globally; the others are shared options. Ranges are declared
once here, because the same ``weight`` or ``density`` means the same thing in every method.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field
from pydantic.fields import FieldInfo

from attar.registry import Params

F32_MAX = 3.4028234663852886e38  # merges run in float32: a larger factor overflows to inf on the first tensor
REQUIRED: Any = object()  # a parameter's default when the user must give it


class _PerModel:
    """Metadata marker: the field may be given per model (``models[i].parameters``), not only globally."""

    def __repr__(self) -> str:
        return "PER_MODEL"


PER_MODEL = _PerModel()


def _rescale_word(v: Any) -> Any:
    """``L1`` -> ``l1``, ``"true"`` -> ``True``: what a YAML writer may mean, before the choices are checked."""
    if isinstance(v, str):
        v = v.lower()
        return {"true": True, "false": False}.get(v, v)
    return v


Weight = Annotated[float, Field(ge=-F32_MAX, le=F32_MAX, description="a model's weight"), PER_MODEL]
Density = Annotated[float, Field(gt=0.0, le=1.0, description="the fraction of each task vector kept"), PER_MODEL]
Gamma = Annotated[float, Field(ge=0.0, lt=1.0, description="the fraction of largest entries dropped as outliers"), PER_MODEL]
Lambda = Annotated[float, Field(ge=-F32_MAX, le=F32_MAX, alias="lambda", description="the factor on the summed task vectors")]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Rescale = Annotated[
    Literal[True, False, "l1", "l2", "linf", "density", "none"],
    BeforeValidator(_rescale_word),
    Field(description="after sparsifying: true (1/density for random drops, L1-norm matching for magnitude "
                      "pruning), false, or a rule: l1, l2, linf, density"),
]


def param_fields(model: type[Params] | None) -> dict[str, FieldInfo]:
    """``{name as written in a config: field}`` (``lambda``, not ``lambda_``)."""
    return {info.alias or name: info for name, info in (model.model_fields if model is not None else {}).items()}


def is_per_model(info: FieldInfo) -> bool:
    return any(m is PER_MODEL for m in info.metadata)


def defaults(model: type[Params] | None, per_model: bool) -> dict[str, Any]:
    """Default of each shared (or per-model) field; required fields map to ``REQUIRED``."""
    return {k: (REQUIRED if info.is_required() else info.get_default(call_default_factory=True))
            for k, info in param_fields(model).items() if is_per_model(info) == per_model}


def bounds(info: FieldInfo) -> tuple[float, float, bool, bool] | None:
    """``(low, high, low included, high included)`` of a numeric field (or of its items), else None."""
    metas = list(info.metadata)
    stack = list(get_args(info.annotation))
    while stack:  # constraints on list items or Optional[...] members sit on nested Annotated types
        arg = stack.pop()
        metas += [m for meta in getattr(arg, "__metadata__", ()) for m in getattr(meta, "metadata", [meta])]
        stack += get_args(arg)
    lo = hi = None
    lo_in = hi_in = True
    for m in metas:
        for attr, is_low, inclusive in (("ge", True, True), ("gt", True, False), ("le", False, True), ("lt", False, False)):
            value = getattr(m, attr, None)
            if value is None:
                continue
            if is_low:
                lo, lo_in = value, inclusive
            else:
                hi, hi_in = value, inclusive
    if lo is None or hi is None:
        return None
    return float(lo), float(hi), lo_in, hi_in


def range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    if lo == -F32_MAX and hi == F32_MAX:
        return "a finite number within float32's range (|x| <= 3.4e38), since merges compute in float32"
    if hi == F32_MAX:
        return f"a finite number {'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
