"""``merge`` stage of causal language models: merge earlier causal-LM stages' models (their Hugging Face folders).

A recipe's ``merge`` stage runs here when the stages it merges are causal-LM stages (or its base is an LM spec)::

    - name: merged
      kind: merge
      merge: {method: ties, base: {pretrained: smollm2-135m}, models: [ft_brown, ft_austen, ft_sotu],
              parameters: {density: 0.5}}

``base`` is an earlier stage's name or an LM spec (``{pretrained}``, ``{hf}``, ``{stage}``). Every data-free
method works as for any model; RegMean takes each linear layer's input Gram over each fine-tune's own training
text, greedy soup / WiSE-FT / LCSC score candidates by the mean validation perplexity over the merged stages'
texts (:mod:`attar.merge.lm`). Each merged stage's text is read as that stage read it (its ``data`` block and
seed), so the splits are the same. The stage writes ``<run>/<stage>/model`` (a Hugging Face folder with the
tokenizer, usable as ``{stage: merged}`` by later LM stages) and reports the merged model's perplexity on each
merged stage's test text (``test_ppl[ft_brown]``), the rise over that stage's own model there
(``ppl_rise[ft_brown]``), and the mean (``test_ppl``). When every merged stage left a LoRA adapter and the
method is linear in the deltas (linear, task_arithmetic), it also writes ``<run>/<stage>/adapter``: one PEFT
adapter, the rank-concatenation of the adapters (:mod:`attar.merge.lora_merge`), checked against the merged
model before it is kept.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from attar.distill.lm_config import LMModelSpec
from attar.errors import AttarError
from attar.io import atomic_write_json, staged_folder
from attar.merge.lm import check_lm_method, domain_perplexity, merge_lms
from attar.merge.lora_merge import lora_delta, merge_lora_adapters, read_adapter
from attar.merge.methods import MERGE_METHODS
from attar.stages.base import StageContext, StageInputs, StageKind, StageResult
from attar.stages.lm import stage_data
from attar.stages.merge import check_merge_numbers
from attar.text.charlm import load_causal_lm, save_causal_lm
from attar.text.lm_io import lm_context, scored_vocab
from attar.text.pretrained_lm import get_pretrained, load_pretrained_lm
from attar.text.token_store import tokenizer_fingerprint
from attar.train import distributed as dist


class LMMergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(..., description="linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, regmean, "
                                         "greedy_soup, wise_ft, lcsc, ... (attar methods)")
    models: list[str] = Field(..., min_length=1, description="earlier causal-LM stages whose models are merged")
    base: str | LMModelSpec | None = Field(None, description="the pretrained model the fine-tunes started from: an "
                                                             "earlier stage, or {pretrained: NAME} / {hf: DIR}")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's shared parameters")
    model_parameters: list[dict[str, Any] | None] | None = Field(None, description="per-model parameters (weight, density)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(MERGE_METHODS.names())}")
        try:
            check_lm_method(v)
        except AttarError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _shape(self) -> "LMMergeOptions":
        if isinstance(self.base, LMModelSpec) and (self.base.byte or self.base.store or self.base.url or
                                                  self.base.prune or self.base.lora):
            raise ValueError("merge.base: give a trained model, {pretrained: NAME}, {hf: DIR} or {stage: NAME}")
        if self.model_parameters is not None and len(self.model_parameters) != len(self.models):
            raise ValueError(f"merge.model_parameters has {len(self.model_parameters)} entries for {len(self.models)} "
                             "models; give one per model")
        if MERGE_METHODS.get(self.method).base == "required" and self.base is None:
            raise ValueError(f"merge method {self.method!r} needs merge.base: the model the fine-tunes started from, "
                             "e.g. base: {pretrained: smollm2-135m}")
        return self

    def base_stage(self) -> str | None:
        if isinstance(self.base, str):
            return self.base
        return self.base.stage if self.base is not None else None


class LMMergeStage(StageKind):
    """Merge earlier causal-LM stages' models (the ``merge`` kind when its models are language models)."""

    Options = LMMergeOptions
    needs_data = False  # each merged stage's own text is read
    causal_lm: ClassVar[bool] = True  # later LM stages take its model with {stage: NAME}

    @classmethod
    def check(cls, st) -> None:
        check_merge_numbers(st.options)

    @classmethod
    def references(cls, st) -> list[str]:
        o = st.options
        return list(o.models) + ([o.base_stage()] if o.base_stage() else [])

    def preflight(self, inputs: StageInputs):
        o = inputs.options
        with inputs.context("merge"):
            for n in o.models + ([o.base_stage()] if o.base_stage() else []):
                if not inputs.earlier[n].causal_lm:
                    raise AttarError(f"stage {n!r} is a {inputs.earlier[n].kind} stage of an image or table model; a "
                                     f"merge of language models merges causal-LM stages only (merge image models in "
                                     "a merge stage of their own).")
                if inputs.earlier[n].kind == "merge" and n in o.models:
                    raise AttarError(f"stage {n!r} is itself a merge, which read no text of its own; list the stages "
                                     "it merged here instead (one merge of all the fine-tunes).")
            if isinstance(o.base, LMModelSpec) and o.base.pretrained:
                get_pretrained(o.base.pretrained, field="merge.base.pretrained")
        return None

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        o: LMMergeOptions = inputs.options
        out, metrics_file = ctx.stage_dir / "model", ctx.stage_dir / "lm-metrics.json"
        if ctx.resume and (out / "config.json").exists() and metrics_file.exists():
            model, _ = load_causal_lm(out)
            inputs.log(f"  finished earlier: loaded {out}")
            saved = json.loads(metrics_file.read_text())
            arts = {"model": out} | ({"adapter": ctx.stage_dir / "adapter"} if (ctx.stage_dir / "adapter").exists() else {})
            return StageResult(model, {"hf": str(out)}, metrics=saved["metrics"], artifacts=arts)
        with inputs.context("merge"):
            loaded = {n: load_causal_lm(_folder(inputs, n)) for n in o.models}
            base, base_label = self._base(inputs)
            tok = loaded[o.models[0]][1]
            prints = {n: tokenizer_fingerprint(t) for n, (_, t) in loaded.items()}
            if len(set(prints.values())) > 1:
                raise AttarError(f"the merged stages use different tokenizers ({', '.join(prints)}): token ids mean "
                                 "different strings, so their rows cannot be averaged here; merge their folders with "
                                 "`attar merge` and tokenizer_source: union (docs/merge.md).")
            models = [loaded[n][0] for n in o.models]
            data = {n: self._text(inputs, n, tok, models[0]) for n in o.models}
            pad = data[o.models[0]].pad_id
            vocab = scored_vocab(models[0], tok)
            merged, info = merge_lms(o.method, models, base=base, parameters=o.parameters,
                                     model_parameters=o.model_parameters, train=[data[n].train for n in o.models],
                                     val={n: d.val for n, d in data.items() if len(d.val)}, pad_id=pad,
                                     vocab_size=vocab, seed=inputs.seed, labels=[f"stage {n!r}" for n in o.models],
                                     base_label=base_label)
            tests = {n: d.test for n, d in data.items()}
            mine = domain_perplexity(merged, tests, pad, vocab)
            theirs = {n: _own_ppl(ctx, inputs, n) or domain_perplexity(m, {n: tests[n]}, pad, vocab)[n]
                      for n, m in zip(o.models, models)}
        metrics: dict[str, Any] = {"test_ppl": sum(mine.values()) / len(mine)}
        metrics |= {f"test_ppl[{n}]": v for n, v in mine.items()}
        metrics |= {f"ppl_rise[{n}]": mine[n] - theirs[n] for n in mine}
        extra: dict[str, Any] = {"merge": o.method, "inputs": ", ".join(o.models)}
        if "ingredients" in info:
            extra["kept"] = ", ".join(o.models[i] for i in info["ingredients"])
        if "alpha" in info and o.method == "wise_ft":
            extra["alpha"] = info["alpha"]
        inputs.log("  test perplexity " + ", ".join(f"{n} {v:.2f} ({mine[n] - theirs[n]:+.2f})" for n, v in mine.items()))
        arts = {"model": out}
        if dist.is_main():
            with staged_folder(out) as tmp:
                save_causal_lm(merged, tok, tmp)
            adapter = self._adapter(inputs, ctx, merged, models)
            if adapter is not None:
                arts["adapter"] = adapter
            atomic_write_json(metrics_file, {"metrics": metrics | extra, "history": []})
        return StageResult(merged, {"hf": str(out)}, metrics=metrics, extra=extra, artifacts=arts)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _base(inputs: StageInputs) -> tuple[Any, str]:
        o = inputs.options
        if o.base is None:
            return None, "the base"
        if o.base_stage():
            return load_causal_lm(_folder(inputs, o.base_stage()))[0], f"stage {o.base_stage()!r}"
        spec = {"pretrained": o.base.pretrained} if o.base.pretrained else {"hf": o.base.hf}
        return load_pretrained_lm(spec)[0], f"base {spec}"

    @staticmethod
    def _text(inputs: StageInputs, name: str, tok, model):
        """Stage ``name``'s text, tokenised and split as that stage did (its data block, its seed)."""
        spec, seed = inputs.data_of(name)
        ctx = lm_context(model)
        return stage_data(spec, tok, [ctx] if ctx else [], seed, inputs.cache_dir)

    @staticmethod
    def _adapter(inputs: StageInputs, ctx: StageContext, merged, models) -> Any:
        """The merged LoRA adapter, when every merged stage left one and the method is linear in the deltas."""
        o = inputs.options
        folders = [ctx.run_dir / n / "adapter" for n in o.models]
        if not all((f / "adapter_config.json").is_file() for f in folders):
            return None
        coeffs = _coefficients(o)
        if coeffs is None:
            inputs.log(f"  adapters: {o.method} is not linear in the LoRA deltas, so no merged adapter (the merged "
                       "model is the result)")
            return None
        dest = ctx.stage_dir / "adapter"
        merge_lora_adapters(folders, coeffs, dest, labels=[f"stage {n!r} adapter" for n in o.models])
        gap = adapter_gap(merged, models, folders, dest)
        if gap > 1e-4:
            import shutil

            shutil.rmtree(dest)
            inputs.log(f"  adapters: the concatenated adapter differs from the merged model by {gap:.2e} (relative); "
                       "the base is not the adapters' base, so no merged adapter")
            return None
        inputs.log(f"  adapter: rank-concatenated PEFT adapter -> {dest} (matches the merged model, gap {gap:.1e})")
        return dest


