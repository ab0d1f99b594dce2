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

Why not :class:`attar.train.trainer.Trainer`: its batches are ``(x [B, ...], y [B])`` rows scored by
classification metrics on ``[B, C]`` logits, and it has no point between drawing a batch and running
the student where the batch's inputs could be replaced by the student's own samples (on-policy) or
where a ``[B, L, k]`` per-token cache could be read; forcing that in would bend its interface for every
other method. This loop is deliberately small: seeded data order (``seed``, epoch) and sampling
(``seed``, step), AdamW, warm-up + cosine learning rate, gradient clipping, no checkpoint/resume.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from attar.distill.divergences import DIVERGENCES, divergence_params
from attar.distill.lm_objectives import (
    LMTeacherCache,
    check_vocab,
    lm_logits,
    teacher_lm_logits,
    token_ce_loss,
    token_kd_loss,
)
from attar.distill.lm_config import LMDistillConfig
from attar.errors import AttarError
from attar.registry import validation_error
from attar.rng import generator, seed_of
from attar.text.charlm import LMData, LMSplit
from attar.train.schedule import lr_at

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


def _trim(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Cut trailing columns that are padding in every row."""
    keep = (ids != pad_id).any(0)
    w = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
    return ids[:, :w], mask[:, :w]


def _device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_continuations(model: nn.Module, split: LMSplit, pad_id: int, eos_id: int | None, temperature: float = 1.0,
                         generator: torch.Generator | None = None, length: int | None = None,
                         vocab_size: int | None = None) -> LMSplit:
    """Keep each row's prompt and sample its response from ``model`` (KV cache, ancestral sampling).

    Rows are grouped by prompt length; each gets ``length`` new tokens (default: the split's width minus
    the prompt, so rows keep their shape). Tokens after the first EOS become padding; the response
    mask covers the sampled tokens up to and including that EOS. ``vocab_size`` cuts padded logits."""
    was = model.training
    model.eval()
    dev = _device(model)
    width = split.ids.shape[1]
    ids = torch.full_like(split.ids, pad_id)
    mask = torch.zeros_like(split.mask)
    if length is not None:
        width = int(split.prompt_len.max()) + length
        ids = torch.full((len(split), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(split), width), dtype=torch.bool)
    try:
        for p in sorted(set(split.prompt_len.tolist())):
            rows = (split.prompt_len == p).nonzero().flatten()
            n_new = width - p
            cur = split.ids[rows, :p].to(dev)
            ids[rows, :p] = cur.cpu()
            if n_new <= 0:
                continue
            out = model(input_ids=cur, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            done = torch.zeros(len(rows), dtype=torch.bool)
            for j in range(n_new):
                z = logits.float()[:, :vocab_size] if vocab_size else logits.float()
                probs = torch.softmax(z / temperature, dim=-1).cpu()
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                live = ~done
                ids[rows[live], p + j] = tok[live]
                mask[rows[live], p + j] = True
                if eos_id is not None:
                    done |= tok == eos_id
                if bool(done.all()) or j == n_new - 1:
                    break
                out = model(input_ids=tok.unsqueeze(1).to(dev), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
    finally:
        model.train(was)
    return LMSplit(ids, mask, split.prompt_len.clone())


@torch.no_grad()
def perplexity(model: nn.Module, split: LMSplit, pad_id: int, batch_size: int = 64, vocab_size: int | None = None) -> float:
    """``exp(mean NLL)`` of ``model`` over every response token of ``split``."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    try:
        for i in range(0, len(split), batch_size):
            ids, mask = _trim(split.ids[i : i + batch_size], split.mask[i : i + batch_size], pad_id)
            z = lm_logits(model, ids, pad_id)
            if vocab_size:
                z = z[..., :vocab_size]
            k = int(mask[:, 1:].sum())
            if k:
                nll += float(token_ce_loss(z, ids, mask, reduction="sum"))
                n += k
    finally:
        model.train(was)
    if n == 0:
        raise AttarError("perplexity: the split has no response tokens.")
    return math.exp(nll / n)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def distill_lm(student: nn.Module, data: LMData, teacher: nn.Module | None = None, config: LMDistillConfig | dict | None = None,
               *, cache: LMTeacherCache | None = None, student_tokenizer: Any = None, teacher_tokenizer: Any = None,
               token_map: Tensor | dict | None = None, teacher_pad_id: int | None = None,
               on_metrics: Callable[[int, dict], None] | None = None, **overrides: Any) -> LMResult:
    """Train ``student`` on ``data.train`` with CE and/or token-level KD from ``teacher`` (module doc).

    ``cache`` (built on ``data.train.ids``) replaces the live teacher on ground-truth rows; on-policy
    rows always need the live ``teacher``. The vocabularies are checked (:func:`check_vocab`) before
    any step: give both tokenizers for the token → id comparison, or ``token_map`` to bridge two."""
    cfg = _config(config, overrides)
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
                       teacher_tokenizer, student_tokenizer, token_map) if needs_teacher else None
    v_student = vmap.student_size if vmap is not None else None
    if cache is not None:
        if len(cache) != len(data.train):
            raise AttarError(f"the teacher cache holds {len(cache)} rows but the training split has {len(data.train)}; "
                             "build it on data.train.ids.")
        why = cache.mismatch(ids=data.train.ids, temperature=cfg.temperature)
        if why:
            raise AttarError(f"the teacher cache does not fit: {why}. Rebuild it (LMTeacherCache.build).")
        if v_student is not None and cache.vocab_size != v_student:
            raise AttarError(f"the cache covers {cache.vocab_size} tokens but the student's vocabulary has {v_student}.")

    train, pad = data.train, data.pad_id
    n = len(train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    val = data.val.rows(torch.arange(min(cfg.eval_rows, len(data.val)))) if len(data.val) else None
    mon = data.val.rows(torch.arange(min(cfg.monitor_prompts, len(data.val)))) if (
        len(data.val) and cfg.on_policy > 0 and cfg.monitor_prompts) else None
    dev = _device(student)
    history: list[dict] = []
    best = (float("inf"), None, 0)
    rising, hacking, stopped = 0, False, None
    t0 = time.perf_counter()
    n_on_total = 0
    student.train()
    order = torch.empty(0, dtype=torch.long)
    for step in range(cfg.steps):
        epoch, micro = divmod(step, steps_per_epoch)
        if micro == 0:
            order = torch.randperm(n, generator=generator(cfg.seed, 1, epoch))
        rows = order[micro * bs : (micro + 1) * bs]
        batch = train.rows(rows)
        ids, mask = batch.ids, batch.mask
        n_on = int(round(cfg.on_policy * len(rows))) if cfg.on_policy > 0 else 0
        on_rows = torch.zeros(len(rows), dtype=torch.bool)
        if n_on:
            g = generator(cfg.seed, 2, step)
            pick = torch.randperm(len(rows), generator=g)[:n_on]
            on_rows[pick] = True
            gen = sample_continuations(student, batch.rows(pick), pad, data.eos_id, cfg.sample_temperature, g,
                                       vocab_size=v_student)
            ids, mask = ids.clone(), mask.clone()
            ids[pick], mask[pick] = gen.ids, gen.mask
            n_on_total += n_on
        ids, mask = _trim(ids, mask, pad)
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step, cfg.steps, cfg.steps, cfg.lr, "cosine", cfg.warmup_steps)
        torch.manual_seed(seed_of(cfg.seed, 4, step))  # dropout
        logits = lm_logits(student, ids.to(dev), pad)
        if v_student is not None:
            logits = logits[..., :v_student]
        losses: dict[str, Tensor] = {}
        loss = logits.sum() * 0.0
        gt_mask = mask & ~on_rows.unsqueeze(1)
        if cfg.alpha > 0:
            ce = token_ce_loss(logits, ids, gt_mask)
            loss = loss + cfg.alpha * ce
            losses["ce"] = ce.detach()
        if needs_teacher:
            if cache is not None and not bool(on_rows.any()):
                tk = cache.get(rows, ids.shape[1])
                kd = token_kd_loss(logits, tk, mask, cfg.divergence, cfg.temperature, **cfg.divergence_args)
            elif cache is not None:
                # ground-truth rows from the cache, on-policy rows from the live teacher; token-weighted mean
                parts, counts = [], []
                off = (~on_rows).nonzero().flatten()
                on = on_rows.nonzero().flatten()
                if len(off):
                    tk = cache.get(rows[off], ids.shape[1])
                    parts.append(token_kd_loss(logits[off], tk, mask[off], cfg.divergence, cfg.temperature,
                                               **cfg.divergence_args))
                    counts.append(int(mask[off][:, 1:].sum()))
                t_on = teacher_lm_logits(teacher, ids[on], vmap, pad, teacher_pad_id)
                parts.append(token_kd_loss(logits[on], t_on.to(dev), mask[on], cfg.divergence, cfg.temperature,
                                           **cfg.divergence_args))
                counts.append(int(mask[on][:, 1:].sum()))
                tot = max(1, sum(counts))
                kd = sum(p * (c / tot) for p, c in zip(parts, counts))
            else:
                t_logits = teacher_lm_logits(teacher, ids, vmap, pad, teacher_pad_id).to(dev)
                kd = token_kd_loss(logits, t_logits, mask, cfg.divergence, cfg.temperature, **cfg.divergence_args)
            loss = loss + kd_weight * kd
            losses["kd"] = kd.detach()
        lval = float(loss.detach())
        if not math.isfinite(lval):
            raise AttarError(f"distill_lm: the loss became {lval} at step {step}; lower lr or set grad_clip.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            rec: dict[str, Any] = {"step": step + 1, "loss": lval, **{k: float(v) for k, v in losses.items()},
                                   "seconds": time.perf_counter() - t0}
            if val is not None:
                rec["val_ppl"] = perplexity(student, val, pad, vocab_size=v_student)
            if mon is not None:
                smp = sample_continuations(student, mon, pad, data.eos_id, cfg.sample_temperature,
                                           generator(cfg.seed, 3), vocab_size=v_student)
                with torch.no_grad():
                    tz = teacher_lm_logits(teacher, smp.ids, vmap, pad, teacher_pad_id)
                rec["teacher_nll_of_samples"] = float(token_ce_loss(tz, smp.ids, smp.mask))
            history.append(rec)
            if on_metrics is not None:
                on_metrics(step + 1, rec)
            if "val_ppl" in rec:
                if rec["val_ppl"] < best[0]:
                    best = (rec["val_ppl"], copy.deepcopy(student.state_dict()) if cfg.restore_best else None, step + 1)
                    rising = 0
                elif len(history) >= 2 and rec["val_ppl"] > history[-2]["val_ppl"]:
                    rising += 1
                else:
                    rising = 0
                tn = [h["teacher_nll_of_samples"] for h in history[-(cfg.patience + 1):] if "teacher_nll_of_samples" in h]
                if rising >= cfg.patience and len(tn) == cfg.patience + 1 and tn[-1] < tn[0]:
                    hacking = True
                    if cfg.stop_on_hacking:
                        stopped = step + 1
                        break
    restored = None
    if cfg.restore_best and best[1] is not None and history and history[-1].get("val_ppl", best[0]) > best[0]:
        student.load_state_dict(best[1])
        restored = best[2]
    student.eval()
    metrics = {
        "steps": stopped or cfg.steps, "train_seconds": time.perf_counter() - t0, "best_val_ppl": best[0] if math.isfinite(best[0]) else None, "best_step": best[2], "restored_step": restored,
        "teacher_hacking_suspected": hacking, "stopped_at": stopped, "on_policy_rows": n_on_total,
        "teacher": ("none" if not needs_teacher else (cache.mode if cache is not None else "live")),
        "config": cfg.model_dump(),
    }
    return LMResult(student, history, metrics)


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
