"""Specs: plain-data descriptions of how to build a data set or a model.

They live here (not in recipe.py) so that data/, models/ and the recipe schema
can all import them without import cycles.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf would train to NaN


SOURCES = ("name", "imagefolder", "csv", "parquet", "hf_disk", "artifact", "stage")


class DataSpec(_Strict):
    """Exactly one source: a built-in ``name``, ``imagefolder``, ``csv``, ``parquet``, ``hf_disk``, ``artifact`` (a condensed set's folder) or ``stage`` (the data an earlier recipe stage wrote).

    Splits are fixed by ``seed``: validation is carved from the training split
    (``val_fraction``), never from test. ``labeled_per_class`` keeps only that
    many labels per class in train and marks the rest unlabeled (label -1), which
    is how the semi-supervised / label-free distillation settings are expressed.
    """

    name: str | None = None
    imagefolder: str | None = None
    csv: str | None = None
    parquet: str | None = None
    hf_disk: str | None = None
    artifact: str | None = None
    stage: str | None = Field(None, description="the data set an earlier stage of the recipe wrote (e.g. a condense stage)")
    label_column: str = "label"
    image_column: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    train_limit: int | None = Field(None, gt=0, description="keep at most this many training rows (seeded)")
    labeled_per_class: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _a_bare_name(cls, value: Any) -> Any:
        """``data: digits`` is what people write first; it means ``{name: digits}``."""
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        sources = [k for k in SOURCES if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                f"a data spec needs exactly one source among {', '.join(SOURCES)}; "
                f"got {sources or 'none'} (e.g. {{name: fashion-mnist}})"
            )
        return self

    @property
    def source(self) -> str:
        for k in SOURCES:
            if getattr(self, k):
                return k
        raise AssertionError


class SLTrainSpec(_Strict):
    """SLTrain: every weight matrix as ``B A + S`` (rank ``rank``; S zero on a ``sparsity`` fraction, support fixed)."""

    rank: int = Field(..., ge=1, description="rank of B A; matrices with a side <= rank stay dense")
    sparsity: float = Field(..., ge=0, lt=1, description="fraction of S's entries held at zero (the paper's "
                            "delta = 0.03 non-zeros is sparsity 0.97)")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of module names left dense")


class Parameterization(_Strict):
    """How the weights of a fresh ``arch`` model are parameterised (attar.models.sltrain)."""

    sltrain: SLTrainSpec


class ModelSpec(_Strict):
    """``{arch: convnet, width: 64, depth: 3}``, ``{pretrained: mnist-cnn}``, ``{hf: path}`` or ``{artifact: path}``.

    Extra architecture parameters go in ``args`` or as known fields (width, depth, hidden).
    """

    arch: str | None = None
    pretrained: str | None = None
    hf: str | None = None
    artifact: str | None = None
    width: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    hidden: list[int] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    parameterization: Parameterization | None = Field(
        None, description="{sltrain: {rank, sparsity}}: weight matrices as low rank plus fixed-support sparse")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        sources = [k for k in ("arch", "pretrained", "hf", "artifact") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                "a model spec needs exactly one of arch, pretrained, hf, artifact; "
                f"got {sources or 'none'} (e.g. {{arch: convnet, width: 32}})"
            )
        return self

    def arch_kwargs(self) -> dict[str, Any]:
        kw = dict(self.args)
        for k in ("width", "depth", "hidden"):
            v = getattr(self, k)
            if v is not None:
                kw[k] = v
        return kw


class TeacherStoreRef(_Strict):
    """``teacher: {store: DIR}``: a teacher's outputs stored once by ``attar teacher dump`` stand for the live model
    (``attar.distill.cls_store``; a causal-LM stage reads its own kind of store)."""

    store: str = Field(..., description="a folder written by attar teacher dump on this stage's training rows")


Split = Literal["train", "val", "test"]


#: The network dataset condensation matches through unless told otherwise: the ConvNet of width 128 and depth 3 of
#: DC, DSA, DM and MTT (kept here, torch-free, so `attar condense --help` and the library read one default).
CONDENSE_MODEL = ModelSpec(arch="convnet", width=128, depth=3)
