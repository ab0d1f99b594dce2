"""Causal-LM distillation: token-level KD, on-policy distillation (GKD), sequence-level KD.

Entry points (all on Hugging Face causal LMs, e.g. :func:`attar.text.charlm.make_byte_lm` models or
any folder loaded with :func:`attar.text.charlm.load_causal_lm`; data from :func:`attar.text.charlm.lm_data`):

* :func:`train_lm` — plain next-token cross-entropy on the response tokens (trains the teacher, and
  the "student without KD" baseline).
* :func:`distill_lm` — ``loss = α·CE + (1−α)·KD`` with KD = :func:`~attar.distill.lm_objectives.token_kd_loss`
  (any registered divergence, masked to response tokens, temperature ``T``), the teacher run live or
  read from a per-token top-k cache (:class:`~attar.distill.lm_objectives.LMTeacherCache`), and
  **on-policy** rows: in every batch a fraction ``λ = on_policy`` of the rows keep their prompt but get
  a continuation *sampled from the current student* (no gradient through sampling), which the teacher
  then scores token by token (GKD, Agarwal et al. 2024). ``λ = 0`` is exactly off-policy KD (no
  sampling happens, no random number is drawn). CE applies only to ground-truth rows.
* :func:`teacher_generations` + :func:`sequence_kd` — sequence-level KD (Kim & Rush 2016): the teacher
  samples a continuation of every training prompt once; the student is trained with CE on them.
* :func:`perplexity` — ``exp`` of the mean next-token NLL over the response tokens of a split.

**Teacher hacking guard** (*On Teacher Hacking in LM Distillation*, Tiapkin et al. 2025: a student
distilled on fixed or self-generated data can over-fit the teacher's errors, so its likelihood under
the teacher improves while its quality under the true distribution degrades). attar's guard:

1. ``min_ground_truth`` (default 0.25): at least this fraction of every batch is ground-truth text,
   so ``on_policy`` above ``1 − min_ground_truth`` is refused (lower the guard explicitly to go further).
2. Every ``eval_every`` steps the loop records the student's **held-out perplexity** on the
   validation split (ground-truth text: the proxy for the oracle) and, when on-policy, the
   **teacher's NLL of student samples** on fixed validation prompts (how much the teacher likes what the
   student writes). Hacking shows as the second falling while the first rises.
3. The best state by validation perplexity is kept and restored at the end (``restore_best``); when
   validation perplexity has risen for ``patience`` consecutive evaluations while the teacher's NLL of
   the samples fell, ``teacher_hacking_suspected`` is set in the result and (``stop_on_hacking``)
   training stops.

All of them run on :class:`attar.train.trainer.Trainer` through the language-model task
(:mod:`attar.distill.lm_task`): seeded data order (``seed``, epoch), sampling (``seed``, step) and dropout
(``seed``, step); AdamW, warm-up + cosine learning rate, gradient clipping and accumulation; checkpoints
in ``ckpt_dir`` with exact resume after a kill; DDP under ``torchrun``; ``device`` and ``dtype``; logits
applied in chunks so a large vocabulary fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from attar.data.teacher_store import TeacherStore
from attar.distill.divergences import DIVERGENCES, divergence_params, is_batchwise
from attar.distill.lm_config import LMDistillConfig
from attar.distill.lm_cross_tokenizer import CrossTokenizer
from attar.distill.lm_memory import check_fits, estimate_lm_memory
from attar.distill.lm_monitor import LMMonitor
from attar.distill.lm_objectives import (
    LMTeacherCache,
    check_vocab,
    teacher_lm_logits,
    token_ce_loss,
)
from attar.distill.lm_sampling import sample_continuations, trim_padding
from attar.distill.lm_store import StoredLMTeacher
from attar.distill.lm_task import LMLoss, LMTask, auto_chunk, head_split, scored
from attar.errors import AttarError
from attar.registry import validation_error
from attar.rng import generator
from attar.text.charlm import LMData, LMSplit
from attar.train.config import TrainConfig
from attar.train.objective import device_of
from attar.train.strategy import StepStrategy
from attar.train.trainer import Trainer, resolve_device

__all__ = ["LMDistillConfig", "LMResult", "distill_lm", "train_lm", "perplexity", "sample_continuations",
           "teacher_generations", "sequence_kd"]


@dataclass
class LMResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _config(config: LMDistillConfig | dict | None, overrides: dict) -> LMDistillConfig:
    if isinstance(config, LMDistillConfig) and not overrides:
        return config
    base = config.model_dump() if isinstance(config, LMDistillConfig) else dict(config or {})
    try:
        cfg = LMDistillConfig(**(base | overrides))
    except ValidationError as e:
        raise validation_error("Invalid LM distillation settings", e, LMDistillConfig) from None
    if cfg.divergence not in DIVERGENCES:
        raise AttarError(f"unknown divergence {cfg.divergence!r}; known: {', '.join(DIVERGENCES.names())}.")
    unknown = sorted(set(cfg.divergence_args) - set(divergence_params(cfg.divergence)))
    if unknown:
        raise AttarError(f"divergence {cfg.divergence!r} does not accept {unknown}; its parameters: "
                         f"{divergence_params(cfg.divergence) or 'none'}.")
    if cfg.on_policy > 1 - cfg.min_ground_truth + 1e-12:
        raise AttarError(
            f"on_policy={cfg.on_policy} leaves less than min_ground_truth={cfg.min_ground_truth} of each batch as "
            "ground-truth text; that guard limits teacher hacking (the student over-fitting the teacher on its own "
            "samples). Lower on_policy, or lower min_ground_truth deliberately.")
    return cfg


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: nn.Module, split: LMSplit, pad_id: int, batch_size: int = 64, vocab_size: int | None = None,
               chunk_tokens: int | None = None) -> float:
    """``exp(mean NLL)`` of ``model`` over every response token of ``split`` (logits a chunk of positions at a time)."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    dev = device_of(model)
    split_model = head_split(model)
    try:
        for i in range(0, len(split), batch_size):
            part = split.slice(i, i + batch_size)  # an LMSplit or a token store's blocks: only these rows are read
            ids, mask = trim_padding(part.ids, part.mask, pad_id)
            pos = scored(mask)
            if not bool(pos.any()):
                continue
            h, head = split_model.at(ids.to(dev), (ids != pad_id).long().to(dev), pos.to(dev))
            y = ids[:, 1:][pos].to(dev)
            chunk = auto_chunk(vocab_size or split_model.width(h, head), chunk_tokens, len(h))
            for a in range(0, len(h), chunk):
                z = head(h[a : a + chunk])
                nll += float(nn.functional.cross_entropy(z[:, :vocab_size] if vocab_size else z, y[a : a + chunk],
                                                         reduction="sum"))
            n += len(y)
    finally:
        model.train(was)
    if n == 0:
        raise AttarError("perplexity: the split has no response tokens.")
    return math.exp(nll / n)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def distill_lm(student: nn.Module, data: LMData, teacher: nn.Module | None = None, config: LMDistillConfig | dict | None = None,
               *, cache: LMTeacherCache | StoredLMTeacher | str | Path | None = None, student_tokenizer: Any = None, teacher_tokenizer: Any = None,
               token_map: Tensor | dict | None = None, teacher_pad_id: int | None = None,
               on_metrics: Callable[[int, dict], None] | None = None, ckpt_dir: str | Path | None = None,
               resume: bool = False, progress: bool | None = None, strategy: StepStrategy | None = None,
               **overrides: Any) -> LMResult:
    """Train ``student`` on ``data.train`` with CE and/or token-level KD from ``teacher`` (module doc).

    ``cache`` (built on ``data.train.ids``) replaces the live teacher on ground-truth rows: a top-k
    :class:`LMTeacherCache`, or a stored teacher (:func:`attar.distill.lm_store.dump_lm_teacher`'s folder, a
    :class:`StoredLMTeacher`); on-policy rows always need the live ``teacher``. The vocabularies are checked (:func:`check_vocab`) before
    any step: give both tokenizers for the token → id comparison, or ``token_map`` to bridge two.
    ``ckpt_dir``: write checkpoints there (every ``checkpoint_every`` steps and at the end); ``resume``
    continues from the newest one and ends with the weights of an uninterrupted run. ``strategy``: another
    Trainer step (e.g. :class:`attar.adapt.mezo.MeZOStep` for zeroth-order training)."""
    cfg = _config(config, overrides)
    if isinstance(cache, (str, Path, TeacherStore)):  # a stored teacher (attar teacher dump) plugs in as a cache
        cache = StoredLMTeacher(cache)
    if getattr(cache, "split", False) is None:  # a served teacher (attar.distill.lm_served) not yet given its rows
        cache.bind(data.train, data.pad_id)
    kd_weight = 1.0 - cfg.alpha
    needs_teacher = kd_weight > 0
    if needs_teacher and teacher is None and cache is None:
        raise AttarError("distill_lm: alpha < 1 needs a teacher (or a teacher cache); use train_lm for CE alone.")
    if cfg.on_policy > 0 and teacher is None:
        raise AttarError("distill_lm: on-policy rows are scored by the live teacher; pass teacher= (a cache cannot "
                         "score text the student writes during training).")
    if cfg.on_policy > 0 and not needs_teacher:
        raise AttarError("distill_lm: on_policy > 0 with alpha = 1 would train on the student's own samples with no "
                         "teacher signal; lower alpha.")
    vmap = check_vocab(teacher if teacher is not None else (cache.vocab_size if cache else None), student,
                       teacher_tokenizer, student_tokenizer, token_map, cfg.cross_tokenizer) if needs_teacher else None
    v_student = vmap.student_size if vmap is not None else None
    cross = _cross_tokenizer(vmap, cfg, teacher, cache, student_tokenizer, teacher_tokenizer)
    if cache is not None:
        what = "stored teacher" if isinstance(cache, StoredLMTeacher) else "teacher cache"
        hint = getattr(cache, "rebuild_hint", "Rebuild it (LMTeacherCache.build).")
        if len(cache) != len(data.train):
            raise AttarError(f"the {what} holds {len(cache)} rows but the training split has {len(data.train)}; "
                             f"it must be made on data.train. {hint}")
        rows_of = cross.teacher_rows(data.train) if cross is not None and isinstance(cache, StoredLMTeacher) else data.train
        why = cache.mismatch(ids=rows_of, temperature=cfg.temperature)
        if why:
            raise AttarError(f"the {what} does not fit: {why}. {hint}")
        if v_student is not None and cache.vocab_size != v_student and cross is None:
            raise AttarError(f"the cache covers {cache.vocab_size} tokens but the student's vocabulary has {v_student}.")
    if cfg.gradient_checkpointing:
        if not hasattr(student, "gradient_checkpointing_enable"):
            raise AttarError("gradient_checkpointing: the student is not a Hugging Face model that supports it.")
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    pad = data.pad_id
    train = data.train
    task = LMTask(train, pad, data.eos_id, alpha=cfg.alpha, divergence_name=cfg.divergence, temperature=cfg.temperature,
                  divergence_args=cfg.divergence_args, on_policy=cfg.on_policy, sample_temperature=cfg.sample_temperature,
                  teacher=teacher if needs_teacher else None, cache=cache, vmap=vmap, teacher_pad_id=teacher_pad_id,
                  chunk_tokens=cfg.chunk_tokens, cross=cross)
    objective = LMLoss(cfg.alpha, cfg.divergence, cfg.temperature, cfg.divergence_args, cfg.chunk_tokens)
    val = data.val.rows(torch.arange(min(cfg.eval_rows, len(data.val)))) if len(data.val) else None
    mon = data.val.rows(torch.arange(min(cfg.monitor_prompts, len(data.val)))) if (
        len(data.val) and cfg.on_policy > 0 and cfg.monitor_prompts) else None

    def measure(model: nn.Module) -> dict[str, float]:
        rec: dict[str, float] = {}
        if val is not None:
            rec["val_ppl"] = perplexity(model, val, pad, vocab_size=v_student, chunk_tokens=cfg.chunk_tokens)
        if mon is not None:
            smp = sample_continuations(model, mon, pad, data.eos_id, cfg.sample_temperature, generator(cfg.seed, 3),
                                       vocab_size=v_student)
            tz = teacher_lm_logits(teacher, smp.ids, vmap, pad, teacher_pad_id)
            rec["teacher_nll_of_samples"] = float(token_ce_loss(tz, smp.ids, smp.mask))
        return rec

    parts = estimate_lm_memory(student, teacher if needs_teacher else None, batch_size=min(cfg.batch_size, len(train)),
                               length=train.width, chunk_tokens=cfg.chunk_tokens,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    check_fits(parts, resolve_device(cfg.device), where="distill_lm: ")
    tcfg = TrainConfig(epochs=1, steps=cfg.steps, batch_size=min(cfg.batch_size, len(train)), lr=cfg.lr,
                       weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
                       accumulate=cfg.accumulate, checkpoint_every=cfg.checkpoint_every, schedule="cosine",
                       eval_every=10**9, device=cfg.device, dtype=cfg.dtype, fsdp=cfg.fsdp, **cfg.train_fields())
    monitor = LMMonitor(cfg.eval_every, cfg.steps, val, mon, measure, cfg.restore_best, cfg.patience,
                        cfg.stop_on_hacking, on_metrics)
    # the LM task reads rows through train.rows(...); the Trainer only counts them (a token store's blocks stay on disk)
    rows_x = train.ids if isinstance(train, LMSplit) else torch.empty(len(train), 0, dtype=torch.long)
    trainer = Trainer(student, objective, rows_x, train.prompt_len, tcfg, seed=cfg.seed,
                      teachers=[teacher] if (needs_teacher and teacher is not None) else [], teacher_cache=cache,
                      ckpt_dir=ckpt_dir, name="lm", task=task, callbacks=[monitor], progress=progress,
                      strategy=strategy)
    res = trainer.fit(resume=resume)
    student = res.model
    student.eval()
    metrics = {
        "steps": res.steps, "train_seconds": res.seconds,
        "best_val_ppl": monitor.best_ppl if math.isfinite(monitor.best_ppl) else None, "best_step": monitor.best_step,
        "restored_step": monitor.restored, "teacher_hacking_suspected": monitor.hacking, "stopped_at": monitor.stopped,
        "on_policy_rows": int(round(cfg.on_policy * (tcfg.batch_size // trainer.world))) * res.steps * cfg.accumulate,
        "teacher": ("none" if not needs_teacher else (cache.mode if cache is not None else "live")),
        **({"teacher": f"{'live' if teacher is not None else 'stored' if isinstance(cache, StoredLMTeacher) else 'served'}"
                       f", {cross.describe()}", "cross_tokenizer": vmap.note,
            "paired_fraction": round(cross.pairing_rate(train), 4)} if cross is not None else {}),
        "config": cfg.model_dump(),
    }
    return LMResult(student, monitor.history, metrics)


def _cross_tokenizer(vmap, cfg: LMDistillConfig, teacher, cache, student_tokenizer, teacher_tokenizer):
    """The cross-tokenizer side of distill_lm when the vocabulary check chose it (else None), with what it cannot
    combine with refused by name."""
    if vmap is None or vmap.cross is None:
        return None
    why = f"train.cross_tokenizer ({vmap.note})"
    # a served teacher is asked for its top-k on the teacher's own rows; a store must have been dumped on them
    outputs = teacher is None and (hasattr(cache, "topk_rows") or isinstance(cache, StoredLMTeacher))
    if not outputs and (teacher is None or cache is not None):
        raise AttarError(f"{why}: the teacher must run live on its own tokens, be served (teacher.url) or stored on its "
                         "own rows (attar teacher dump --student-tokenizer); a top-k cache holds outputs over the "
                         "student's tokens. Load the teacher model, or give both the same tokenizer.")
    if cfg.on_policy > 0:
        raise AttarError(f"{why}: on-policy rows (train.on_policy) are not supported across tokenizers yet; set "
                         "on_policy: 0.")
    if is_batchwise(cfg.divergence):
        raise AttarError(f"{why}: divergence {cfg.divergence!r} compares all tokens as one set; cross-tokenizer KD "
                         "compares paired positions one by one: choose a per-token divergence (kl, js, ...).")
    return CrossTokenizer(vmap.cross, student_tokenizer, teacher_tokenizer, vmap.student_size, vmap.teacher_size)


def train_lm(model: nn.Module, data: LMData, config: LMDistillConfig | dict | None = None, **overrides: Any) -> LMResult:
    """Next-token cross-entropy on the response tokens of ``data.train`` (``distill_lm`` with ``alpha=1``)."""
    return distill_lm(model, data, None, config, **({"alpha": 1.0} | overrides))


@torch.no_grad()
def teacher_generations(teacher: nn.Module, split: LMSplit, pad_id: int, eos_id: int | None, temperature: float = 1.0,
                        seed: int = 0, batch_size: int = 256, vocab_size: int | None = None) -> LMSplit:
    """The training prompts with responses sampled once from ``teacher`` (sequence-level KD data)."""
    parts = []
    g = generator(seed, 6)
    for i in range(0, len(split), batch_size):
        parts.append(sample_continuations(teacher, split.rows(torch.arange(i, min(i + batch_size, len(split)))), pad_id,
                                          eos_id, temperature, g, vocab_size=vocab_size))
    return LMSplit(torch.cat([p.ids for p in parts]), torch.cat([p.mask for p in parts]),
                   torch.cat([p.prompt_len for p in parts]))


def sequence_kd(student: nn.Module, teacher: nn.Module, data: LMData, config: LMDistillConfig | dict | None = None, *,
                generations: LMSplit | None = None, gen_temperature: float = 1.0, student_tokenizer: Any = None,
                teacher_tokenizer: Any = None, **overrides: Any) -> LMResult:
    """Sequence-level KD: CE on the teacher's own continuations of the training prompts.

    The vocabularies are checked like token-level KD (the generations are token ids of the teacher's
    vocabulary); pass ``generations`` to reuse ones made earlier with :func:`teacher_generations`."""
    vmap = check_vocab(teacher, student, teacher_tokenizer, student_tokenizer)
    if generations is None:
        seed = _config(config, overrides).seed
        generations = teacher_generations(teacher, data.train, data.pad_id, data.eos_id, gen_temperature, seed,
                                          vocab_size=vmap.student_size)
    res = train_lm(student, data.with_train(generations), config, **overrides)
    res.metrics["teacher"] = f"sequence-level ({len(generations)} teacher generations, T={gen_temperature:g})"
    return res
