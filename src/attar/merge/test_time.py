"""Test-time merging (T³, Imam et al. 2025): interpolate a generalist and an expert per input.

A fine-tuned *expert* is precise in its own domain and brittle outside it; the
*generalist* it came from is the reverse. T³ chooses the interpolation weight
for each input from how much the two models disagree on it, with no
back-propagation and nothing learned::

    JSD(x) = ½ KL(p_g ‖ m) + ½ KL(p_e ‖ m),   m = (p_g + p_e) / 2
    λ(x)   = clip(scale · JSD(x) / ln 2, min_lambda, max_lambda)      (∈ [0, 1])
    θ(x)   = (1 − λ(x)) · θ_expert + λ(x) · θ_generalist
    output = f(x; θ(x))

Where the two agree (in-distribution) λ ≈ 0 and the expert answers; where they
disagree (distribution shift) the merged weights move towards the generalist.
``mode="sample"`` is T³ (one set of weights per input, evaluated in one
vectorised call with ``torch.func.vmap``); ``mode="batch"`` is T³_B (one λ, the
mean over the batch, and a single forward pass). Each call costs three forward
passes (generalist, expert, merged); ``static_interpolation`` gives the usual
fixed-λ merge for comparison.

The paper defines the coefficient from the JSD of the two models' output
distributions; dividing by ln 2 (the JSD's maximum) to land in [0, 1] and the
optional ``scale`` and clipping are attar's choices, stated here so results can
be compared.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys

LN2 = math.log(2.0)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if logits is None:
        raise AttarError("the model's output has no logits; test-time merging needs models that return logits.")
    return logits


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon divergence (nats) between softmax(a/T) and softmax(b/T) over the last dimension.

    Returns one value per row of the leading dimension: for ``[B, C]`` logits a
    ``[B]`` tensor; for ``[B, T, V]`` (sequences) the per-token values averaged
    over the tokens.
    """
    if logits_a.shape != logits_b.shape:
        raise AttarError(
            f"the two models' outputs have shapes {tuple(logits_a.shape)} and {tuple(logits_b.shape)}; "
            "test-time merging needs models with the same label set (or vocabulary)."
        )
    la = F.log_softmax(logits_a.float() / temperature, dim=-1)
    lb = F.log_softmax(logits_b.float() / temperature, dim=-1)
    lm = torch.logaddexp(la, lb) - LN2
    js = 0.5 * (la.exp() * (la - lm)).sum(-1) + 0.5 * (lb.exp() * (lb - lm)).sum(-1)
    js = js.clamp_min(0.0)  # rounding can give -1e-9
    return js.reshape(js.shape[0], -1).mean(1) if js.dim() > 1 else js


