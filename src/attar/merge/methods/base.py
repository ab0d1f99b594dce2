"""The contract every merge method follows, and the registry that lists them.

Two levels, because they need different things:

* **tensor** methods are pure functions of one tensor name at a time
  (``fn(TensorInputs) -> Tensor``). They never see a whole model, which is what
  lets the engine stream a 70B merge through a few tensors' worth of memory.
* **model** methods (greedy soup, Fisher, WiSE-FT sweep, LCSC) need data: they
  take in-memory state dicts plus callbacks (``Evaluator``, ``FisherEstimator``)
  and are wired to real data by a recipe stage, not by ``attar merge``.

All arithmetic is float32 (the engine casts before calling ``fn``); storage
dtype is restored by the caller.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal, Mapping, Protocol

import torch

from attar.errors import AttarError
from attar.merge.methods.params import defaults, param_fields
from attar.registry import Params as ParamsModel, Registry

StateDict = Mapping[str, torch.Tensor]


class Evaluator(Protocol):
    """Held-out score of a state dict; higher is better (e.g. validation accuracy)."""

    def __call__(self, state_dict: StateDict) -> float: ...


class FisherEstimator(Protocol):
    """Diagonal Fisher information of a model: parameter name -> tensor of the same shape."""

    def __call__(self, model: torch.nn.Module) -> dict[str, torch.Tensor]: ...


@dataclass
class TensorInputs:
    """Everything a tensor-level method may look at for one tensor name.

    ``models`` excludes the base for methods with ``base="required"``; for
    methods whose base is just another input (linear) the base is ``models[0]``.
    ``params[i]`` holds the resolved per-model parameters of ``models[i]``;
    ``options`` the shared ones; ``extras`` tensors of extra model references
    (e.g. ``old_base`` for fine-tuning transfer); ``seed`` is derived from the
    run seed and the tensor name, so random methods are reproducible and do not
    depend on tensor order or on streaming vs in-memory execution.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    params: list[dict[str, Any]]
    options: dict[str, Any]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0

    def generator(self, index: int) -> torch.Generator:
        """A CPU generator seeded by (run seed, tensor name, model index)."""
        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, self.name, index))
        return g


@dataclass(frozen=True)
class MergeMethod:
    """A registered method and the parameters it accepts.

    ``Params`` (a strict :class:`attar.registry.Params`, see ``methods/params.py``) names, defaults and
    range-checks them; from it come ``model_params``, the per-model ones (``models[i].parameters`` in the
    config, or given globally as a default for every model), and ``options``, the shared ones (global
    ``parameters``). ``model_refs`` name options whose values are model paths that the engine opens as
    extra inputs (when given).
    """

    name: str
    summary: str
    level: Literal["tensor", "model"] = "tensor"
    fn: Callable[[TensorInputs], torch.Tensor] | None = None
    run: Callable[..., Any] | None = None
    base: Literal["required", "optional", "none"] = "required"
    base_is_input: bool = False
    min_models: int = 1
    max_models: int | None = None
    Params: type[ParamsModel] | None = None
    model_refs: tuple[str, ...] = ()
    reference: str = ""

    @cached_property
    def model_params(self) -> dict[str, Any]:
        return defaults(self.Params, per_model=True)

    @cached_property
    def options(self) -> dict[str, Any]:
        return {k: v for k, v in defaults(self.Params, per_model=False).items() if k not in self.model_refs}

    def known_params(self) -> set[str]:
        return set(param_fields(self.Params))


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> MergeMethod:
    MERGE_METHODS.register(method.name)(method)
    return method


def stable_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from strings, stable across processes (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- task-vector building blocks (methods/task_vector.py)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |delta| (at least one when density > 0).

    Same count rule as mergekit (``k = max(1, int(density * numel))``) so TIES
    results agree with it bit for bit on tensors without ties in magnitude.
    Entries tied at the threshold magnitude are kept in index order until there
    are exactly k (mergekit's argsort leaves that order unspecified).
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    mag = delta.abs().reshape(-1)
    # The k-th largest magnitude by selection (O(n)) instead of a full sort (which
    # took ~50 s on a 38M-entry embedding, where float32 ties at the threshold are common).
    threshold = torch.kthvalue(mag, mag.numel() - k + 1).values
    mask = mag >= threshold
    extra = int(mask.sum()) - k
    if extra > 0:  # drop the last `extra` tied entries (by index) so exactly k remain
        tied = torch.nonzero(mag == threshold).flatten()
        mask[tied[len(tied) - extra :]] = False
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest and then the smallest entries, keeping ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n_bot + target]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (= 1 - drop rate p)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator) < density


