"""Recipe schema and YAML loading with errors that name the file, line and field.

A recipe is a list of stages run in order; a stage may use an earlier stage's
model as its teacher or as its starting point (``init``) by naming that stage.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from attar.distill.lm_config import LMDistillConfig, LMModelSpec, LMStageOptions, LMTextSpec
from attar.errors import AttarError, LocatedError
from attar.paths import name_problem
from attar.specs import DataSpec, ModelSpec, TeacherStoreRef
from attar.stages import STAGES
from attar.stages.lm import as_stage_fields
from attar.stages.lm_merge import LMMergeOptions, LMMergeStage
from attar.text.pretrained_lm import PRETRAINED_LMS
from attar.train.config import TrainConfig


def stage_kinds() -> list[str]:
    return STAGES.names()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf would train to NaN


TeacherRef = Union[str, ModelSpec, TeacherStoreRef]  # a stage name, a model, or stored outputs


class StageSpec(_Strict):
    """One stage: the fields every kind shares. Each kind's own model (:func:`stage_model`) adds ``kind`` as a
    literal and its settings under a key named after the kind (``merge: {...}``), typed by the kind's ``Options``."""

    name: str
    kind: str
    model: ModelSpec | None = None
    init: str | None = Field(None, description="start from this earlier stage's model")
    teacher: TeacherRef | list[TeacherRef] | None = None
    data: DataSpec | None = None
    objective: dict[str, Any] | None = None
    selector: dict[str, Any] | None = Field(None, description="data selection, e.g. {name: uniform, keep: 0.5}")
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int | None = None

    @property
    def options(self) -> BaseModel | None:
        """The kind's own settings (the parsed ``<kind>: {...}`` block), or None for kinds without any."""
        return getattr(self, self.kind) if self.kind_spec().options_model() is not None else None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        """The name is the stage's folder under the run: no separators, no ``..``, nothing absolute."""
        problem = name_problem(v)
        if problem:
            raise ValueError(f"stage name {problem}")
        return v

    @field_validator("objective", "selector", mode="before")
    @classmethod
    def _objective_shape(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, dict) or "name" not in v):
            raise ValueError("must be a mapping with a 'name', e.g. {name: kd, temperature: 4} or {name: uniform, keep: 0.5}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "StageSpec":
        kind = self.kind_spec()
        kind.check(self)
        if not kind.trains:
            used = [f for f in ("objective", "selector") if getattr(self, f) is not None]
            if used:
                raise ValueError(f"stage {self.name!r} ({self.kind}) does not train, so it takes no {' or '.join(used)}")
        return self

    def kind_spec(self):
        """This stage's kind (a :class:`attar.stages.StageKind` subclass)."""
        return STAGES.get(self.kind)

    def teachers(self) -> list[TeacherRef]:
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]


def stage_model(kind: str) -> type[StageSpec]:
    """The typed model of a ``kind`` stage: the shared fields, ``kind`` as a literal, and the kind's options (if
    any) under a field named after it, so `attar recipe-schema` describes every kind's block."""
    k = STAGES.get(kind)
    fields: dict[str, Any] = {"kind": (Literal[kind], Field(description=(k.__doc__ or "").strip().split("\n")[0]))}
    opts = k.options_model()
    if opts is not None:
        required = any(f.is_required() for f in opts.model_fields.values())
        fields[kind] = (opts, Field(...) if required else Field(default_factory=opts))
    return create_model(f"{kind.capitalize()}Stage", __base__=StageSpec, **fields)


# ---------------------------------------------------------------- causal-LM stages

#: The kinds a causal-LM model spec turns into language-model stages (run by the ``lm`` stage kind).
LM_KINDS = ("train", "distill", "finetune")
#: What only the ``lm:`` block of a causal-LM stage holds: settings no image or table stage has.
LM_EXTRAS = ("cache_topk", "optimizer", "mezo_eps", "responses", "forgetting")

LMExtras = create_model(
    "LMExtras", __base__=_Strict, __doc__="The ``lm:`` block of a causal-LM stage: the teacher cache, the optimizer "
    "(backprop or MeZO), who writes the training responses, and the text that measures forgetting.",
    **{f: (LMStageOptions.model_fields[f].annotation, LMStageOptions.model_fields[f]) for f in LM_EXTRAS},
)


