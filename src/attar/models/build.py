"""Turn a ModelSpec into a model, and save/load model artifacts symmetrically.

Why one entry point: recipes name models four ways (``arch``, ``pretrained``,
``artifact``, ``hf``) and every caller (trainer, evaluator, CLI) should get the
same wrapped ``AttarModel`` back, with the same module paths, whichever way.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import ValidationError
from torch import nn

from attar.checkpoint import load_model_artifact, save_model_artifact
from attar.errors import AttarError
from attar.registry import validation_error
from attar.models.archs import ARCHS
from attar.models.layers import AttarModel, Normalize
from attar.models.pretrained import PRETRAINED
from attar.specs import ModelSpec

_RESERVED = ("kind", "spec", "input_shape", "num_classes", "mean", "std")


def _as_list(v: float | Sequence[float] | torch.Tensor | None) -> list[float] | None:
    if v is None:
        return None
    return [float(x) for x in torch.as_tensor(v, dtype=torch.float64).flatten().tolist()]


def _check_stats(name: str, v: list[float] | None, input_shape: tuple[int, ...]) -> None:
    if v is None:
        return
    c = input_shape[0]
    if len(v) not in (1, c):
        raise AttarError(
            f"Normalisation {name} has {len(v)} values but inputs of shape {input_shape} have {c} "
            f"{'channels' if len(input_shape) == 3 else 'features'}; give 1 or {c} values."
        )


def build_model(
    spec: ModelSpec | dict,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    *,
    _load_weights: bool = True,
) -> AttarModel:
    """Build the model a spec describes, as an ``AttarModel`` (``pre`` then ``net``).

    * ``arch``: a fresh network from :data:`ARCHS`; when ``mean``/``std`` are given
      (the data set's statistics) ``pre.normalize`` applies them.
    * ``pretrained``: a teacher from :data:`PRETRAINED`, carrying its own input
      normalisation; ``mean``/``std`` are ignored.
    * ``artifact``: a saved model folder (see :func:`load_model`); ``input_shape``
      and ``num_classes`` may be ``None``, otherwise they must match the artifact's.
    * ``hf``: not an image model (an AttarError explains where HF models go).
    """
    if isinstance(spec, dict):
        try:
            spec = ModelSpec.model_validate(spec)
        except ValidationError as e:
            raise validation_error(f"Invalid model spec {spec}", e, ModelSpec) from None
    if spec.hf:
        raise AttarError(
            f"model {{hf: {spec.hf}}}: image pipelines take arch, pretrained or artifact models; "
            "Hugging Face models arrive with `attar finetune` (issue 5)."
        )
    if spec.artifact:
        model, info = load_model(spec.artifact)
        if input_shape is not None and tuple(input_shape) != tuple(info["input_shape"]):
            raise AttarError(
                f"model artifact {spec.artifact} was built for inputs of shape {tuple(info['input_shape'])} "
                f"but the data has shape {tuple(input_shape)}; use data of the same shape or train a new model."
            )
        if num_classes is not None and int(num_classes) != int(info["num_classes"]):
            raise AttarError(
                f"model artifact {spec.artifact} predicts {info['num_classes']} classes but the data has {num_classes}; "
                "use data with the same label set, or fine-tune a model with a new head for these classes."
            )
        return model
    if input_shape is None or num_classes is None:
        raise AttarError("build_model needs input_shape and num_classes for arch and pretrained models.")
    input_shape = tuple(int(s) for s in input_shape)
    kwargs = spec.arch_kwargs()
    if spec.pretrained and spec.parameterization is not None:
        raise AttarError(f"model {{pretrained: {spec.pretrained}}}: parameterization (SLTrain) builds a fresh network; "
                         "use it with arch, or drop it.")
    if spec.pretrained:
        model = PRETRAINED.get(spec.pretrained)(input_shape, num_classes, _load_weights=_load_weights, **kwargs)
        model.spec = spec
        return model
    net = ARCHS.get(spec.arch)(input_shape, num_classes, **kwargs)
    if spec.parameterization is not None:  # SLTrain: W = B A + S on the fresh network's weight matrices
        from attar.models.sltrain import apply_sltrain

        sl = spec.parameterization.sltrain
        apply_sltrain(net, sl.rank, sl.sparsity, sl.exclude)
    mean_l, std_l = _as_list(mean), _as_list(std)
    if (mean_l is None) != (std_l is None):
        raise AttarError("Give both mean and std for input normalisation, or neither.")
    _check_stats("mean", mean_l, input_shape)
    _check_stats("std", std_l, input_shape)
    pre = nn.Sequential()
    if mean_l is not None:
        pre = nn.Sequential(OrderedDict(normalize=Normalize(mean_l, std_l)))
    return AttarModel(pre, net, spec=spec, input_shape=input_shape, num_classes=num_classes, mean=mean_l, std=std_l)


def _spec_summary(spec: ModelSpec) -> str:
    return str(spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True))


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path, spec: ModelSpec) -> None:
    """load_state_dict, but every missing/unexpected/mis-shaped tensor is named with the likely fix."""
    own = model.state_dict()
    problems: list[str] = []
    for k in sorted(set(own) - set(tensors)):
        problems.append(f"tensor {k!r} (shape {tuple(own[k].shape)}) is missing from the artifact")
    for k in sorted(set(tensors) - set(own)):
        problems.append(f"tensor {k!r} (shape {tuple(tensors[k].shape)}) in the artifact has no place in the model")
    for k in sorted(set(own) & set(tensors)):
        if own[k].shape != tensors[k].shape:
            problems.append(
                f"tensor {k!r} has shape {tuple(tensors[k].shape)} in the artifact but {tuple(own[k].shape)} in the model"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AttarError(
            f"Model artifact {folder} does not fit the model its state.json describes ({_spec_summary(spec)}): {shown}. "
            "The spec in state.json (e.g. width, depth, norm, hidden) differs from the one the weights were trained with: "
            "fix it to match, or re-save the model with attar.models.save_model, which records the spec it was built from."
        )
    model.load_state_dict(tensors, strict=True)


def load_model(folder: str | Path) -> tuple[AttarModel, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` and load its weights (verified against the manifest).

    Returns ``(model, info)`` where ``info`` is the artifact's state.json
    (``spec``, ``input_shape``, ``num_classes``, ``mean``, ``std`` and any extras).
    Pretrained specs are rebuilt without reading the package's weights, since the
    artifact's own weights replace them.
    """
    folder = Path(folder)
    if not folder.exists():
        raise AttarError(f"Model artifact {folder} does not exist; give the folder written by save_model or `attar train`.")
    tensors, info = load_model_artifact(folder)
    for key in ("spec", "input_shape", "num_classes"):
        if key not in info:
            raise AttarError(f"{folder}/state.json lacks {key!r}; it was not written by attar.models.save_model.")
    try:
        spec = ModelSpec.model_validate(info["spec"])
    except ValidationError as e:
        raise validation_error(f"{folder}/state.json has an invalid model spec {info['spec']}", e, ModelSpec) from None
    if spec.artifact or spec.hf:
        raise AttarError(f"{folder}/state.json spec must be an arch or pretrained spec, got {info['spec']}.")
    model = build_model(
        spec, info["input_shape"], int(info["num_classes"]), info.get("mean"), info.get("std"), _load_weights=False
    )
    _load_strict(model, tensors, folder, spec)
    return model, info


def save_model(
    folder: str | Path,
    model: nn.Module,
    spec: ModelSpec | dict | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model artifact that :func:`load_model` rebuilds exactly.

    Arguments left as ``None`` are taken from the ``AttarModel``'s recorded build
    arguments, so ``save_model(folder, build_model(...))`` is enough. ``extra``
    (JSON-able: metrics, recipe hash, ...) is stored in state.json too.
    """
    if isinstance(spec, dict):
        spec = ModelSpec.model_validate(spec)
    if spec is not None and spec.artifact:
        spec = None  # a model loaded from an artifact records the spec it was really built from
    spec = spec if spec is not None else getattr(model, "spec", None)
    input_shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if mean is None and std is None:
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if (mean is None) != (std is None):
        raise AttarError("save_model: give both mean and std, or neither.")
    if spec is None or input_shape is None or num_classes is None:
        raise AttarError(
            "save_model needs the model's spec, input_shape and num_classes; pass them, or save a model made by build_model."
        )
    if not isinstance(spec, ModelSpec) or spec.hf:
        raise AttarError(f"save_model takes an arch or pretrained ModelSpec, got {spec!r}.")
    info: dict[str, Any] = {
        "spec": spec.model_dump(mode="json", exclude_none=True),
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
    }
    if mean is not None:
        info["mean"], info["std"] = _as_list(mean), _as_list(std)
    for k, v in (extra or {}).items():
        if k in _RESERVED:
            raise AttarError(f"save_model extra key {k!r} is reserved ({', '.join(_RESERVED)}); rename it.")
        info[k] = v
    return save_model_artifact(folder, model, info)


def check_same_classes(teacher_dim: int, student_dim: int, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Fail clearly when two models (or a model and the data) disagree on the number of classes."""
    if int(teacher_dim) != int(student_dim):
        a, b = names
        raise AttarError(
            f"{a} predicts {teacher_dim} classes, {b} {student_dim}: their outputs cannot be compared class by class. "
            f"Use a {a} trained on the same label set as the data, or fine-tune it first "
            "(e.g. a pretrained model with args: {new_head: true})."
        )