def rescale_kept(delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: Any, random: bool) -> torch.Tensor:
    """Zero the dropped entries and optionally rescale what is left.

    ``rescale: true`` means the paper's rule for each family: 1/density for random
    drops (DARE, keeps the expectation), L1-norm matching for magnitude pruning
    (mergekit's rule; 1/density has no meaning there). ``"l1"``, ``"l2"``,
    ``"linf"`` and ``"density"`` pick a rule explicitly (``rescale: l1`` on DARE
    reproduces mergekit 0.1.5, which matches L1 norms).
    """
    kept = delta * mask
    if rescale is False or rescale is None or rescale == "none":
        return kept
    rule = rescale
    if rescale is True:
        rule = "density" if random else "l1"
    if rule == "density":
        return kept / density if 0 < density < 1 else kept
    if rule == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
    elif rule == "l2":
        before, after = delta.norm(), kept.norm()
    elif rule == "linf":
        before, after = delta.abs().max(), kept.abs().max()
    else:  # validated earlier; kept for safety
        raise ValueError(f"unknown rescale rule {rescale!r}")
    eps = 1e-7
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def combine_deltas(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Weighted sum of task vectors, optionally with TIES sign election and disjoint mean.

    With ``consensus``, the sign of each entry is the sign of the sum of the
    weighted (trimmed) deltas (ties -> positive), only deltas agreeing with it
    are summed, and ``normalize`` divides by the summed weights of those that
    agreed (the disjoint mean). Without it, ``normalize`` divides by Σ weights.
    ``deltas`` is emptied: its tensors are stacked, and freeing the originals
    early lowers peak memory on large tensors.
    """
    weighted = torch.stack(deltas)
    deltas.clear()  # the stack holds the data now; drop the copies early (peak memory)
    w = torch.tensor(weights, dtype=weighted.dtype).reshape(-1, *([1] * (weighted.dim() - 1)))
    weighted.mul_(w)
    if consensus:
        # One model at a time, so the temporaries are one tensor's size, not k of them (peak memory on
        # embeddings): an entry agrees when its sign is the elected one (zeros never agree).
        positive = weighted.sum(0) >= 0
        mixed = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for i in range(weighted.shape[0]):
            agree = torch.where(positive, weighted[i] > 0, weighted[i] < 0)
            mixed.add_(weighted[i].mul_(agree))
            divisor.add_(agree, alpha=float(weights[i]))
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


_PYTHON = {"fisher": "fisher_merge", "wise_ft": "wise_ft_sweep", "lcsc": "lcsc_search", "regmean": "regmean_merge",
           "regmean_plusplus": "regmean_plusplus_merge", "adamerging": "adamerging_merge"}  # model-level method -> function


def tensor_method(name: "str | MergeMethod") -> MergeMethod:
    """The per-tensor method ``name`` (what ``attar merge`` and ``merge_state_dicts`` run), or an error that
    lists only those and sends the data-aware ones to the recipe ``merge`` stage, which has the data they need."""
    if isinstance(name, MergeMethod):
        method = name
    elif name in MERGE_METHODS:
        method = MERGE_METHODS.get(name)
    else:
        method = None
    tensor = [n for n in MERGE_METHODS.names() if MERGE_METHODS.get(n).level == "tensor"]
    data = [n for n in MERGE_METHODS.names() if MERGE_METHODS.get(n).level != "tensor"]
    elsewhere = f"the data-aware methods ({', '.join(data)}) run in a recipe `merge` stage (see docs/merge.md)"
    if method is None:
        raise AttarError(f"Unknown merge method {name!r}. Known merge methods (run per tensor, by `attar merge`): "
                         f"{', '.join(tensor)}; {elsewhere}.")
    if method.level != "tensor":
        raise AttarError(
            f"{method.name} is a model-level method that needs held-out data (an evaluator, Fisher estimates, input Grams or unlabeled inputs), "
            f"which `attar merge` does not have. Use it in a recipe `merge` stage (`kind: merge`, "
            f"`merge: {{method: {method.name}, models: [...]}}` with `data:`), or call attar.merge.{_PYTHON.get(method.name, method.name)} "
            f"from Python. `attar merge` runs: {', '.join(tensor)}."
        )
    return method