class LMStageSpec(StageSpec):
    """A ``train``/``distill``/``finetune`` stage whose model is a causal language model: the same keys as every
    stage (``model``, ``teacher``, ``data``, ``train``), typed for text and LMs, plus an ``lm:`` block for what only
    LMs have. It runs on the one Trainer through the LM task (the ``lm`` stage kind)::

        - name: student
          kind: distill
          model: {pretrained: qwen2.5-coder-0.5b}
          teacher: {pretrained: qwen2.5-coder-1.5b}     # or an earlier stage's name, or {store: DIR}
          data: {name: fortunes, max_len: 96}
          train: {steps: 200, alpha: 0.5, divergence: gjsd, divergence_args: {beta: 0.5}}
          lm: {cache_topk: 64}
    """

    model: LMModelSpec = Field(description="the causal LM: {pretrained: NAME}, {hf: DIR}, {byte: {...}} or {stage: NAME}"
                               " (+ prune, lora)")
    teacher: str | LMModelSpec | None = Field(None, description="an earlier stage's name or an LM spec ({pretrained}, {url}, "
                                              "{hf}, {store})")
    data: LMTextSpec = Field(default_factory=LMTextSpec)
    train: LMDistillConfig = Field(default_factory=LMDistillConfig)
    lm: LMExtras = Field(default_factory=LMExtras)  # type: ignore[valid-type]
    _options: LMStageOptions | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _consistent(self) -> "LMStageSpec":
        misplaced = [f for f in ("objective", "selector", "init") if getattr(self, f) is not None]
        if misplaced:
            raise ValueError(
                f"stage {self.name!r} trains a causal LM, which takes no {' or '.join(misplaced)}: its loss is set in "
                "train: {alpha, divergence, temperature, on_policy}, and it starts from an earlier stage's model with "
                "model: {stage: NAME}")
        if self.kind == "distill" and self.teacher is None:
            raise ValueError(f"distill stage {self.name!r} needs a 'teacher' (an earlier stage's name or an LM spec)")
        if self.kind == "finetune" and self.model.byte is not None:
            raise ValueError(f"finetune stage {self.name!r} starts from a trained model ({{pretrained}}, {{hf}} or "
                             "{stage}); a fresh byte-level model is trained with kind: train")
        teacher = LMModelSpec(stage=self.teacher) if isinstance(self.teacher, str) else self.teacher
        try:
            self._options = LMStageOptions(student=self.model, teacher=teacher, data=self.data, train=self.train,
                                           **self.lm.model_dump(exclude_unset=True))
        except ValidationError as e:
            raise ValueError(as_stage_fields("; ".join(er["msg"].removeprefix("Value error, ") for er in e.errors()))) \
                from None
        return self

    @property
    def options(self) -> LMStageOptions:
        return self._options

    def kind_spec(self):
        return STAGES.get("lm")


_LM_MODEL_KEYS = {"byte", "stage", "store", "prune", "lora"}  # keys a causal-LM spec has and an image spec has not
_LM_DATA_KEYS = set(LMTextSpec.model_fields) - set(DataSpec.model_fields)


