"""Causal-LM stages: train or distil a causal language model on text, on the one Trainer (:mod:`attar.distill.lm`).

Recipes write them as ``train``, ``distill`` or ``finetune`` stages whose ``model`` is a causal LM
(:class:`attar.recipe.LMStageSpec` builds this kind's options from ``model``/``teacher``/``data``/``train`` and
the ``lm:`` block); ``kind: lm`` with an ``lm: {student, teacher, data, train, ...}`` block is the first spelling
of the same stage and still loads. Models are ``{pretrained: smollm2-135m}`` (a packaged model, converted once to a
Hugging Face folder), ``{hf: FOLDER}``, ``{byte: {layers: 2, d_model: 128}}`` (a fresh byte-level GPT-2) or
``{stage: NAME}`` (an earlier LM stage's model). Without a teacher the stage is next-token training (``alpha`` 1);
with one, token-level KD with any divergence, a top-k teacher cache (``cache_topk``) and on-policy rows. The stage
checkpoints into ``<run>/<stage>/checkpoints`` (``attar run --resume`` continues a killed run to the same weights),
writes ``<run>/<stage>/model`` (a Hugging Face folder with the tokenizer) and reports held-out perplexity,
the teacher's, and KL(teacher‖student) and top-1 agreement with the teacher on the test text::

    - name: student
      kind: distill
      model: {byte: {layers: 1, d_model: 64}}
      teacher: teacher
      data: {name: fortunes, max_len: 96}
      train: {steps: 200, alpha: 0.2, divergence: gjsd, divergence_args: {beta: 0.5}}
      lm: {cache_topk: 16}
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from torch import Tensor

from attar.adapt.mezo import MeZOConfig, MeZOStep
from attar.checkpoint import atomic_save_safetensors, latest_checkpoint
from attar.data.teacher_store import TeacherStore
from attar.distill.lm import _config, distill_lm, perplexity, teacher_generations
from attar.distill.lm_config import LMLoraSpec, LMModelSpec, LMPruneSpec, LMStageOptions, LMTextSpec
from attar.distill.lm_memory import describe, estimate_lm_memory
from attar.distill.lm_objectives import LMTeacherCache, check_vocab
from attar.distill.lm_sampling import trim_padding
from attar.distill.lm_served import ServedLMTeacher, probe
from attar.distill.lm_store import StoredLMTeacher
from attar.distill.lm_task import head_split, scored
from attar.errors import AttarError
from attar.io import atomic_write_json, staged_folder
from attar.models.sltrain import apply_sltrain, materialize
from attar.models.sltrain import parameter_bytes as sltrain_bytes
from attar.stages.base import (
    STAGES,
    EarlierStage,
    StageContext,
    StageInputs,
    StageKind,
    StageResult,
)
from attar.text.charlm import (
    LMSplit,
    byte_tokenizer,
    lm_packed_data,
    lm_pair_store_data,
    load_causal_lm,
    make_byte_lm,
    save_causal_lm,
)
from attar.text.lm_io import (
    lm_context,
    lm_dataset,
    pair_stream,
    scored_vocab,
)
from attar.text.lm_prune import decoder_layers, drop_layers, prune_depth
from attar.text.lm_width import prune_width, shrink_width
from attar.text.pretrained_lm import get_pretrained, load_pretrained_lm, resolve_lm
from attar.text.sources import TEXT_BUILTINS
from attar.text.text_stream import text_stream
from attar.text.token_store import tokenizer_fingerprint
from attar.train import distributed as dist
from attar.train.config import GrowthConfig, VCycleConfig
from attar.train.growth import g_stack
from attar.train.vcycle import check_depth, run_v_cycle


@STAGES.register("lm")
class LMStage(StageKind):
    """Train or distil a causal language model on text (``lm: {student, teacher, data, train}``)."""

    needs_data = False

    @classmethod
    def options_model(cls):
        return LMStageOptions

    @classmethod
    def references(cls, st: Any) -> list[str]:
        o = st.options  # the lm: block of a kind: lm stage, or the options a causal-LM train/distill stage builds
        return [m.stage for m in (o.student, o.teacher) if m is not None and m.stage] + (
            [o.train.growth.from_] if isinstance(o.train.growth, GrowthConfig) else [])

    def preflight(self, inputs: StageInputs):
        o = inputs.options
        with _recipe_fields(inputs):
            settings = _settings(o, inputs.seed)
            for role, m in (("student", o.student), ("teacher", o.teacher)):
                if m is None:
                    continue
                if m.store is not None:
                    _open_store(m.store)
                elif m.url is not None:
                    probe(m.url, m.protocol)  # a server that is not there is named before any work
                elif m.pretrained is not None:
                    get_pretrained(m.pretrained, field=f"lm.{role}.pretrained")
                elif m.hf is not None:
                    resolve_lm({"hf": m.hf})
                if m.prune is not None and role == "teacher":
                    raise AttarError("lm.teacher.prune: prune the student; the teacher is the unpruned model.")
                if m.stage is not None and not inputs.earlier[m.stage].causal_lm:
                    raise AttarError(f"lm.{role}: stage {m.stage!r} is a {inputs.earlier[m.stage].kind} stage of an "
                                     "image or table model; a causal-LM stage reads the model of an earlier causal-LM "
                                     "stage.")
            if o.data.prompt_field is not None:  # the first rows: a missing field or column is named before any work
                next(pair_stream(o.data.name, o.data.prompt_field, o.data.response_field).chunks(16), None)
            else:
                stream = text_stream(o.data.name, o.data.text_column)
                if stream.kind == "builtin" and not TEXT_BUILTINS.get(o.data.name).available():
                    TEXT_BUILTINS.get(o.data.name).load()  # says what is missing and the install command
                if stream.kind != "builtin":
                    next(stream.chunks(16))  # the first rows: a missing field or column is named before any work
            _check_efficient(o, inputs.earlier)
            if o.student.byte is not None:  # what a later stage's growth checks its shape against
                inputs.model_spec = {"byte": dict(o.student.byte)}
            if o.optimizer == "mezo" and settings.alpha < 1:
                raise AttarError("optimizer: mezo trains with next-token CE only (train.alpha 1, no teacher); MeZO "
                                 "estimates one gradient from two losses, a KD term has no place in it.")
            if o.teacher is not None and (o.teacher.store or o.teacher.url) and settings.alpha >= 1:
                raise AttarError(f"lm.teacher.{'store' if o.teacher.store else 'url'} with train.alpha 1 is never read "
                                 "(pure cross-entropy); lower train.alpha or drop the teacher.")
            if o.cache_topk is not None and settings.alpha >= 1:
                raise AttarError("cache_topk with train.alpha 1 has no effect (pure cross-entropy never reads the "
                                 "teacher); lower train.alpha or drop cache_topk.")
        return None

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        o: LMStageOptions = inputs.options
        out = ctx.stage_dir / "model"
        metrics_file = ctx.stage_dir / "lm-metrics.json"
        if ctx.resume and (out / "config.json").exists() and metrics_file.exists():
            model, _ = load_causal_lm(out)
            inputs.log(f"  finished earlier: loaded {out}")
            saved = json.loads(metrics_file.read_text())
            return StageResult(model, {"hf": str(out)}, saved["history"], metrics=saved["metrics"],
                               artifacts={"model": out})
        with _recipe_fields(inputs):
            cfg = _settings(o, inputs.seed)
            student, stok = _load(o.student, "student", inputs.earlier, cfg.seed)
            if isinstance(cfg.growth, GrowthConfig):  # G_stack (a resumed run's checkpoint then replaces these weights, as any start's)
                student = _grow(student, cfg.growth, inputs.earlier)
                inputs.log(f"  grown from stage {cfg.growth.from_!r}: its blocks stacked {cfg.growth.factor} times")
            stored = o.teacher is not None and (o.teacher.store is not None or o.teacher.url is not None)  # outputs only
            teacher, ttok = (_load(o.teacher, "teacher", inputs.earlier, cfg.seed) if o.teacher is not None and not stored
                             else (None, _outputs_tokenizer(o.teacher)))
            vmap = check_vocab(teacher, student, ttok, stok, cross_tokenizer=cfg.cross_tokenizer) if teacher is not None \
                else None
            if vmap is not None and vmap.cross is not None:
                if o.responses == "teacher" or o.cache_topk is not None:
                    raise AttarError(f"lm.{'responses' if o.responses == 'teacher' else 'cache_topk'}: {vmap.note}; "
                                     "it needs teacher and student on one tokenizer (drop it, or use a teacher that "
                                     "shares the student's tokenizer).")
                inputs.log(f"  teacher: {vmap.note}")
            contexts = [c for c in (lm_context(student), lm_context(teacher) if teacher is not None else None) if c]
            data = stage_data(o.data, stok, contexts, cfg.seed, inputs.cache_dir, inputs.log)
            vocab = vmap.student_size if vmap is not None else scored_vocab(student, stok)
            before = _forgetting_before(o, student, stok, contexts, vocab, ctx, inputs)  # the starting weights
            pruned: dict[str, Any] = {}
            if o.student.prune is not None and not (ctx.resume and latest_checkpoint(ctx.stage_dir / "checkpoints")):
                student, info = prune_student(student, o.student.prune,  # only the calibration rows are read
                                             data.train.slice(0, o.student.prune.calibration_rows).ids, data.pad_id)
                pruned = {"pruned_ppl": perplexity(student, data.test, data.pad_id, vocab_size=vocab)} | info["sizes"]
                inputs.log(f"  pruned {info['shape']}; test perplexity now {pruned['pruned_ppl']:.2f}")
                if dist.is_main():
                    atomic_write_json(ctx.stage_dir / "prune.json", info | pruned)
            elif o.student.prune is not None:  # resuming: rebuild the same pruned shape, the checkpoint has the weights
                info = json.loads((ctx.stage_dir / "prune.json").read_text())
                student = reshape_pruned(student, info)
                pruned = {k: info[k] for k in ("pruned_ppl", *info["sizes"])}
            if o.student.lora is not None:
                student = with_lora(student, o.student.lora)
                n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
                inputs.log(f"  LoRA rank {o.student.lora.rank}: {n_train:,} trainable parameters")
            inputs.log(f"  text: {data.info['sizes']} rows, {data.info['response_tokens']['train']:,} training tokens")
            if o.responses == "teacher":
                data = data.with_train(_teacher_responses(teacher, data, vmap, vocab, cfg.seed, ctx.stage_dir))
                inputs.log(f"  responses written by the teacher for {len(data.train)} training prompts "
                           f"({int(data.train.mask.sum()):,} tokens)")
            cache = None
            if stored and cfg.alpha < 1:
                cache = StoredLMTeacher(o.teacher.store) if o.teacher.url is None else ServedLMTeacher(
                    o.teacher.url, k=o.teacher.topk, temperature=cfg.temperature,
                    protocol=o.teacher.protocol).bind(data.train, data.pad_id)
                if ttok is None:
                    cache.check(tokenizer=tokenizer_fingerprint(stok), vocab_size=vocab or len(stok), ids=data.train,
                                temperature=cfg.temperature)
                else:  # the teacher's own tokenizer, another than the student's: cross-tokenizer KD (distill_lm
                    # checks a store's rows against the teacher's own rows of this split)
                    cache.check(tokenizer=tokenizer_fingerprint(ttok), vocab_size=cache.vocab_size or len(ttok),
                                ids=data.train if o.teacher.url is not None else None, temperature=cfg.temperature)
                if o.teacher.url is not None:
                    _same_served_weights(cache, ctx)
                inputs.log(f"  teacher: {cache.mode}")
            elif o.cache_topk is not None and teacher is not None and cfg.alpha < 1:
                cache, built = LMTeacherCache.load_or_build(ctx.stage_dir / "teacher-cache.safetensors", teacher,
                                                            data.train, o.cache_topk, cfg.temperature, vmap=vmap,
                                                            pad_id=data.pad_id)
                inputs.log(f"  teacher cache {'built' if built else 'reused'}: {cache.mode}")
            parts = estimate_lm_memory(student, teacher if cfg.alpha < 1 else None, batch_size=cfg.batch_size,
                                       length=data.train.width, chunk_tokens=cfg.chunk_tokens,
                                       gradient_checkpointing=cfg.gradient_checkpointing)
            inputs.log(f"  memory estimate: {describe(parts)}")

            def train(model, steps=cfg.steps, seed=cfg.seed, ckpt_dir=ctx.stage_dir / "checkpoints", on_metrics=ctx.on_metrics):
                return distill_lm(model, data, teacher if cfg.alpha < 1 else None,
                                  cfg.model_copy(update={"steps": steps, "seed": seed}), cache=cache,
                                  student_tokenizer=stok, teacher_tokenizer=ttok, ckpt_dir=ckpt_dir,
                                  resume=ctx.resume, on_metrics=on_metrics,
                                  strategy=MeZOStep(MeZOConfig(eps=o.mezo_eps)) if o.optimizer == "mezo" else None)

            cycle: list[dict] = []
            if isinstance(cfg.growth, VCycleConfig):  # every phase one run of train() (attar.train.vcycle)
                res, cycle = _v_cycle(student, cfg, train, data, ctx, inputs.log)
            else:
                res = train(student)
        model, arts = res.model, {"model": out}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if o.student.lora is not None:  # the adapter in PEFT format, then the merged model like any other
            if dist.is_main():
                with staged_folder(ctx.stage_dir / "adapter") as tmp:
                    model.save_pretrained(str(tmp))
            arts["adapter"] = ctx.stage_dir / "adapter"
            model = model.merge_and_unload()
        metrics: dict[str, Any] = {"test_ppl": perplexity(model, data.test, data.pad_id, vocab_size=vocab),
                                   "steps": res.metrics["steps"],
                                   "train_s": round(float(res.metrics["train_seconds"]), 1),
                                   "params": sum(p.numel() for p in model.parameters()), "trainable": trainable} | pruned
        if "paired_fraction" in res.metrics and teacher is None:  # a served or stored teacher, another tokenizer
            metrics["cross_tokenizer"] = res.metrics.get("teacher", res.metrics.get("cross_tokenizer"))
            metrics["paired_fraction"] = res.metrics["paired_fraction"]
        if teacher is not None:
            if vmap is None or vmap.cross is None:  # across tokenizers the two models score different tokens
                metrics["teacher_test_ppl"] = perplexity(teacher, data.test, data.pad_id, vocab_size=vocab)
                metrics |= agreement(teacher, model, data.test, data.pad_id, vocab)
            else:
                metrics["cross_tokenizer"] = res.metrics.get("teacher", vmap.note)
                metrics["paired_fraction"] = res.metrics.get("paired_fraction")
        if before is not None:
            after = perplexity(model, before[0].test, before[0].pad_id, vocab_size=vocab)
            metrics |= {"pretrain_ppl_before": before[1], "pretrain_ppl": after, "forgetting_ppl": after - before[1]}
            inputs.log(f"  forgetting on {o.forgetting.name}: perplexity {before[1]:.2f} -> {after:.2f}")
        if cycle:  # the whole cycle's steps and tokens (each phase's in lm-metrics.json, "vcycle")
            metrics |= {"vcycle_steps": sum(r["steps"] for r in cycle), "vcycle_tokens": sum(r["tokens"] for r in cycle)}
        if o.student.parameterization is not None:  # SLTrain: the folder holds the dense weights B A + S
            metrics |= {f"sltrain_{k}_bytes": v for k, v in sltrain_bytes(model).items()}
            materialize(model)
        if dist.is_main():  # under torchrun every rank holds the same model: one writes, the others wait for it
            with staged_folder(out) as tmp:
                save_causal_lm(model, stok, tmp)
            atomic_write_json(metrics_file, {"metrics": metrics, "history": res.history}
                              | ({"vcycle": cycle} if cycle else {}))
        dist.barrier()
        return StageResult(model, {"hf": str(out)}, res.history, metrics=metrics, artifacts=arts)


def _outputs_tokenizer(spec: LMModelSpec | None):
    """The tokenizer a served or stored teacher declared with ``teacher.tokenizer`` (a packaged name or an HF folder),
    else None."""
    if spec is None or spec.tokenizer is None:
        return None
    return load_tokenizer(spec.tokenizer, "teacher.tokenizer")


def load_tokenizer(name: str, field: str):
    """A tokenizer only (no weights): a Hugging Face folder, or a packaged model's (converted on first use)."""
    from transformers import AutoTokenizer

    folder = Path(name).expanduser()
    if not folder.is_dir():
        folder = resolve_lm({"pretrained": name}, progress=False)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise AttarError(f"{field} {name!r}: no tokenizer could be read from {folder} ({e}); give a packaged model "
                         "name or a folder holding tokenizer.json.") from None


