"""The optimisation settings every training run shares (a recipe stage's ``train:`` block).

They live at the ``train`` layer, beside the trainer that reads them, so the methods above it and the
recipe schema above those can all import them without reaching up.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf would train to NaN


class ProjectionConfig(_Strict):
    """GaLore: Adam's moments in the span of the gradient's top-``rank`` singular vectors (attar.train.projection)."""

    rank: int = Field(..., ge=1, description="subspace rank; matrices with a side <= rank are not projected")
    update_every: int = Field(200, ge=1, description="steps between refreshes of the projection basis (GaLore's T)")
    scale: float = Field(1.0, gt=0, description="factor on the projected update (GaLore's alpha; the paper uses 0.25 "
                                                "with a larger lr)")


class OptimizerConfig(_Strict):
    """``train.optimizer`` as a block: ``{name: adamw, projection: {rank: 8, update_every: 200}}``."""

    name: Literal["adamw", "sgd"] = "adamw"
    projection: ProjectionConfig | None = None

    @model_validator(mode="after")
    def _adam_only(self) -> "OptimizerConfig":
        if self.projection is not None and self.name != "adamw":
            raise ValueError("optimizer.projection (GaLore) projects Adam's moments; use name: adamw")
        return self


class OptimizerStateConfig(_Strict):
    """COAT: AdamW's moments stored in FP8 E4M3 per group, with dynamic range expansion (attar.train.fp8_state)."""

    dtype: Literal["fp8_e4m3", "float32"] = "fp8_e4m3"
    expansion: Literal["dynamic", "none"] = Field("dynamic", description="dynamic: COAT's per-group x -> |x|^k "
                                                  "before quantizing; none: per-group absmax scaling only")
    group: int = Field(128, ge=1, description="values per scale (COAT: 128)")


class SparsityConfig(_Strict):
    """SPDF: train a fixed random fraction of each weight matrix at exactly zero, then everything from ``dense_from``."""

    schedule: Literal["spdf"] = "spdf"
    sparsity: float = Field(0.75, gt=0, lt=1, description="fraction of each masked weight held at zero")
    dense_from: int = Field(..., ge=0, description="optimizer step (0-based) from which every weight trains")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of parameter names left dense "
                               "(e.g. ['*head*']); weights of fewer than 2 dimensions are always dense")


class GrowthConfig(_Strict):
    """G_stack: start from an earlier stage's trained model with its block stack repeated ``factor`` times."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["g_stack"] = "g_stack"
    from_: str = Field(..., alias="from", description="the earlier stage whose trained model is grown")
    factor: int = Field(2, ge=2, description="depth multiple: the stage's model has factor x the source's blocks")


class VCycleConfig(_Strict):
    """V-cycle (Zou et al. 2024): the stage's fresh model trained through a cycle of half-depth copies of itself.

    ``steps`` lists the phases *before* the last one, in the order they run: ``levels - 1`` phases going down
    (level 0 is the stage's model, level ``l`` has ``1/2^l`` of its blocks, each the average of two adjacent
    ones), the smallest level, then ``levels - 2`` phases going back up; the last phase, the full model after the
    cycle, trains ``train.steps`` as any stage does. Why this shape: ``train.steps`` keeps its meaning (the stage's
    model's own run, with its schedule and checkpoints) and the cycle reads as a prefix of it, one number a phase.
    """

    method: Literal["v_cycle"] = "v_cycle"
    levels: int = Field(2, ge=2, le=5, description="model sizes in the cycle, the stage's model included (2: it and "
                                                   "a half-depth copy)")
    alpha: float = Field(0.25, ge=0, le=1, description="interpolation on the way up: W = (1 - alpha) W_before + "
                                                       "alpha D(W_small) (the paper: 0.25)")
    steps: list[Annotated[int, Field(ge=1)]] = Field(
        ..., description="optimizer steps of each phase before the last: levels-1 down, the smallest level, "
                         "levels-2 up (levels 2: [full-size steps, half-depth steps])")

    @model_validator(mode="after")
    def _one_number_a_phase(self) -> "VCycleConfig":
        want = 2 * self.levels - 2
        if len(self.steps) != want:
            raise ValueError(f"growth.steps lists the {want} phases before the last for levels {self.levels} "
                             f"({self.levels - 1} down, the smallest level, {self.levels - 2} up; the last phase "
                             f"trains train.steps), got {len(self.steps)}: {self.steps}")
        return self


def _growth_method(v: Any) -> str:
    """The discriminating tag; a block without ``method`` is G_stack (the first growth method, written that way)."""
    return v.get("method", "g_stack") if isinstance(v, dict) else getattr(v, "method", "g_stack")


GrowthSpec = Annotated[Union[Annotated[GrowthConfig, Tag("g_stack")], Annotated[VCycleConfig, Tag("v_cycle")]],
                       Discriminator(_growth_method)]


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
    optimizer: Literal["adamw", "sgd"] | OptimizerConfig = Field(
        "adamw", description="adamw, sgd, or a block {name: adamw, projection: {rank, update_every}} (GaLore)")
    optimizer_state: OptimizerStateConfig | None = Field(
        None, description="{dtype: fp8_e4m3, expansion: dynamic}: AdamW moments stored in FP8 (COAT)")
    sparsity: SparsityConfig | None = Field(
        None, description="{schedule: spdf, sparsity: 0.75, dense_from: STEP}: sparse, then dense training (SPDF)")
    growth: GrowthSpec | None = Field(
        None, description="{method: g_stack, from: STAGE, factor: 2}: grow an earlier stage's model by stacking; "
                          "{method: v_cycle, levels: 2, alpha: 0.25, steps: [A, B]}: train through half-depth copies")
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


    @property
    def optimizer_name(self) -> str:
        """``adamw`` or ``sgd``, whether ``optimizer`` was written as a name or a block."""
        return self.optimizer if isinstance(self.optimizer, str) else self.optimizer.name

    @property
    def projection(self) -> ProjectionConfig | None:
        return None if isinstance(self.optimizer, str) else self.optimizer.projection

    @model_validator(mode="after")
    def _efficient_settings_fit(self) -> "TrainConfig":
        compact = self.projection is not None or (self.optimizer_state is not None
                                                  and self.optimizer_state.dtype != "float32")
        if self.optimizer_state is not None and self.optimizer_name != "adamw":
            raise ValueError("optimizer_state (FP8 moments) is AdamW's state; set optimizer: adamw or drop it")
        if (compact or self.sparsity is not None) and self.fsdp:
            raise ValueError("optimizer_state / optimizer.projection / sparsity work on whole tensors; they do not "
                             "combine with fsdp: true (drop one of them)")
        return self


#: The fine-tuning route's training defaults (``attar finetune``, finetune stages): a pretrained text model needs
#: fewer epochs, smaller batches and a smaller learning rate than training from scratch. Kept here, beside
#: TrainConfig and free of torch, so the API and the command's help read the same numbers.
FINETUNE_TRAIN = {"epochs": 3, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 0}
