"""What every recipe stage kind shares: the registry, the inputs a stage gets, the context it runs in, what it returns.

A stage kind is one class in one file, registered in :data:`STAGES` under the ``kind`` recipes use. It never
sees the pipeline or the recipe: the pipeline resolves a stage into :class:`StageInputs` (data, model, teachers,
objective, selector, earlier stages' outputs, parsed options), asks the kind to ``preflight`` on untrained
stand-ins before any run folder exists, then to ``run``, and records what comes back. Kind-specific settings
live under a key named after the kind (``merge: {...}``) and are validated by the kind's ``Options`` model at
recipe load, so a typo fails with the field's name. Kinds can be unit-tested with hand-made inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ValidationError
from torch import nn

from attar.errors import AttarError, LocatedError, error_context
from attar.registry import Registry, validation_error

STAGES: Registry[type["StageKind"]] = Registry("stage kind")


@dataclass
class EarlierStage:
    """What an earlier stage left for later ones: its model (trained, or an untrained stand-in during
    preflight), how to rebuild it (``spec``), the classes it predicts and the data set it wrote."""

    name: str
    kind: str
    model: nn.Module | None = None
    spec: dict = field(default_factory=dict)
    classes: int | None = None
    data: Path | None = None
    causal_lm: bool = False  # a causal language model (``kind: lm``, or train/distill/finetune with an LM spec)


@dataclass
class StageInputs:
    """A stage resolved by the pipeline. During preflight ``model``/``teachers``/``earlier`` hold untrained
    stand-ins (``preflight`` is True); when it runs they are the real ones."""

    name: str
    kind: str
    index: int
    seed: int
    spec: Any = None  # the stage's recipe entry, for the few fields a kind reads itself (e.g. ``init``)
    options: BaseModel | None = None  # the parsed ``<kind>: {...}`` block
    train: Any = None  # attar.train.config.TrainConfig of training kinds
    data: Any = None  # attar.data.DataBundle of kinds that read a data set
    data_spec: Any = None  # that data set's spec, ``{stage: X}`` resolved to X's artifact
    classes: int | None = None  # classes of the stage's data (or its output, for kinds without data)
    model: nn.Module | None = None  # the starting model (``model`` spec, or a copy of the ``init`` stage's)
    model_spec: dict = field(default_factory=dict)
    teachers: list[nn.Module] = field(default_factory=list)
    objective: Any = None
    selector: Any = None
    earlier: dict[str, EarlierStage] = field(default_factory=dict)
    cache_dir: Path = Path("runs/cache")
    log: Callable[..., None] = print
    teacher_cache: Callable[[], Any] = lambda: None  # built on first call (a teacher pass over the train split)
    data_of: Callable[[str], Any] | None = None  # an earlier stage's name -> the DataBundle that stage read
    # (a causal-LM stage: (its text spec, its seed))
    preflight: bool = False

    def where(self, fld: str | None = None) -> str:
        """``stage 'x' (stages[1].objective)`` or ``stage 'x' (distill)``: where in the recipe a mistake is."""
        return f"stage {self.name!r} ({f'stages[{self.index}].{fld}' if fld else self.kind})"

    def error(self, msg: str, fld: str | None = None) -> AttarError:
        return AttarError(f"{self.where(fld)}: {msg}")

    def context(self, fld: str | None = None):
        """``with inputs.context("objective"): ...``: an AttarError inside names this stage and field."""
        return error_context(self.where(fld))


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
        except ValidationError as e:  # point at the first unknown field (a typo), else the first problem
            errs = sorted(e.errors(), key=lambda er: er["type"] != "extra_forbidden")
            raise LocatedError((kind, *errs[0]["loc"]), str(validation_error(f"the '{kind}:' options", e, model))) \
                from None

    @classmethod
    def check(cls, st: Any) -> None:
        """Structural checks of the recipe entry at load (raise ValueError naming the field)."""

    @classmethod
    def references(cls, st: Any) -> list[str]:
        """Names of earlier stages this stage uses, besides ``teacher`` / ``init`` / ``data: {stage: ...}``."""
        return []

    @classmethod
    def produces_model_like(cls, st: Any) -> str | None:
        """The earlier stage whose architecture this stage's model has (a merge: its base), for preflight
        stand-ins; None when unknown before running."""
        return None

    def preflight(self, inputs: StageInputs) -> int | None:
        """Cheap checks on stand-ins; returns the number of classes the stage's output predicts (None: its data's)."""
        return None

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:  # pragma: no cover
        raise NotImplementedError