def _same_served_weights(served: ServedLMTeacher, ctx: StageContext) -> None:
    """Record the served teacher's weights hash (``/info``'s ``weights``) in ``served-teacher.json``; a resumed stage
    refuses a server that now holds other weights (a restarted server with another model would silently change
    the teacher half-way). Servers that do not declare one (vLLM, SGLang) are not checked."""
    record = ctx.stage_dir / "served-teacher.json"
    now = {"url": served.url, "model": served.info.get("model"), "weights": served.info.get("weights")}
    if ctx.resume and record.exists():
        was = json.loads(record.read_text())
        if was.get("weights") and now["weights"] and was["weights"] != now["weights"]:
            raise AttarError(
                f"teacher.url: the server at {served.url} now serves other weights ({now['model'] or '?'}, hash "
                f"{now['weights']}) than this stage started with ({was.get('model') or '?'}, hash {was['weights']}); "
                "serve the original teacher again to resume, or start a fresh run.")
        return
    if dist.is_main():
        atomic_write_json(record, now)


def _forgetting_before(o: LMStageOptions, student, stok, contexts: list[int], vocab, ctx, inputs):
    """``(rows, perplexity)`` of the starting model on the ``forgetting`` text's test split, or None without one.

    The split is drawn with seed 0 whatever the stage's seed, so every seed is scored on the same rows; the value is
    kept in ``forgetting.json`` so a resumed stage (whose model is restored from a checkpoint) reports the start's."""
    if o.forgetting is None:
        return None
    rows = stage_data(o.forgetting, stok, contexts, 0, inputs.cache_dir, inputs.log)
    saved = ctx.stage_dir / "forgetting.json"
    if ctx.resume and saved.exists():
        return rows, json.loads(saved.read_text())["pretrain_ppl_before"]
    ppl = perplexity(student, rows.test, rows.pad_id, vocab_size=vocab)
    if dist.is_main():
        atomic_write_json(saved, {"pretrain_ppl_before": ppl, "text": o.forgetting.name, "rows": len(rows.test)})
    inputs.log(f"  forgetting: {len(rows.test)} test rows of {o.forgetting.name}, starting perplexity {ppl:.2f}")
    return rows, ppl