def _folder(inputs: StageInputs, name: str) -> str:
    e = inputs.earlier[name]
    if not e.spec.get("hf"):
        raise AttarError(f"stage {name!r} left no language-model folder.")
    return e.spec["hf"]


def _own_ppl(ctx: StageContext, inputs: StageInputs, name: str) -> float | None:
    """The test perplexity a training stage reported for its own model (the same split: its data, its seed), so
    it is not computed again; None for other stages (a merge's ``test_ppl`` is a mean over domains)."""
    f = ctx.run_dir / name / "lm-metrics.json"
    if inputs.earlier[name].kind == "merge" or not f.is_file():
        return None
    return json.loads(f.read_text())["metrics"].get("test_ppl")


def _coefficients(o: LMMergeOptions) -> list[float] | None:
    """``c_i`` with merged = base + Σ c_i Δ_i, for the methods where that holds (else None)."""
    if o.method not in ("linear", "task_arithmetic"):
        return None
    opts = MERGE_METHODS.parse(o.method, dict(o.parameters)).model_dump(by_alias=True)
    w = [(mp or {}).get("weight", o.parameters.get("weight", 1.0)) for mp in (o.model_parameters or [None] * len(o.models))]
    if not all(isinstance(v, (int, float)) for v in w):
        return None  # per-layer weight gradients have no single coefficient
    total = sum(w)
    if o.method == "linear":
        return [v / total for v in w] if opts.get("normalize", True) else [float(v) for v in w]
    lam = float(opts.get("lambda", 1.0))
    return [lam * v / (total if opts.get("normalize") else 1.0) for v in w]


@torch.no_grad()
def adapter_gap(merged, models, folders, merged_adapter) -> float:
    """Largest relative difference, over the adapted layers, between the merged model's weight and
    base + the merged adapter's delta. The base is recovered from a source: its (merged-in) weight minus its own
    adapter's delta, so a merge whose ``base`` is not the adapters' base shows up here."""
    _, mods, scales = read_adapter(merged_adapter, "merged adapter")
    sources = [(dict(m.named_parameters()), read_adapter(f, str(f))) for m, f in zip(models, folders)]
    params = dict(merged.named_parameters())
    worst = 0.0
    for module, f in mods.items():
        key = module + ".weight"
        if key not in params:
            raise AttarError(f"the merged adapter names {module!r}, which the merged model does not have.")
        own, (_, smods, sscales) = next((p, a) for p, a in sources if module in a[1])
        orient = (lambda d: d.T) if f["template"].startswith(".lora_embedding") else (lambda d: d)
        base = own[key].double() - orient(lora_delta(smods[module], sscales[module]))
        w = params[key].double()
        gap = (w - base - orient(lora_delta(f, scales[module]))).abs().max() / w.abs().max().clamp_min(1e-12)
        worst = max(worst, float(gap))
    return worst