def _causal_lm_folder(path: Any) -> bool:
    try:
        archs = json.loads((Path(str(path)) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in archs)


def is_causal_lm_stage(raw: dict) -> bool:
    """Whether a recipe entry of kind train/distill/finetune describes a causal LM: an ``lm:`` block, a model spec
    only LMs have (a packaged LM, a byte model, an earlier stage's LM, prune/lora), a Hugging Face folder whose
    config names a ``*ForCausalLM``, or text settings in ``data``."""
    if raw.get("kind") not in LM_KINDS:
        return False
    model, data = raw.get("model"), raw.get("data")
    if "lm" in raw or (isinstance(data, dict) and _LM_DATA_KEYS & data.keys()):
        return True
    if isinstance(model, dict):
        return bool(_LM_MODEL_KEYS & model.keys()) or model.get("pretrained") in PRETRAINED_LMS or (
            "hf" in model and _causal_lm_folder(model["hf"]))
    return False


class LMMergeStageSpec(StageSpec):
    """A ``merge`` stage whose models are causal-LM stages (:mod:`attar.stages.lm_merge`): it reads each merged
    stage's own text, so it takes no ``data``."""

    kind: Literal["merge"] = Field(description="merge earlier causal-LM stages' models")
    merge: LMMergeOptions

    @model_validator(mode="after")
    def _no_data(self) -> "LMMergeStageSpec":
        if self.data is not None or self.model is not None or self.init is not None or self.teacher is not None:
            raise ValueError(f"merge stage {self.name!r} merges language models: it reads each merged stage's own text "
                             "and takes no data, model, init or teacher (only merge: {method, models, base, ...})")
        return self

    def kind_spec(self):
        return LMMergeStage


#: Names of the causal-LM stages of the recipe being validated (set by :class:`Recipe`, read by :func:`_stage_tag`):
#: a ``merge`` stage is a language-model merge when the stages it merges are.
_LM_NAMES: ContextVar[frozenset[str]] = ContextVar("attar_lm_stage_names", default=frozenset())


def is_lm_merge(raw: dict, lm_names: frozenset[str] | set[str]) -> bool:
    """A raw ``merge`` stage that merges causal-LM stages, or whose base is an LM spec (``{pretrained: ...}``)."""
    m = raw.get("merge")
    if raw.get("kind") != "merge" or not isinstance(m, dict):
        return False
    base = m.get("base")
    refs = [r for r in list(m.get("models") or []) + [base] if isinstance(r, str)]
    return isinstance(base, dict) or any(r in lm_names for r in refs)


def _lm_stage_names(stages: Any) -> frozenset[str]:
    names: set[str] = set()
    for s in stages if isinstance(stages, list) else []:
        if isinstance(s, dict) and (s.get("kind") == "lm" or is_causal_lm_stage(s) or is_lm_merge(s, names)):
            names.add(s.get("name"))
    return frozenset(names)


def _stage_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        if is_causal_lm_stage(v) or is_lm_merge(v, _LM_NAMES.get()):
            return f"{v.get('kind')} (causal LM)"
        return v.get("kind")
    return f"{v.kind} (causal LM)" if isinstance(v, (LMStageSpec, LMMergeStageSpec)) else getattr(v, "kind", None)


def lm_stage_model(kind: str) -> type[LMStageSpec]:
    return create_model(f"LM{kind.capitalize()}Stage", __base__=LMStageSpec,
                        kind=(Literal[kind], Field(description=f"{kind} a causal language model")))


Stage = Annotated[
    Union[tuple([Annotated[stage_model(k), Tag(k)] for k in STAGES.names()]
                + [Annotated[lm_stage_model(k), Tag(f"{k} (causal LM)")] for k in LM_KINDS]
                + [Annotated[LMMergeStageSpec, Tag("merge (causal LM)")]])],
    Discriminator(_stage_tag),
]


class Recipe(_Strict):
    name: str = "recipe"
    seed: int = 0
    data: DataSpec | None = Field(None, description="default data for stages that name none")
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="wrap")
    @classmethod
    def _lm_stages(cls, data: Any, handler: Any) -> "Recipe":
        """Which stages are causal LMs, for the stage tags: a merge of LM stages is an LM merge."""
        token = _LM_NAMES.set(_lm_stage_names(data.get("stages")) if isinstance(data, dict) else frozenset())
        try:
            return handler(data)
        finally:
            _LM_NAMES.reset(token)

    @model_validator(mode="after")
    def _references(self) -> "Recipe":
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise LocatedError(("stages", i, "name"), f"two stages are named {st.name!r}; stage names must be unique")
            refs = [("teacher", r) for r in st.teachers() if isinstance(r, str)] + ([("init", st.init)] if st.init else [])
            refs += [(st.kind, r) for r in st.kind_spec().references(st)]
            if isinstance(st.data, DataSpec) and st.data.stage:
                refs.append(("data", st.data.stage))
            for fld, ref in refs:
                loc = ("stages", i, fld)
                if ref == st.name:
                    raise LocatedError(loc, f"stage {st.name!r} names itself as its {fld}; a stage can only use "
                                            f"earlier stages ({', '.join(seen) or 'none yet'})")
                if ref not in seen:
                    where = "a later stage" if any(s.name == ref for s in self.stages) else "no stage"
                    raise LocatedError(loc, f"stage {st.name!r} refers to {ref!r}, which is {where}; "
                                            f"a stage can only use earlier stages ({', '.join(seen) or 'none yet'})")
            if st.kind_spec().needs_data and st.data is None and self.data is None:
                raise LocatedError(("stages", i), f"stage {st.name!r} has no 'data' and the recipe has no default 'data'")
            seen.append(st.name)
        return self

    def stage_data(self, stage: StageSpec) -> DataSpec:
        return stage.data or self.data  # type: ignore[return-value]

    def stage_seed(self, stage: StageSpec) -> int:
        return self.seed if stage.seed is None else stage.seed


