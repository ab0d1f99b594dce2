"""FSDP2 for the one Trainer: parameters, gradients and optimizer state sharded over the ranks (``train.fsdp``).

Why: a model whose weights plus AdamW state do not fit one device still trains, each rank holding ``1/world`` of
them and gathering one block's weights at a time for its forward and backward (PyTorch's ``fully_shard``).
Every block of every ``nn.ModuleList`` in the model (the decoder layers of a causal LM, the stages of a ResNet)
is its own unit, the rest belongs to the root. Checkpoints stay what they are without FSDP: the *full* model,
objective and optimizer state (gathered, written by rank 0 as safetensors), so a checkpoint reads back with the
plain tools and the stage's model folder is an ordinary one. Every function here is collective: all ranks call it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from attar.train import distributed as dist

__all__ = ["shard", "full_state", "load_full_state", "optimizer_state", "load_optimizer_state", "plain_copy"]


def _dcp():
    """torch.distributed.checkpoint's state-dict helpers, imported on first use: they cost ~0.8 s to import and
    every Trainer would pay it (this module is imported by the trainer, FSDP is rarely on)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full(strict: bool = True):
    return _dcp().StateDictOptions(full_state_dict=True, strict=strict)


def shard(step_mod: nn.Module, student: nn.Module, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``fully_shard`` every block of the student's module lists, then the whole step module; returns a
    meta-device skeleton of the student (its architecture without memory) and copies of its buffers (a rotary
    table is not in the state dict), to rebuild a plain model at the end."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    buffers = {n: b.detach().clone() for n, b in student.named_buffers()}
    skeleton = copy.deepcopy(student).to("meta")
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for module in list(student.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(step_mod, mesh=mesh)
    return skeleton, buffers


def _split(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    student = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    objective = {k[len("objective."):]: v for k, v in sd.items() if k.startswith("objective.")}
    return student, objective


def full_state(step_mod: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The student's and the objective's full (unsharded) state dicts, as plain CPU tensors on every rank."""
    sd = _dcp().get_model_state_dict(step_mod, options=_full())
    return _split({k: v.detach().cpu() for k, v in sd.items()})


def load_full_state(step_mod: nn.Module, student: dict[str, torch.Tensor],
                    objective: dict[str, torch.Tensor] | None = None) -> None:
    """Load full state dicts into the sharded step module (``objective`` None: the student only)."""
    sd = {f"student.{k}": v for k, v in student.items()} | {f"objective.{k}": v for k, v in (objective or {}).items()}
    _dcp().set_model_state_dict(step_mod, sd, options=_full(strict=objective is not None))


def optimizer_state(step_mod: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's full state keyed by parameter name (``name/exp_avg``), plus JSON for the rest."""
    osd = _dcp().get_optimizer_state_dict(step_mod, opt, options=_full())
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{name}/{k}"] = v.detach().cpu()
            else:
                scalars[f"{name}/{k}"] = float(v) if torch.is_tensor(v) else v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars, "fsdp": True}


def load_optimizer_state(step_mod: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[str, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v if torch.is_tensor(v) else torch.tensor(v)
    _dcp().set_optimizer_state_dict(step_mod, opt, {"state": state, "param_groups": meta["param_groups"]},
                                    options=_full())


def plain_copy(skeleton: nn.Module, buffers: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> nn.Module:
    """An ordinary (unsharded) model with the trained weights, from what ``shard`` kept."""
    model = copy.deepcopy(skeleton).to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
    model.load_state_dict(student, strict=False)  # tied weights appear once in a state dict
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k in model.state_dict() if k not in student]
    if missing and not hasattr(model, "tie_weights"):
        raise RuntimeError(f"FSDP: the gathered state lacks {missing[:3]}")
    return model
