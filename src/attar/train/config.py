"""The optimisation settings every training run shares (a recipe stage's ``train:`` block).

They live at the ``train`` layer, beside the trainer that reads them, so the methods above it and the
recipe schema above those can all import them without reaching up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf would train to NaN


class TrainConfig(_Strict):
    """Optimisation settings shared by every training stage."""

    epochs: int = Field(5, ge=1)
    steps: int | None = Field(
        None, ge=1, description="total optimizer steps, in place of epochs (the last epoch may end early)"
    )
    batch_size: int = Field(256, ge=1)
    labeled_batch_size: int | None = Field(
        None, ge=1, description="with an unlabeled pool: also draw this many labeled rows every step (cycled)"
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    step_every: int = Field(1, ge=1, description="epochs between decays, for schedule=step")
    step_gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    augment: list[str] = Field(default_factory=list, description="e.g. [crop, flip]")
    checkpoint_every: int = Field(
        0, ge=0, description="steps between checkpoints; 0 = at epoch ends, at most every 30 s, and at the end"
    )
    teacher_cache: Literal["auto", "on", "off"] = "auto"
    cache_topk: int | None = Field(None, ge=1)
    eval_every: int = Field(1, ge=1, description="epochs between validation passes")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when there is one, else CPU")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: the forward pass under autocast (weights and optimizer stay float32)"
    )
    fsdp: bool = Field(
        False, description="under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2 "
                           "fully_shard, one unit per block) instead of replicating them (DDP); for models that do not "
                           "fit one device. Checkpoints and the saved model stay whole."
    )
    log_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="also write this stage's metrics as TensorBoard event files under <run>/<stage>/tensorboard/ "
                    "(needs `pip install 'attar[tensorboard]'`; `attar run --tensorboard` does it for every stage)",
    )


#: The fine-tuning route's training defaults (``attar finetune``, finetune stages): a pretrained text model needs
#: fewer epochs, smaller batches and a smaller learning rate than training from scratch. Kept here, beside
#: TrainConfig and free of torch, so the API and the command's help read the same numbers.
FINETUNE_TRAIN = {"epochs": 3, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 0}