# ---------------------------------------------------------------- loading with line numbers


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Walk a composed YAML node along a pydantic error location; return the 1-based line."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def recipe_error(source: str, node: yaml.Node | None, loc: tuple, msg: str) -> AttarError:
    line = _line_of(node, loc)
    where = f"{source}, line {line}" if line else source
    return AttarError(f"{where}: field '{_fmt_loc(loc)}': {msg}")


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AttarError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise AttarError(f"{source}: a recipe is a mapping with 'stages:' (and optional name, seed, data).")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            located = (err.get("ctx") or {}).get("error")
            loc = tuple(err["loc"])
            if loc[:1] == ("stages",) and len(loc) >= 3:
                loc = loc[:2] + loc[3:]  # drop the union's tag (the kind) that pydantic puts in the path
            loc += located.loc if isinstance(located, LocatedError) else ()
            loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-after")))
            # Drop pydantic's union-branch labels (e.g. 'str', 'ModelSpec') from the location.
            loc = tuple(p for p in loc if p not in ("str", "ModelSpec", "list[union[str,ModelSpec]]"))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc += ("kind",)
                msg = (f"unknown stage kind {err['ctx'].get('tag')!r}; known kinds: {', '.join(stage_kinds())}"
                       if err["type"] == "union_tag_invalid" else "required field is missing (the stage's kind)")
            elif err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; " + _accepted(data, loc) + ")"
            elif err["type"] == "missing":
                msg = "required field is missing"
            lines.append(str(recipe_error(source, node, loc, msg)))
        raise AttarError("Invalid recipe:\n  " + "\n  ".join(dict.fromkeys(lines))) from None


def _accepted(data: dict, loc: tuple) -> str:
    """What the mapping holding an unknown field accepts, for a stage or a kind's options block."""
    try:
        stage = data["stages"][loc[1]] if loc[:1] == ("stages",) else None
        model = ((lm_stage_model if is_causal_lm_stage(stage) else stage_model)(stage["kind"]) if stage
                 else Recipe)
        for part in loc[2:-1] if stage else loc[:-1]:
            model = model.model_fields[part].annotation
        return f"accepted here: {', '.join(model.model_fields)}"
    except Exception:  # noqa: BLE001 - a nested or union field: point at the schema instead
        return "see `attar recipe-schema` for the accepted fields"


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    path = Path(path)
    if not path.exists():
        raise AttarError(f"Recipe {path} does not exist.")
    text = path.read_text()
    return parse_recipe(text, str(path)), text


def builtin_recipe_path(name: str = "quickstart") -> Path:
    p = Path(__file__).parent / "recipes" / f"{name}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in p.parent.glob("*.yaml"))
        raise AttarError(f"No built-in recipe {name!r}; built-in recipes: {', '.join(known)}")
    return p


# ---------------------------------------------------------------- comparing a recipe with a run's own

#: Train settings a resume may change when the user asks for it (``--allow-optim-change``): they steer the
#: optimiser from the resumed step on, but not the data order, the step count or the model's shape.
OPTIM_FIELDS = ("lr", "weight_decay", "momentum", "grad_clip", "warmup_steps", "schedule", "step_every", "step_gamma")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def recipe_diff(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """Every field whose value differs, as ``(path, old, new)``, e.g. ``("stages[1].train.lr", 0.001, 0.01)``.

    Defaults are filled in on both sides, so writing a default out explicitly is not a change."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b), key=_path_order)
            if a.get(k, missing) != b.get(k, missing)]


def _path_order(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[\[\].]+", path) if p)


#: Train settings that change where a stage runs or what it also logs, never its weights: a resume takes them as
#: they are now (and records the change), e.g. a CPU run resumed on a GPU, or TensorBoard switched on.
NEUTRAL_FIELDS = ("device", "log_to")


def is_neutral_field(path: str) -> bool:
    """``stages[i].train.device`` / ``.log_to`` (or a list item of them): a change a resume accepts as is."""
    m = re.match(r"stages\[\d+\]\.train\.(\w+)", path)
    return bool(m) and m.group(1) in NEUTRAL_FIELDS


def is_optim_field(path: str) -> bool:
    """``stages[i].train.<optimiser setting>``: a change a resume can accept on request."""
    m = re.fullmatch(r"stages\[\d+\]\.train\.(\w+)", path)
    return bool(m) and m.group(1) in OPTIM_FIELDS


def stage_index(path: str) -> int | None:
    m = re.match(r"stages\[(\d+)\]", path)
    return int(m.group(1)) if m else None
