"""The settings of language-model training and distillation, apart from the code that runs them.

Why a module of its own: it imports no torch, so the ``attar lm`` commands read their defaults from here for
their help text (one place for every default) without slowing ``attar --help``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attar.specs import Parameterization
from attar.train.config import (
    GrowthSpec,
    OptimizerConfig,
    OptimizerStateConfig,
    SparsityConfig,
    TrainConfig,
)


def _trainer_field(name: str):
    """A field of the Trainer's own :class:`TrainConfig`, default and description included (one definition)."""
    return copy.copy(TrainConfig.model_fields[name])


class LMDistillConfig(BaseModel):
    """Settings of :func:`distill_lm` (strict: unknown fields are refused, with the accepted ones listed)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of CE on ground-truth tokens; KD gets 1 - alpha")
    divergence: str = Field("kl", description="any registered divergence")
    divergence_args: dict[str, Any] = Field(default_factory=dict)
    temperature: float = Field(1.0, gt=0)
    cross_tokenizer: Literal["auto", "off", "uld", "gold"] = Field(
        "auto", description="teacher and student with different tokenizers: auto = ordinary token KD when they share "
        "one, else gold; uld/gold = cross-tokenizer KD (positions paired by text spans; uld: sorted-probability L1, "
        "gold: exact on shared token strings + uld on the rest); off = ordinary token KD only (different tokenizers "
        "refused)")
    on_policy: float = Field(0.0, ge=0, le=1, description="λ: fraction of each batch's rows continued by the student")
    sample_temperature: float = Field(1.0, gt=0, description="temperature of the student's on-policy sampling")
    min_ground_truth: float = Field(0.25, ge=0, le=1, description="guard: ground-truth fraction kept in every batch")
    eval_every: int = Field(50, ge=1)
    eval_rows: int = Field(256, ge=1, description="validation rows for held-out perplexity")
    monitor_prompts: int = Field(32, ge=0, description="validation prompts whose student samples the teacher scores")
    restore_best: bool = True
    patience: int = Field(3, ge=1)
    stop_on_hacking: bool = False
    seed: int = 0
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (with a checkpoint folder); 0 = at the end")
    chunk_tokens: int | None = Field(
        None, ge=0, description="scored positions per chunk of logits; None = automatic (about 64 MiB), 0 = no chunking")
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in the backward pass")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    fsdp: bool = Field(False, description="under torchrun: shard the student's weights, gradients and optimizer state "
                       "over the ranks (FSDP2) instead of replicating them")
    log_to: list[Literal["tensorboard"]] = Field(
        default_factory=list, description="recipe stages: also write the metrics as TensorBoard event files under "
        "<run>/<stage>/tensorboard/ (needs `pip install 'attar[tensorboard]'`)")
    # the efficient-training options of the one Trainer (issue 15), the same types as TrainConfig's (docs/efficient.md)
    optimizer: Literal["adamw", "sgd"] | OptimizerConfig = _trainer_field("optimizer")
    optimizer_state: OptimizerStateConfig | None = _trainer_field("optimizer_state")
    sparsity: SparsityConfig | None = _trainer_field("sparsity")
    growth: GrowthSpec | None = _trainer_field("growth")

    @model_validator(mode="after")
    def _efficient_settings_fit(self) -> "LMDistillConfig":
        """The efficient options' rules are TrainConfig's (e.g. none of them with fsdp): checked by building one."""
        try:
            self.train_fields()
        except ValidationError as e:
            raise ValueError("; ".join(er["msg"].removeprefix("Value error, ") for er in e.errors())) from None
        return self

    def train_fields(self) -> dict[str, Any]:
        """The efficient-training settings as TrainConfig fields (unset ones left out, so the Trainer's config hash
        of runs made before these options existed is unchanged)."""
        out = {k: getattr(self, k) for k in ("optimizer", "optimizer_state", "sparsity", "growth")
               if getattr(self, k) is not None}
        TrainConfig(fsdp=self.fsdp, **out)  # raises when they do not fit together
        return out


class LMPruneSpec(BaseModel):
    """Structured pruning of the loaded model before training: depth (keep the ``layers`` most influential decoder
    layers) and/or width (keep ``mlp`` channels and ``kv_heads`` key/value head groups in every layer)."""

    model_config = ConfigDict(extra="forbid")

    layers: int | None = Field(None, ge=1, description="decoder layers to keep (block influence on the training text)")
    mlp: int | None = Field(None, ge=1, description="MLP channels to keep per layer (mean |activation| on the training text)")
    kv_heads: int | None = Field(None, ge=1, description="key/value head groups to keep per layer (their query heads' "
                                 "output norm on the training text)")
    calibration_rows: int = Field(64, ge=1, description="training rows the importance is measured on")

    @model_validator(mode="after")
    def _something(self) -> "LMPruneSpec":
        if self.layers is None and self.mlp is None and self.kv_heads is None:
            raise ValueError("prune needs at least one of layers (depth), mlp or kv_heads (width), e.g. {layers: 15}")
        return self


class LMLoraSpec(BaseModel):
    """LoRA (PEFT) on the student: only the adapters train; the stage writes the adapter (PEFT format) and the
    merged model."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer but the head")


