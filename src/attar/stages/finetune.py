"""``finetune`` stage: adapt a Hugging Face text classifier (LoRA family, SSF, masks, MeZO) on text data.

The stage's options are a :class:`attar.adapt.api.FinetuneSpec`; it scores itself on the text
data's test split and writes ``<run>/<stage>/model`` (a Hugging Face folder, adapters merged) and,
for LoRA, ``<run>/<stage>/adapter`` (PEFT format)::

    - name: lora
      kind: finetune
      finetune: {model: minilm, data: {name: tweets}, adapter: {name: lora, rank: 8}, train: {epochs: 2}}
"""

from __future__ import annotations

from attar.adapt.api import FinetuneSpec, check_finetune, finetune_spec
from attar.stages.base import STAGES, StageContext, StageInputs, StageKind, StageResult


@STAGES.register("finetune")
class FinetuneStage(StageKind):
    needs_data = False

    @classmethod
    def options_model(cls):
        return FinetuneSpec

    def preflight(self, inputs: StageInputs):
        with inputs.context():  # the adapter / data / model checks: say which stage
            check_finetune(inputs.options)
        return None

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        r = finetune_spec(inputs.options, out_dir=ctx.stage_dir, resume=ctx.resume, on_metrics=ctx.on_metrics)
        m = r.metrics
        metrics = {"accuracy": m["test_accuracy"], "nll": m.get("test_nll"), "params": m.get("total_params"),
                   "trainable": m.get("trainable_params"), "train_s": round(float(m.get("train_seconds", 0.0)), 1)}
        arts = {"model": ctx.stage_dir / "model"}
        if m.get("adapter_dir"):
            arts["adapter"] = ctx.stage_dir / "adapter"
        return StageResult(r.model, {"hf": str(ctx.stage_dir / "model")}, r.history, metrics=metrics, artifacts=arts)