@contextmanager
def _recipe_fields(inputs: StageInputs) -> Iterator[None]:
    """Errors inside name the stage and the fields as its recipe wrote them: ``lm.student`` / ``lm.teacher`` in a
    ``kind: lm`` stage, ``model`` / ``teacher`` in a causal-LM train/distill/finetune stage."""
    if inputs.kind == "lm":
        with inputs.context("lm"):
            yield
        return
    with inputs.context():
        try:
            yield
        except AttarError as e:
            raise AttarError(as_stage_fields(str(e))) from None


def as_stage_fields(msg: str) -> str:
    """An LM options message in the words of a causal-LM train/distill/finetune stage (``lm.student`` -> ``model``)."""
    return msg.replace("lm.student", "model").replace("lm.teacher", "teacher")


def stage_data(d: LMTextSpec, tok, contexts: list[int], seed: int, cache_dir, log=None):
    """The stage's text as rows for ``tok``: prompt/response pairs, packed blocks (a token store under
    ``cache_dir/tokens``) or prompt + continuation rows. ``attar teacher dump`` builds its rows with this too, so a
    store and a stage given the same ``data`` block and seed hold the same rows."""
    if (d.prompt_field is not None or d.pack) and contexts and d.max_len > min(contexts):
        raise AttarError(f"data.max_len {d.max_len} is longer than the model's context of {min(contexts)}.")
    store, limits = Path(cache_dir) / "tokens", dict(train_limit=d.train_limit, val_limit=d.val_limit,
                                                     test_limit=d.test_limit)
    # every kind of row is tokenised once into a token store under the cache (attar.text.token_store/row_store); under
    # torchrun rank 0 builds it while the other ranks wait, then they reuse it (ranks building one folder at once would
    # race on its files)
    if not dist.is_main():
        dist.barrier()
    if d.prompt_field is not None:
        data = lm_pair_store_data(pair_stream(d.name, d.prompt_field, d.response_field), tok, store, d.max_len,
                                  d.chat_template, seed=seed, log=log, **limits)
    elif d.pack:
        data = lm_packed_data(d.name, tok, d.max_len, seed=seed, text_column=d.text_column, store=store, log=log,
                              **limits)
    else:
        data = lm_dataset(d.name, tok, min(contexts) if contexts else None, text_column=d.text_column,
                          prompt_len=d.prompt_len, max_len=d.max_len, seed=seed, store=store, log=log, **limits)
    if dist.is_main():
        dist.barrier()
    if log is not None:
        log(f"  token store {'built' if data.info['store_built'] else 'reused'}: {data.info['store']}")
    return data


