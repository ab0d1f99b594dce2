"""The merge config: mergekit's YAML format as users already write it, plus attar's extra methods.

Why mergekit's shape: thousands of published merge configs use it; a config
that names a method attar has should run unchanged. Keys attar does not act on
(``int8_mask``, a ``weight`` given to a method that has none) are accepted with a note
instead of an error; ``slices`` (layer ranges, frankenmerges), ``tokenizer: {pad_to_multiple_of, tokens}`` and
``chat_template`` are honoured (different vocabularies are aligned by token string); what attar cannot do
(``modules``) fails before any tensor is read, with a message saying what to use.

Parameter values follow mergekit's rules (:func:`evaluate_setting`): a scalar;
a list of numbers interpolated along the layers (a "gradient"); or a list of
``{filter, value}`` conditions where ``filter`` is a substring of the tensor
name and the first match wins.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, create_model,
                      model_validator)
from pydantic.fields import FieldInfo

from attar.errors import AttarError
from attar.merge.methods import MERGE_METHODS, REQUIRED, MergeMethod, tensor_method
from attar.merge.methods.params import bounds, is_per_model, param_fields, range_text
from attar.registry import Params, validation_error

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    """``{filter: self_attn, value: 0.3}``: applies to tensors whose name contains ``filter``."""

    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Condition, list[Condition], None]


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Setting] | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, Setting] | None = None


def _token_source_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "model"
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("model_token", "zero") else None


class ModelTokenSource(_Strict):
    """``{kind: model_token, model: M, token_id: N}`` (row N of M's vocabulary tensors) or ``{..., token: T}``
    (the row of M's own token T): any row of one merged model, not necessarily the same token."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source takes exactly one of `token_id` and `token`.")
        return self


class ZeroTokenSource(_Strict):
    """``{kind: zero}``: a row of zeros."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """One entry of ``tokenizer.tokens``: where an output token's rows come from. ``source`` is a merged model's
    name (its row for this token), a :class:`ModelTokenSource` or a :class:`ZeroTokenSource`. Without ``force`` it
    only fills the inputs that lack the token; with ``force`` it replaces every input's row, so the merge of
    those equal rows is the chosen row (for the usual weighted methods)."""

    source: Annotated[
        Union[Annotated[str, Tag("model")], Annotated[ModelTokenSource, Tag("model_token")],
              Annotated[ZeroTokenSource, Tag("zero")]],
        Discriminator(_token_source_kind, custom_error_type="token_source",
                      custom_error_message="a token's source is a merged model's name, {kind: model_token, model: M, "
                                           "token_id: N | token: T} or {kind: zero}"),
    ]
    force: bool = False


class TokenizerSettings(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``union``, ``base`` or a model; inputs aligned to
    it by token string, see :mod:`attar.merge.vocab`), optionally padded, with per-token row sources (``tokens``,
    keyed by the token as the output tokenizer's vocabulary spells it)."""

    source: str | None = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


IGNORED_PARAMS = {"int8_mask": "int8_mask is a memory trick of mergekit's; attar's masks are already bool, so it is ignored"}

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


def parse_dtype(value: str | None, field: str = "dtype") -> str | None:
    if value is None:
        return None
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise AttarError(f"{field}: unknown dtype {value!r}; use one of float32, float16, bfloat16.") from None


class MergeConfig(_Strict):
    """One merge. ``models`` (or one full-range ``slice``) + ``merge_method`` + optional ``base_model``."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    seed: int = Field(0, description="attar extra: seeds random methods (DARE) per tensor name")

    # Filled by validation: what the config says that attar will not act on, and
    # the layer range of a converted full-range slice (checked against the model).
    _notes: list[str] = PrivateAttr(default_factory=list)
    _layer_range: tuple[int, int] | None = PrivateAttr(None)
    _slices: list[Slice] | None = PrivateAttr(None)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @property
    def layer_range(self) -> tuple[int, int] | None:
        return self._layer_range

    @property
    def layer_slices(self) -> list[Slice] | None:
        """The config's ``slices`` when they rearrange layers (a frankenmerge); None for whole models."""
        return self._slices

    @property
    def vocab_source(self) -> str | None:
        """``tokenizer.source`` or ``tokenizer_source`` when the config asks for a tokenizer to be built."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    @property
    def pad_to_multiple_of(self) -> int | None:
        return self.tokenizer.pad_to_multiple_of if self.tokenizer is not None else None

    @model_validator(mode="after")
    def _shape(self) -> "MergeConfig":
        if self.modules:
            raise ValueError("`modules` (per-module merges of multimodal models) is not supported yet; use `models`.")
        if self.slices and self.models:
            raise ValueError("give either `models` or `slices`, not both.")
        if self.slices:
            self._from_slices()
        if not self.models and not self._slices:
            raise ValueError("`models` is empty: list the models to merge, e.g. models: [{model: ./ft-a}, {model: ./ft-b}].")
        if self.tokenizer is not None and self.tokenizer.tokens and self.tokenizer.source is None:
            raise ValueError("tokenizer.tokens needs tokenizer.source (union, base or a model) to name the output vocabulary.")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer_source` or `tokenizer: {source: ...}`, not both.")
        self.dtype = parse_dtype(self.dtype, "dtype")
        self.out_dtype = parse_dtype(self.out_dtype, "out_dtype")
        return self

    def _from_slices(self) -> None:
        """One slice whose sources share a layer range starting at 0 reads as ``models`` (the usual SLERP config;
        if the range turns out not to cover the model, the engine merges it as a slice). Other slices are kept as
        a layer plan (:attr:`layer_slices`): each slice's sources need ranges of equal length."""
        for i, sl in enumerate(self.slices):
            if not sl.sources:
                raise ValueError(f"slices[{i}] has no sources.")
            if sl.residual_weight is not None:
                raise ValueError(f"slices[{i}].residual_weight is not supported (mergekit 0.1.5 has no such merge either).")
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) != 1:
                raise ValueError(f"slices[{i}]: the sources' layer ranges have different lengths "
                                 f"{[list(s.layer_range) for s in sl.sources]}; each output layer needs one layer of every source.")
            for s in sl.sources:
                if not 0 <= s.layer_range[0] < s.layer_range[1]:
                    raise ValueError(f"slices[{i}]: layer_range {list(s.layer_range)} of {s.model} is empty or negative.")
        ranges = {tuple(s.layer_range) for s in self.slices[0].sources}
        if len(self.slices) != 1 or len(ranges) != 1 or next(iter(ranges))[0] != 0:
            self._slices = list(self.slices)
            self.slices = None
            return
        sl = self.slices[0]
        self._slices = [sl]
        self._layer_range = next(iter(ranges))
        if sl.base_model:
            if self.base_model and self.base_model != sl.base_model:
                raise ValueError("the slice's base_model differs from the top-level base_model.")
            self.base_model = sl.base_model
        if sl.parameters:
            merged = dict(self.parameters or {})
            merged.update(sl.parameters)  # slice parameters take precedence over global ones, as in mergekit
            self.parameters = merged
        self.models = [ModelEntry(model=s.model, parameters=s.parameters) for s in sl.sources]
        self.slices = None

    def method(self) -> MergeMethod:
        return tensor_method(self.merge_method)

    def check_parameters(self) -> None:
        """Every parameter against the method's ``Params`` (see :func:`check_settings`); a model path where the
        method needs one (``old_base``)."""
        method = self.method()
        scopes = [("parameters", self.parameters, True)] + [
            (f"models[{i}].parameters ({m.model})", m.parameters, False) for i, m in enumerate(self.models or [])
        ]
        for i, sl in enumerate(self._slices or [] if not self.models else []):
            scopes.append((f"slices[{i}].parameters", sl.parameters, True))
            scopes += [(f"slices[{i}].sources[{j}].parameters ({s.model})", s.parameters, False)
                       for j, s in enumerate(sl.sources)]
        for where, params, shared in scopes:
            for note in check_settings(method, where, params, shared=shared):
                if note not in self.notes:
                    self.notes.append(note)
        fields = param_fields(method.Params)
        for ref in method.model_refs:
            value = (self.parameters or {}).get(ref)
            if not isinstance(value, str) and (value is not None or fields[ref].is_required()):
                raise AttarError(f"parameters.{ref}: {method.name} needs a model path here (e.g. {ref}: ./old-base).")


# ---------------------------------------------------------------- checking settings against a method's Params


def _leaves(value: Any) -> list[Any]:
    """Every plain value inside a setting: scalars, gradient lists, ``{filter, value}`` entries (parsed or raw dicts)."""
    if isinstance(value, Condition):
        return _leaves(value.value)
    if isinstance(value, dict) and "value" in value:
        return _leaves(value["value"])
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@functools.cache
def _one_field(model: type[Params], key: str) -> type[Params]:
    """``model`` cut down to field ``key``, to validate one value of a setting with that field's type and range."""
    name, info = next((n, i) for n, i in model.model_fields.items() if (i.alias or n) == key)
    return create_model(f"{model.__name__}_{name}", __base__=Params, **{name: (info.annotation, info)})


def check_settings(method: str | MergeMethod, where: str, settings: Mapping[str, Any] | None, *,
                   shared: bool | None = None) -> list[str]:
    """Refuse what the method's ``Params`` does not accept, naming the field: an unknown name (a typo such as
    ``densty`` must not silently do nothing), a shared option given per model (``shared=False``), or a value
    of the wrong type or outside its range (NaN and inf included), checking every value of a gradient or
    ``{filter, value}`` list. Returns the notes for keys attar accepts and ignores (``int8_mask``)."""
    m = method if isinstance(method, MergeMethod) else MERGE_METHODS.get(method)
    fields = param_fields(m.Params)
    notes = []
    for key, setting in (settings or {}).items():
        if key in IGNORED_PARAMS:
            notes.append(IGNORED_PARAMS[key] + ".")
            continue
        info = fields.get(key)
        if info is None and key == "weight":  # mergekit configs give every model a weight; methods without one ignore it
            notes.append(f"{m.name} takes no weight; the `weight` given ({where}) is ignored, as mergekit ignores it.")
            continue
        if info is None:
            raise AttarError(f"{where}: {m.name} has no parameter {key!r}; an unknown parameter would silently do "
                             f"nothing. Known: {', '.join(sorted(fields)) or '(none)'}.")
        if shared is False and not is_per_model(info):
            raise AttarError(f"{where}: {key!r} is a shared parameter of {m.name}; put it under the top-level `parameters`.")
        whole = get_origin(info.annotation) is list  # a list-valued field, not a gradient of scalars
        for leaf in [setting] if whole else _leaves(setting):
            _check_value(m, where, key, leaf, info)
    return notes


def _check_value(method: MergeMethod, where: str, key: str, value: Any, info: FieldInfo) -> None:
    if value is None:
        return
    span = bounds(info)
    if span is not None and isinstance(value, bool):  # pydantic would read true as 1
        raise AttarError(f"{where}: {key} {value!r} is not a number; {method.name} needs {key} ({info.description}) "
                         f"to be {range_text(*span)}.")
    try:
        _one_field(method.Params, key).model_validate({key: value})
    except ValidationError as e:
        if span is None:
            raise validation_error(f"{where}: {method.name}", e, method.Params) from None
        err = e.errors()[0]
        what = "is not a number" if err["type"].endswith(("_parsing", "_type")) else "is out of range"
        raise AttarError(f"{where}: {key} {err.get('input', value)!r} {what}; {method.name} needs {key} "
                         f"({info.description}) to be {range_text(*span)}.") from None


def load_merge_config(source: str | Path | dict) -> MergeConfig:
    """Parse a YAML file (or a dict, e.g. a recipe stage) into a validated :class:`MergeConfig`."""
    where = "merge config"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise AttarError(f"merge config {path} does not exist.")
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            raise AttarError(f"{path} is not valid YAML: {e}") from None
        docs = [d for d in docs if d is not None]
        if len(docs) != 1:
            raise AttarError(f"{path} holds {len(docs)} YAML documents; multi-stage merges are not supported yet.")
        data = docs[0]
    if not isinstance(data, dict):
        raise AttarError(f"{where}: expected a mapping with merge_method and models, got {type(data).__name__}.")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see docs/merge.md for the accepted keys)"
            lines.append(f"  {loc}: {msg}")
        # Unions produce one error per alternative; keep them short but complete.
        raise AttarError(f"{where} is not a valid merge config:\n" + "\n".join(dict.fromkeys(lines))) from None
    cfg.check_parameters()
    return cfg


