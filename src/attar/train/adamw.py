"""AdamW with compact state: FP8 moments (:mod:`attar.train.fp8_state`) and/or low-rank gradient projection
(:mod:`attar.train.projection`).

Why one optimizer for both: they compose (the projected moments can be stored in FP8 too) and both are only a
change in where Adam's moments live; the update itself is torch's AdamW, term for term (decoupled weight decay,
bias corrections, ``eps`` outside the square root), so with neither option it is plain AdamW and the tests can
hold it to torch's. The Trainer builds it from ``train.optimizer: {name: adamw, projection: {...}}`` and
``train.optimizer_state: {dtype: fp8_e4m3}`` (:func:`attar.train.strategy.Backprop.optimizer`); its state is all
tensors, so checkpoints carry it as they carry torch's.
"""

from __future__ import annotations

import torch

from attar.train import fp8_state, projection

_MOMENTS = ("exp_avg", "exp_avg_sq")


class CompactAdamW(torch.optim.Optimizer):
    """``state_dtype``: ``float32`` or ``fp8_e4m3`` (with ``expansion`` and ``group``); ``rank``: project gradients
    of matrices with both sides larger than it (None: no projection), refreshing the basis every ``update_every``
    steps and scaling the projected update by ``scale`` (GaLore's alpha)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_dtype: str = "float32", expansion: bool = True, group: int = 128,
                 rank: int | None = None, update_every: int = 200, scale: float = 1.0):
        if state_dtype not in ("float32", "fp8_e4m3"):
            raise ValueError(f"state_dtype must be float32 or fp8_e4m3, got {state_dtype!r}")
        self.fp8, self.expansion, self.group = state_dtype == "fp8_e4m3", expansion, group
        self.rank, self.update_every, self.scale = rank, update_every, scale
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    # -- moments: float32 tensors while a step computes, packed between steps
    def _read(self, st: dict, key: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        if key not in st:
            return torch.zeros(shape, dtype=torch.float32, device=like.device)
        if not self.fp8:
            return st[key]
        return fp8_state.dequantize(fp8_state.Packed(st[key], st[key + "_meta"], shape.numel(), tuple(shape)))

    def _write(self, st: dict, key: str, value: torch.Tensor) -> None:
        if not self.fp8:
            st[key] = value
            return
        packed = fp8_state.quantize(value, self.group, self.expansion)
        st[key], st[key + "_meta"] = packed.codes, packed.meta

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad.float()
                proj = self.rank is not None and projection.projects(p, self.rank)
                if proj:
                    mn = projection.matrix_shape(p)
                    g = g.reshape(mn)
                    step_no = int(st["step"]) if "step" in st else 0
                    if "proj" not in st or step_no % self.update_every == 0:
                        st["proj"] = projection.basis(g, self.rank)
                    g = projection.project(g, st["proj"])
                m = self._read(st, "exp_avg", g.shape, p)
                v = self._read(st, "exp_avg_sq", g.shape, p)
                st["step"] = st.get("step", torch.tensor(0.0)) + 1
                t = float(st["step"])
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
                if proj:
                    n = m / denom / (1 - b1**t)
                    p.add_(projection.project_back(n, st["proj"], mn).view_as(p).to(p.dtype), alpha=-lr * self.scale)
                else:
                    p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1**t))
                self._write(st, "exp_avg", m)
                self._write(st, "exp_avg_sq", v)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; FP8 codes go back to FP8
        afterwards (exact: every FP8 value is a float32 value)."""
        super().load_state_dict(state_dict)
        if self.fp8:
            for st in self.state.values():
                for k in _MOMENTS:
                    if k in st:
                        st[k] = st[k].to(fp8_state.FP8)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer holds in its state (measured from the tensors, not computed)."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