def _settings(o: LMStageOptions, seed: int):
    """The stage's training settings: alpha 1 without a teacher, the recipe's seed unless the block sets one."""
    given = o.train.model_fields_set
    update: dict[str, Any] = {}
    if o.teacher is None:
        if "alpha" in given and o.train.alpha < 1:
            raise AttarError(f"train.alpha={o.train.alpha} mixes in a KD term, but the stage has no teacher; add "
                             "lm.teacher or drop train.alpha.")
        update["alpha"] = 1.0
    if o.responses == "teacher" and "alpha" not in given:
        update["alpha"] = 1.0  # the teacher's responses are the targets: plain CE on them
    if "seed" not in given:
        update["seed"] = seed
    return _config(o.train.model_copy(update=update), {})


def _open_store(path: str) -> None:
    """Preflight of ``teacher: {store: PATH}``: a finished store of a language model's outputs (the shards' hashes
    are checked when the stage runs)."""
    st = TeacherStore.open(path, verify=False).settings
    if st.kind != "lm":
        raise AttarError(f"lm.teacher.store: {path} holds a {st.kind}'s outputs, not a language model's.")


def _check_efficient(o: LMStageOptions, earlier: dict[str, EarlierStage]) -> None:
    """The efficient-training options (docs/efficient.md) where they cannot apply to this stage, refused by name."""
    t, compact = o.train, o.train.optimizer != "adamw" or o.train.optimizer_state is not None
    if o.optimizer == "mezo" and (compact or t.sparsity is not None):
        raise AttarError("train.optimizer / optimizer_state / sparsity shape backprop's AdamW step; optimizer: mezo "
                         "takes its own zeroth-order step (drop one of them).")
    if t.sparsity is not None and o.student.lora is not None:
        raise AttarError("train.sparsity (SPDF) masks the weights that train; with model.lora only the adapters "
                         "train (drop one of them).")
    if o.teacher is not None and o.teacher.parameterization is not None:
        raise AttarError("lm.teacher.parameterization: SLTrain shapes a model that trains; the teacher does not.")
    g = t.growth
    if g is None:
        return
    if isinstance(g, VCycleConfig):
        return _check_v_cycle(o, g)
    _check_fresh(o, "(G_stack) replaces the stage's model's weights with the grown ones",
                 "the grown weights are dense copies; SLTrain's factors have no source to copy from")
    if not earlier[g.from_].causal_lm:
        raise AttarError(f"train.growth.from: stage {g.from_!r} is not a causal-LM stage; G_stack grows an earlier "
                         "causal-LM stage's model.")
    src = (earlier[g.from_].spec or {}).get("byte")  # a byte model's shape, which preflight records (below)
    if src is not None and o.student.byte is not None:  # both byte models: shapes known before anything trains
        a, b = ({"layers": 4, "d_model": 128, "heads": 4, "context": 256} | m for m in (src, o.student.byte))
        if b["layers"] != g.factor * a["layers"] or any(a[k] != b[k] for k in ("d_model", "heads", "context")):
            raise AttarError(f"train.growth: stage {g.from_!r} has {a['layers']} layers, so factor {g.factor} makes "
                             f"{g.factor * a['layers']} of the same width; model.byte has {b} (byte model "
                             f"{a} grown must differ only in layers).")