# ---------------------------------------------------------------- per-tensor parameter values

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer-block index in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER_RE.search(name) or _ANY_INDEX_RE.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits along the depth, 0..1, as mergekit computes it for gradients.

    Block ``i`` of ``n`` is at ``i / (n − 1)`` (1 when n == 1); tensors outside
    the blocks (embeddings, final norm, head) are at 0, as in mergekit.
    """
    i = layer_index(name)
    if i is None or num_layers <= 0:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor, or None when no filter matches (mergekit's rules)."""
    if isinstance(setting, Condition):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(_is_number(e) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(math.floor(scaled))
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Condition):
                raise AttarError(f"cannot mix plain values and {{filter, value}} entries in one list: {setting!r}")
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    raise AttarError(f"unexpected parameter value {setting!r}")


def _coerce(name: str, value: Any, default: Any, method: str) -> Any:
    if default is REQUIRED or default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and name == "rescale":
            if value.lower() in ("l1", "l2", "linf", "density", "none"):
                return value.lower()
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if name == "rescale":
            raise AttarError(f"{method}: rescale must be true, false, l1, l2, linf or density; got {value!r}.")
        raise AttarError(f"{method}: parameter {name} must be true or false; got {value!r}.")
    if isinstance(default, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise AttarError(f"{method}: parameter {name} must be a number; got {value!r}.") from None
    return value


def resolve_parameters(
    method: MergeMethod,
    tensor_name: str,
    t: float,
    model_settings: list[dict[str, Setting] | None],
    global_settings: dict[str, Setting] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared options and per-model parameters for one tensor.

    Precedence as in mergekit: a model's own setting, then the global one, then
    the method's default. A setting whose filters do not match falls through.
    """
    glob = global_settings or {}

    def pick(name: str, scopes: list[dict[str, Setting]], default: Any) -> Any:
        for scope in scopes:
            if name in scope:
                v = evaluate_setting(scope[name], tensor_name, t)
                if v is not None:
                    return _coerce(name, v, default, method.name)
        if default is REQUIRED:
            raise AttarError(f"{method.name}: parameter {name!r} is required (missing for tensor {tensor_name!r}).")
        return default

    options = {k: pick(k, [glob], d) for k, d in method.options.items()}
    per_model = [
        {k: pick(k, [ms or {}, glob], d) for k, d in method.model_params.items()} for ms in model_settings
    ]
    return options, per_model
