"""What every recipe stage kind shares: the registry, the context a stage runs in and what it returns.

A stage kind is one class in one file, registered in :data:`STAGES` under the ``kind`` recipes use.
The pipeline only loops: for each stage it asks the kind to check itself before any work starts
(``check`` at recipe load, ``preflight`` once data is readable), then to ``run``, and records what
comes back. Kind-specific settings live under a key named after the kind (``merge: {...}``) and are
validated by the kind's ``Options`` model, so a typo fails at load time with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from pydantic import BaseModel, ValidationError
from torch import nn

from attar.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from attar.pipeline import Pipeline
    from attar.recipe import StageSpec

STAGES: Registry[type["StageKind"]] = Registry("stage kind")


@dataclass
class StageContext:
    """Where a stage writes (``stage_dir``), whether the run is being resumed, and the metric sink."""

    run_dir: Path
    stage_dir: Path
    index: int
    resume: bool = False
    on_metrics: Callable[[int, dict], None] | None = None
    accept_changed_settings: bool = False  # a resume the user allowed to change optimiser settings


@dataclass
class StageResult:
    """A stage's output. ``model`` (image classifier or Hugging Face model) feeds later stages by name;
    ``data`` (a data-set artifact folder) likewise. ``metrics`` set by the stage replace the pipeline's
    own test-split evaluation of ``model`` (e.g. a text fine-tune scores itself)."""

    model: nn.Module | None = None
    spec: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    metrics: dict | None = None
    data: Path | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)  # name -> path, recorded in the run store


class StageKind:
    """One kind of stage. Subclasses set ``name`` (via ``@STAGES.register``) and override what they need."""

    Options: ClassVar[type[BaseModel] | None] = None  # fields under the key named after the kind
    needs_data: ClassVar[bool] = True  # reads an image/table data set (the stage's or the recipe's)
    trains: ClassVar[bool] = False  # takes objective / selector / train settings
    writes_data: ClassVar[bool] = False  # leaves a data set later stages read with ``data: {stage: NAME}``

    @classmethod
    def options_model(cls) -> type[BaseModel] | None:
        """The pydantic model of this kind's options (a method, so kinds can import it lazily)."""
        return cls.Options

    @classmethod
    def parse_options(cls, kind: str, raw: dict | None) -> BaseModel | None:
        model = cls.options_model()
        if model is None:
            if raw:
                raise ValueError(f"stage kind {kind!r} takes no '{kind}:' options")
            return None
        try:
            return model.model_validate(raw or {})
        except ValidationError as e:
            msgs = "; ".join(f"{kind}.{'.'.join(map(str, er['loc'])) or '(options)'}: {er['msg']}" for er in e.errors())
            fields = ", ".join(model.model_fields)
            raise ValueError(f"{msgs} (the '{kind}:' options accept: {fields})") from None

    @classmethod
    def check(cls, st: "StageSpec") -> None:
        """Structural checks at recipe load (raise ValueError naming the field)."""

    @classmethod
    def references(cls, st: "StageSpec") -> list[str]:
        """Names of earlier stages this stage uses, besides ``teacher`` / ``init`` / ``data: {stage: ...}``."""
        return []

    def preflight(self, pipe: "Pipeline", st: "StageSpec", index: int) -> int | None:
        """Cheap checks once data can be read; returns the number of classes the stage's output predicts."""
        return None

    def run(self, pipe: "Pipeline", st: "StageSpec", ctx: StageContext) -> StageResult:  # pragma: no cover
        raise NotImplementedError