def _check_fresh(o: LMStageOptions, what: str, why_dense: str) -> None:
    """train.growth needs a fresh, dense, whole model: refused otherwise, saying what the method does (``what``)."""
    if o.student.byte is None and o.student.hf is None or o.student.prune or o.student.lora:
        raise AttarError(f"train.growth {what}: give a fresh model (model: {{byte: {{...}}}}, or {{hf: FOLDER}} of an "
                         "untrained config) with no prune or lora.")
    if o.student.parameterization is not None:
        raise AttarError(f"train.growth with model.parameterization: {why_dense} (drop one of them).")


def _check_v_cycle(o: LMStageOptions, g: VCycleConfig) -> None:
    """train.growth v_cycle where it cannot apply, refused by name; a byte model's depth checked before any work."""
    _check_fresh(o, "(v_cycle) trains the stage's model through half-depth copies of it",
                 "coalescing averages dense blocks; SLTrain's factors and supports do not average")
    if o.train.sparsity is not None:
        raise AttarError("train.growth (v_cycle) with train.sparsity: SPDF's masks belong to one model, the cycle "
                         "trains several (drop one of them).")
    if o.student.byte is not None:
        check_depth(({"layers": 4} | dict(o.student.byte))["layers"], g.levels)  # make_byte_lm's default depth


