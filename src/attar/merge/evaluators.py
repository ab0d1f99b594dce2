"""Wiring the data-driven merge methods to real data: evaluators, Fisher estimators, fine-tuned ingredients.

Greedy soup, WiSE-FT, LCSC and Fisher merging take callbacks
(:class:`~attar.merge.methods.Evaluator`, :class:`~attar.merge.methods.FisherEstimator`);
these helpers build them for attar models from tensors or a
:class:`~attar.data.DataBundle`, using the trainer's own pieces
(:func:`attar.train.trainer.predict`, :class:`~attar.train.trainer.Trainer`,
:func:`attar.metrics.classification_metrics`), so a score here is the score a
run would report. Score on the validation split (carved from train), never on test.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from attar.data import make_augment
from attar.distill.objectives import build_objective
from attar.errors import AttarError
from attar.merge.methods.base import Evaluator, FisherEstimator, StateDict
from attar.merge.test_time import _logits
from attar.metrics import classification_metrics
from attar.train.config import TrainConfig
from attar.train.progress import StepProgress
from attar.train.trainer import Trainer, predict

Metric = Literal["accuracy", "nll"]


def accuracy_evaluator(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    metric: Metric = "accuracy",
    batch_size: int = 1024,
    strict: bool = True,
) -> Evaluator:
    """``state_dict -> score`` on ``(x, y)``: accuracy, or −NLL with ``metric="nll"`` (higher is better either way).

    ``model`` is only a template: it is copied once and each state dict is
    loaded into the copy (``strict`` as in ``load_state_dict``; ``strict=False``
    lets a partial state dict, e.g. a merged backbone, replace only its tensors).
    Evaluation runs in eval mode and inference mode, ``batch_size`` rows at a time.
    """
    if metric not in ("accuracy", "nll"):
        raise AttarError(f"evaluator metric must be 'accuracy' or 'nll', got {metric!r}.")
    if len(x) != len(y) or len(x) == 0:
        raise AttarError(f"the held-out split needs as many labels as rows and at least one row; got {len(x)} rows, {len(y)} labels.")
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(x) == 0:
        raise AttarError("the held-out split has no labeled rows; an evaluator needs labels.")
    template = copy.deepcopy(model)

    def evaluate(state_dict: StateDict) -> float:
        missing, unexpected = template.load_state_dict(dict(state_dict), strict=strict)
        if unexpected:
            raise AttarError(f"the state dict has tensors the model does not: {sorted(unexpected)[:3]}")
        m = classification_metrics(predict(template, x, batch_size), y)
        return float(m["accuracy"]) if metric == "accuracy" else -float(m["nll"])

    return evaluate


def evaluator_for(model: nn.Module, bundle: Any, split: Literal["val", "test"] = "val", **kwargs: Any) -> Evaluator:
    """:func:`accuracy_evaluator` on a DataBundle's validation split (or ``test``, for final reports only)."""
    s = getattr(bundle, split)
    if len(s) == 0:
        raise AttarError(f"data set {bundle.name!r} has an empty {split} split; set data.val_fraction > 0 to hold out rows for merging.")
    return accuracy_evaluator(model, s.x, s.y, **kwargs)


def _selector(include: Callable[[str], bool] | Sequence[str] | None) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if callable(include):
        return include
    prefixes = tuple(include)
    return lambda name: name.startswith(prefixes)