def t3_coefficients(
    generalist_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    *,
    scale: float = 1.0,
    min_lambda: float = 0.0,
    max_lambda: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """λ per input: the generalist's weight, ``clip(scale · JSD / ln 2, min_lambda, max_lambda)``."""
    return (scale * js_divergence(generalist_logits, expert_logits, temperature) / LN2).clamp(min_lambda, max_lambda)


def _float_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def static_interpolation(expert: Mapping[str, torch.Tensor], generalist: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """(1 − λ)·expert + λ·generalist (float32 arithmetic, stored in each tensor's dtype; non-float tensors from the expert)."""
    check_same_keys([expert, generalist])
    out = {}
    for k, e in expert.items():
        if e.is_floating_point():
            out[k] = (e.float() + lam * (generalist[k].float() - e.float())).to(e.dtype)
        else:
            out[k] = e.clone()
    return out


class TestTimeMerge(nn.Module):
    """T³ / T³_B around two models with the same architecture; ``forward(x)`` returns the merged model's logits.

    ``generalist`` and ``expert`` keep their own weights (they are submodules, so
    ``.to(device)`` moves them). The merged weights are never stored: for each
    input they are formed inside a ``torch.func.functional_call`` on the
    expert's module structure. Everything runs under ``torch.no_grad`` and with
    both models in eval mode (BatchNorm uses running statistics, which are
    interpolated like the weights). After each call ``last_lambda`` holds the
    coefficients used (one per input, or one for the batch).

    ``chunk_size`` bounds how many per-input weight copies exist at once in
    sample mode (memory ≈ chunk_size × model size); ``vectorize=False`` runs the
    inputs one by one instead of with ``vmap`` (for models vmap cannot batch).
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        generalist: nn.Module,
        expert: nn.Module,
        mode: Literal["sample", "batch"] = "sample",
        *,
        scale: float = 1.0,
        min_lambda: float = 0.0,
        max_lambda: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int | None = 64,
        vectorize: bool = True,
    ):
        super().__init__()
        if mode not in ("sample", "batch"):
            raise AttarError(f"TestTimeMerge mode must be 'sample' (T³) or 'batch' (T³_B), got {mode!r}.")
        if not (0.0 <= min_lambda <= max_lambda <= 1.0):
            raise AttarError(f"need 0 <= min_lambda <= max_lambda <= 1, got {min_lambda} and {max_lambda}.")
        if scale < 0 or temperature <= 0:
            raise AttarError(f"scale must be >= 0 and temperature > 0, got {scale} and {temperature}.")
        try:
            check_same_keys([expert.state_dict(), generalist.state_dict()], "model")
        except AttarError as e:
            raise AttarError(f"the generalist and the expert must have the same architecture: {e}") from None
        self.generalist = generalist
        self.expert = expert
        self.mode = mode
        self.scale, self.min_lambda, self.max_lambda, self.temperature = float(scale), float(min_lambda), float(max_lambda), float(temperature)
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.last_lambda: torch.Tensor | None = None

    def _states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.dtype]]:
        """Expert tensors, (generalist − expert) differences in float32 for every float parameter and buffer, dtypes."""
        e_state = self.expert.state_dict()
        g_state = self.generalist.state_dict()
        base, delta = {}, {}
        for k, v in e_state.items():
            if v.is_floating_point():
                base[k] = v.float()
                delta[k] = g_state[k].float() - base[k]
            else:
                base[k] = v
        return base, delta, {k: v.dtype for k, v in e_state.items()}

    @torch.no_grad()
    def coefficients(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(λ per input, generalist logits, expert logits)."""
        lg = _logits(self.generalist(*args, **kwargs))
        le = _logits(self.expert(*args, **kwargs))
        lam = t3_coefficients(
            lg, le, scale=self.scale, min_lambda=self.min_lambda, max_lambda=self.max_lambda, temperature=self.temperature
        )
        return lam, lg, le

    @staticmethod
    def _params_at(states: tuple, lam: torch.Tensor | float) -> dict[str, torch.Tensor]:
        base, delta, dtypes = states
        return {k: ((v + lam * delta[k]).to(dtypes[k]) if k in delta else v) for k, v in base.items()}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modes = (self.generalist.training, self.expert.training)
        self.generalist.eval()
        self.expert.eval()
        try:
            lam, _, _ = self.coefficients(x)
            states = self._states()
            if self.mode == "batch":
                lam_b = lam.mean()
                self.last_lambda = lam_b.detach()
                return _logits(functional_call(self.expert, self._params_at(states, lam_b), (x,)))
            self.last_lambda = lam.detach()
            if not self.vectorize:
                return torch.cat(
                    [_logits(functional_call(self.expert, self._params_at(states, lam[i]), (x[i : i + 1],))) for i in range(len(x))]
                )

            def one(li: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
                return _logits(functional_call(self.expert, self._params_at(states, li), (xi.unsqueeze(0),))).squeeze(0)

            return vmap(one, chunk_size=self.chunk_size)(lam, x)
        finally:
            self.generalist.train(modes[0])
            self.expert.train(modes[1])

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, scale={self.scale}, lambda in [{self.min_lambda}, {self.max_lambda}], "
            f"temperature={self.temperature}"
        )