def _v_cycle(student, cfg, train, data, ctx: StageContext, log):
    """train.growth v_cycle: the stage's model through the cycle, each phase one ``train`` run (its metrics' steps
    counted from the cycle's start); returns the last phase's result and the phases' records."""
    g = cfg.growth
    starts = [sum(g.steps[:i]) for i in range(len(g.steps) + 1)]

    def phase(model, ph, seed, ckpt_dir, resume):
        on = None if ctx.on_metrics is None else (
            lambda step, rec: ctx.on_metrics(starts[ph.index] + step, rec | {"vcycle_phase": float(ph.index)}))
        return train(model, steps=ph.steps, seed=seed, ckpt_dir=ckpt_dir, on_metrics=on)

    per_step = min(cfg.batch_size, len(data.train)) * cfg.accumulate * data.train.width
    return run_v_cycle(student, g, cfg.steps, cfg.seed, phase, ctx.stage_dir / "vcycle", ctx.stage_dir / "checkpoints",
                       resume=ctx.resume, log=log, tokens_per_step=per_step)


def _grow(student, g, earlier: dict[str, EarlierStage]):
    """train.growth: ``student`` (fresh, factor x deeper) loaded with the earlier stage's model stacked (G_stack)."""
    e = earlier[g.from_]
    source = e.model if e.model is not None else load_causal_lm(e.spec["hf"])[0]
    try:
        return g_stack(source, student, g.factor)
    except AttarError as err:
        raise AttarError(str(err).replace("the stage's model", "model")) from None