def fisher_estimator(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    labels: Literal["expected", "sampled", "empirical"] = "expected",
    max_examples: int | None = 512,
    batch_size: int = 16,
    include: Callable[[str], bool] | Sequence[str] | None = None,
    seed: int = 0,
) -> FisherEstimator:
    """A :class:`FisherEstimator` on rows of ``x``: mean over examples of squared per-example gradients of log p(y|x).

    Same estimator as :func:`attar.merge.methods.diagonal_fisher` (``labels``:
    ``expected`` sums over classes weighted by p(y|x), the exact diagonal
    Fisher; ``sampled`` draws y ~ p(y|x); ``empirical`` uses ``y``), but
    vectorised over a batch with ``torch.func`` instead of one backward pass
    per example and class. ``include`` (a predicate or name prefixes) picks the
    parameters to estimate (e.g. ``["net.features."]`` for a shared backbone);
    the others are held fixed. Memory per batch ≈ batch_size × classes × (parameters
    selected) floats for ``expected``; lower ``batch_size`` for large models.
    """
    if labels not in ("expected", "sampled", "empirical"):
        raise AttarError(f"Fisher labels must be expected, sampled or empirical, got {labels!r}.")
    if labels == "empirical" and y is None:
        raise AttarError("labels='empirical' needs the labels y.")
    if max_examples is not None:
        x = x[:max_examples]
        y = None if y is None else y[:max_examples]
    if len(x) == 0:
        raise AttarError("fisher_estimator got no examples.")
    pick = _selector(include)

    def estimate(model: nn.Module) -> dict[str, torch.Tensor]:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and pick(n)}
        if not params:
            raise AttarError("no trainable parameter matches `include`; nothing to estimate a Fisher for.")
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
        fixed.update({n: b for n, b in model.named_buffers()})

        def log_probs(p: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
            out = _logits(functional_call(model, {**fixed, **p}, (x1.unsqueeze(0),)))
            return F.log_softmax(out.float(), dim=-1).reshape(-1)

        def log_prob_of(p: dict[str, torch.Tensor], x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return (log_probs(p, x1) * c).sum()  # c: one-hot row (indexing by a batched tensor does not vmap)

        fisher = {n: torch.zeros_like(v, dtype=torch.float32) for n, v in params.items()}
        g = torch.Generator().manual_seed(seed)
        was = model.training
        model.eval()
        try:
            with StepProgress("Fisher", len(x), unit="examples") as bar:
                for start in range(0, len(x), batch_size):
                    xb = x[start : start + batch_size]
                    if labels == "expected":
                        probs = vmap(log_probs, in_dims=(None, 0))(params, xb).exp()  # [B, C]
                        jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, xb)  # name -> [B, C, *shape]
                        for n, j in jac.items():
                            w = probs.reshape(*probs.shape, *([1] * (j.dim() - 2)))
                            fisher[n].add_((w * j.float().pow(2)).sum((0, 1)))
                    else:
                        probs = vmap(log_probs, in_dims=(None, 0))(params, xb).exp()
                        if labels == "sampled":
                            cls = torch.multinomial(probs, 1, generator=g).squeeze(1)
                        else:
                            cls = y[start : start + batch_size].long()
                        onehot = F.one_hot(cls, probs.shape[1]).to(torch.float32)
                        grads = vmap(grad(log_prob_of), in_dims=(None, 0, 0))(params, xb, onehot)
                        for n, gr in grads.items():
                            fisher[n].add_(gr.float().pow(2).sum(0))
                    bar.update(len(xb))
        finally:
            model.train(was)
        return {n: f / len(x) for n, f in fisher.items()}

    return estimate


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: Mapping[str, Any] | Any,
    *,
    seed: int = 0,
    objective: Mapping[str, Any] | None = None,
    augment: Sequence[str] | Callable | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    copy_model: bool = True,
    name: str = "finetune",
    num_classes: int | None = None,
) -> nn.Module:
    """Train a (copy of a) model with attar's trainer: a soup ingredient, a task expert, a WiSE-FT end point.

    ``train`` is a :class:`attar.recipe.TrainConfig` or its fields as a dict;
    ``objective`` an objective spec (default cross-entropy); ``augment`` named
    augmentations (``["crop", "flip"]``) or an ``(x, generator) -> x`` function.
    Deterministic in ``seed`` like every trainer run. No checkpoints are written.
    """
    cfg = train if isinstance(train, TrainConfig) else TrainConfig.model_validate(dict(train))
    m = copy.deepcopy(model) if copy_model else model
    aug = make_augment(augment) if isinstance(augment, (list, tuple, str)) else augment
    if aug is None and cfg.augment:
        aug = make_augment(cfg.augment)
    if num_classes is None:
        num_classes = getattr(m, "num_classes", None) or (int(y.max()) + 1 if len(y) else None)
    trainer = Trainer(
        m, build_objective(dict(objective or {"name": "ce"})), x, y, cfg, seed=seed, val=val, augment=aug or None,
        name=name, num_classes=num_classes,
    )
    return trainer.fit().model


def state_dicts(models: Iterable[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Detached copies of the models' state dicts (what the model-level methods take)."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