class LMModelSpec(BaseModel):
    """A causal LM in a recipe: exactly one of a packaged model, a Hugging Face folder, a fresh byte-level GPT-2
    or an earlier stage's model."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = Field(None, description="a packaged model: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b/1.5b")
    hf: str | None = Field(None, description="a local Hugging Face causal-LM folder")
    byte: dict[str, int] | None = Field(None, description="a fresh byte-level GPT-2: {layers, d_model, heads, context}")
    stage: str | None = Field(None, description="the model an earlier lm stage wrote")
    store: str | None = Field(None, description="teacher only: a stored teacher's outputs (attar teacher dump's folder): "
                              "KD targets read from it, no live teacher")
    url: str | None = Field(None, description="teacher only: a served teacher (attar teacher serve, or an OpenAI-compatible "
                            "server with prompt_logprobs such as vLLM): KD targets fetched from it, e.g. http://127.0.0.1:8000")
    protocol: Literal["auto", "attar", "openai"] = Field(
        "auto", description="with url: attar (attar teacher serve), openai (/v1/completions prompt_logprobs), auto: ask")
    topk: int = Field(32, ge=1, description="with url: top-k log-probs asked per token")
    tokenizer: str | None = Field(
        None, description="with url or store: the teacher's tokenizer when it is not the student's (a packaged model "
        "name or a Hugging Face folder): cross-tokenizer KD from the server or store (train.cross_tokenizer)")
    prune: LMPruneSpec | None = Field(None, description="prune depth and/or width first (prune, then recover by training)")
    lora: LMLoraSpec | None = Field(None, description="train LoRA adapters instead of every weight")
    parameterization: Parameterization | None = Field(
        None, description="byte only: {sltrain: {rank, sparsity}}: weight matrices as low rank plus fixed-support "
        "sparse (SLTrain); the saved model is dense")

    @model_validator(mode="after")
    def _one(self) -> "LMModelSpec":
        given = [k for k in ("pretrained", "hf", "byte", "stage", "store", "url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pretrained, hf, byte, stage, store or url "
                             f"(got {', '.join(given) or 'none'})")
        for k in ("store", "url"):
            if getattr(self, k) is not None and (self.prune is not None or self.lora is not None):
                raise ValueError(f"{k}: a {'stored' if k == 'store' else 'served'} teacher is outputs, not a model; it "
                                 "takes no prune or lora")
        if self.url is None and ({"protocol", "topk"} & self.model_fields_set):
            raise ValueError("protocol and topk apply to a served teacher (url)")
        if self.tokenizer is not None and self.url is None and self.store is None:
            raise ValueError("tokenizer applies to a served (url) or stored (store) teacher: a model brings its own")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r}: give an http:// or https:// address, e.g. http://127.0.0.1:8000")
        if self.parameterization is not None and self.byte is None:
            raise ValueError("parameterization (SLTrain) re-parameterises a fresh model's weights: give byte: {...}; "
                             "a trained model's dense weights have no sparse support to keep")
        if self.byte is not None:
            unknown = sorted(set(self.byte) - {"layers", "d_model", "heads", "context"})
            if unknown:
                raise ValueError(f"byte: unknown field(s) {unknown}; it takes layers, d_model, heads, context")
            if self.prune is not None and (self.prune.mlp or self.prune.kv_heads):
                raise ValueError("prune.mlp/kv_heads: width pruning needs Llama/Qwen2/Gemma-3-style blocks; a byte model "
                                 "is a GPT-2: prune its depth (prune: {layers: K})")
        return self


class LMTextSpec(BaseModel):
    """Text for a language model: a built-in corpus, a .txt/.jsonl/.csv/.tsv/.parquet file or a datasets folder, cut into
    prompt + continuation (or packed, through a memory-mapped token store)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("fortunes", description="a built-in text set, a .txt/.jsonl/.csv/.tsv/.parquet file, or a datasets "
                      "folder (save_to_disk)")
    text_column: str | None = Field(None, description="the field/column holding the text (default text)")
    prompt_field: str | None = Field(None, description="SFT rows: the field holding the prompt (with response_field)")
    response_field: str | None = Field(None, description="SFT rows: the field holding the response (the loss is on it)")
    chat_template: bool = Field(False, description="SFT rows: wrap each prompt as a user turn in the tokenizer's chat template")
    pack: bool = Field(False, description="plain text joined end to end and cut into max_len-token rows, every token "
                       "scored; tokenised once into a memory-mapped token store in the run home's cache")
    prompt_len: int = Field(16, ge=1)
    max_len: int = Field(128, ge=3)
    train_limit: int | None = Field(None, ge=1)
    val_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)


    @model_validator(mode="after")
    def _pairs(self) -> "LMTextSpec":
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("prompt_field and response_field go together (prompt/response rows), or neither (plain text)")
        if self.pack and self.prompt_field is not None:
            raise ValueError("pack applies to plain text; prompt/response rows keep one pair per row")
        if self.chat_template and self.prompt_field is None:
            raise ValueError("chat_template applies to prompt/response rows: set prompt_field and response_field")
        return self