def _load(spec: LMModelSpec, role: str, earlier: dict[str, EarlierStage], seed: int = 0) -> tuple[Any, Any]:
    """The model and tokenizer of ``spec``; a fresh byte model is initialised from the stage's ``seed`` (so seeds
    differ in the initial weights too, not only in the data order)."""
    if spec.byte is not None:
        model = make_byte_lm(**spec.byte, seed=seed)
        if spec.parameterization is not None:  # the support is drawn from the seeded generator make_byte_lm set
            sl = spec.parameterization.sltrain
            apply_sltrain(model, sl.rank, sl.sparsity, sl.exclude)
        return model, byte_tokenizer()
    if spec.stage is not None:
        e = earlier[spec.stage]
        if not e.spec.get("hf"):
            raise AttarError(f"lm.{role}: stage {spec.stage!r} left no language-model folder.")
        return load_causal_lm(e.spec["hf"])
    return load_pretrained_lm({"pretrained": spec.pretrained} if spec.pretrained else {"hf": spec.hf})


def with_lora(model, spec: LMLoraSpec):
    """``model`` wrapped by PEFT with LoRA adapters on ``spec.targets`` (task CAUSAL_LM); the rest frozen."""
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                target_modules=spec.targets, task_type="CAUSAL_LM"))
    except ValueError as e:  # e.g. target modules that the model does not have
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise AttarError(f"lm.student.lora.targets: {e}. This model's linear layers are named {names}.") from None


def _teacher_responses(teacher, data, vmap, vocab: int | None, seed: int, stage_dir) -> LMSplit:
    """Each training prompt continued once by the teacher, kept in the stage folder (a resume reuses them)."""
    if vmap is not None and not vmap.identity:
        raise AttarError("responses: teacher needs teacher and student to share a tokenizer (the responses are the "
                         "teacher's token ids).")
    path = stage_dir / "teacher-responses.safetensors"
    if path.exists():
        t = load_file(str(path))
        return LMSplit(t["ids"], t["mask"].bool(), t["prompt_len"])
    gen = teacher_generations(teacher, data.train, data.pad_id, data.eos_id, 1.0, seed, vocab_size=vocab)
    atomic_save_safetensors({"ids": gen.ids.contiguous(), "mask": gen.mask.to(torch.uint8).contiguous(),
                             "prompt_len": gen.prompt_len.contiguous()}, path)
    return gen