class LMStageOptions(BaseModel):
    """The ``lm:`` block of an ``lm`` stage: train or distil a causal LM on text."""

    model_config = ConfigDict(extra="forbid")

    student: LMModelSpec
    teacher: LMModelSpec | None = Field(None, description="with train.alpha < 1: the model to distil")
    data: LMTextSpec = Field(default_factory=LMTextSpec)
    train: LMDistillConfig = Field(default_factory=LMDistillConfig, description="alpha defaults to 1 (plain next-token CE) without a teacher")
    cache_topk: int | None = Field(None, ge=1, description="run the teacher once and keep its top-k log-probs per token")
    optimizer: Literal["backprop", "mezo"] = Field(
        "backprop", description="mezo: zeroth-order steps (two forward passes, no backward; plain next-token training)")
    mezo_eps: float = Field(1e-3, gt=0, description="MeZO's perturbation scale")
    responses: Literal["text", "teacher"] = Field(
        "text", description="teacher: train on a response the teacher writes once for each training prompt (sampled "
        "at T=1) instead of the text's own (sequence-level KD; with a pruned student and its unpruned model as the "
        "teacher: self-data distillation). Plain next-token CE on them unless train.alpha is set")
    forgetting: LMTextSpec | None = Field(
        None, description="text standing in for the starting model's pre-training (a general corpus the stage does "
        "not train on): its test split is scored before and after the stage (metrics pretrain_ppl_before, "
        "pretrain_ppl, forgetting_ppl = after - before, positive = forgotten)")

    @model_validator(mode="after")
    def _responses(self) -> "LMStageOptions":
        if self.responses == "teacher" and self.teacher is None:
            raise ValueError("responses: teacher needs lm.teacher (the model that writes the responses)")
        if self.teacher is not None and self.teacher.url is not None:
            for bad, why in ((self.responses == "teacher", "responses: teacher needs a live teacher to write them"),
                             (self.cache_topk is not None, "cache_topk: a served teacher is asked for teacher.topk per token"),
                             (self.train.on_policy > 0, "train.on_policy: on-policy rows are scored by a live teacher "
                              "in this process")):
                if bad:
                    raise ValueError(f"{why}; teacher.url serves its outputs on the training text")
        if self.teacher is not None and self.teacher.store is not None:
            if self.responses == "teacher":
                raise ValueError("responses: teacher needs a live teacher to write them; teacher.store holds outputs on "
                                 "fixed rows")
            if self.cache_topk is not None:
                raise ValueError("cache_topk: teacher.store already holds the teacher's top-k per token; drop cache_topk")
            if self.train.on_policy > 0:
                raise ValueError("train.on_policy: on-policy rows are scored by a live teacher; teacher.store holds "
                                 "outputs on the training text only")
        if self.student.url is not None:
            raise ValueError("student.url: a served model gives a teacher's outputs; the student is a model (pretrained, "
                             "hf, byte or stage)")
        if self.student.store is not None:
            raise ValueError("student.store: a store holds a teacher's outputs; the student is a model (pretrained, hf, "
                             "byte or stage)")
        if self.forgetting is not None and self.student.byte is not None:
            raise ValueError("forgetting: a fresh byte-level model has no pre-training to forget; score forgetting on a "
                             "model that starts trained ({pretrained}, {hf} or {stage})")
        if self.forgetting is not None and self.forgetting.model_dump() == self.data.model_dump():
            raise ValueError("forgetting: names the stage's own training text; give a corpus standing in for the "
                             "starting model's pre-training (e.g. forgetting: {name: brown, test_limit: 200})")
        if self.responses == "teacher" and self.data.pack:
            raise ValueError("responses: teacher rewrites the continuation of each prompt; packed text (data.pack) "
                             "has no prompts: drop pack or responses")
        return self