def prune_student(model, spec: LMPruneSpec, ids: Tensor, pad_id: int) -> tuple[Any, dict[str, Any]]:
    """Depth first (whole layers), then width (channels and head groups of the layers that remain), each measured
    on the first ``calibration_rows`` training rows; the record says the shape before and after."""
    calib, info = ids[: spec.calibration_rows], {}
    n = len(decoder_layers(model))
    params = sum(p.numel() for p in model.parameters())
    if spec.layers is not None:
        model, depth = prune_depth(model, calib, pad_id, spec.layers)
        info |= depth
    if spec.mlp is not None or spec.kv_heads is not None:
        model, width = prune_width(model, calib, pad_id, spec.mlp, spec.kv_heads)
        info["width"] = width
    sizes = {"layers": f"{n}->{len(decoder_layers(model))}"}
    if "width" in info:
        w = info["width"]
        sizes |= {"mlp": f"{w['mlp_before']}->{w['mlp_after']}", "kv_heads": f"{w['kv_heads_before']}->{w['kv_heads_after']}"}
    after = sum(p.numel() for p in model.parameters())
    info["sizes"] = sizes
    info["shape"] = ", ".join(f"{k} {v}" for k, v in sizes.items()) + f" ({params / 1e6:.1f}M -> {after / 1e6:.1f}M parameters)"
    return model, info


def reshape_pruned(model, info: dict[str, Any]):
    """The pruned shape from a stage's ``prune.json`` (resume: the checkpoint then loads the weights)."""
    if info.get("dropped"):
        model = drop_layers(model, info["dropped"])
    if "width" in info:
        model = shrink_width(model, info["width"]["kept"])
    return model


@torch.no_grad()
def scored_logits(model, split: LMSplit, pad_id: int, batch_size: int = 4, dtype: torch.dtype | None = None) -> list[Tensor]:
    """``model``'s logits at the scored (response) positions of ``split``, one tensor per batch of ``batch_size`` rows.

    Why a list: a teacher's test logits can be computed once (in bfloat16, say) and compared with many students.
    """
    model.eval()
    out = []
    for i in range(0, len(split), batch_size):
        part = split.slice(i, i + batch_size)
        ids, mask = trim_padding(part.ids, part.mask, pad_id)
        rows, head = head_split(model).at(ids, (ids != pad_id).long(), scored(mask))
        z = head(rows)
        out.append(z if dtype is None else z.to(dtype))
    return out


@torch.no_grad()
def agreement(teacher, student, split: LMSplit, pad_id: int, vocab: int | None, batch_size: int = 4) -> dict[str, float]:
    """Mean KL(teacher‖student) per response token and how often the two models' top-1 next tokens agree.

    ``teacher``: a model, or its :func:`scored_logits` on the same split and ``batch_size``.
    """
    kl, agree, n = 0.0, 0, 0
    student.eval()
    teacher_logits = teacher if isinstance(teacher, list) else None
    for b, i in enumerate(range(0, len(split), batch_size)):
        part = split.slice(i, i + batch_size)
        ids, mask = trim_padding(part.ids, part.mask, pad_id)
        pos, attn = scored(mask), (ids != pad_id).long()
        rows, head = head_split(student).at(ids, attn, pos)
        zs = head(rows)
        if teacher_logits is None:
            teacher.eval()
            rows, head = head_split(teacher).at(ids, attn, pos)
            zt = head(rows)
        else:
            zt = teacher_logits[b].to(zs.device)
        if vocab:
            zt, zs = zt[:, :vocab], zs[:, :vocab]
        lt, ls = torch.log_softmax(zt.float(), -1), torch.log_softmax(zs.float(), -1)
        kl += float((lt.exp() * (lt - ls)).sum())
        agree += int((zt.argmax(-1) == zs.argmax(-1)).sum())
        n += len(zt)
    return {"kl_to_teacher": kl / max(1, n), "top1_agreement": agree / max(1, n)}

