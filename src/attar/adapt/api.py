"""``finetune``: text data -> Hugging Face classifier -> adapter -> training -> saved model (and PEFT adapter).

Everything that can be wrong with the request (adapter fields, target patterns, text and label
columns, training settings) is checked before any training step runs. Output folder::

    out_dir/model/        the fine-tuned model, adapters merged: a plain Hugging Face folder
    out_dir/adapter/      LoRA only: the PEFT adapter (adapter_config.json + adapter_model.safetensors)
    out_dir/checkpoints/  training checkpoints (resume with resume=True)
    out_dir/metrics.json  accuracy, parameters, time, adapter facts; out_dir/history.json the learning curve
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attar.adapt.base import (
    Adapter,
    Calibration,
    build_adapter,
    count_params,
    merge_adapters,
)
from attar.adapt.lora import lora_modules
from attar.adapt.mezo import MeZOConfig, mezo_fit
from attar.distill.objectives import build_objective
from attar.errors import AttarError
from attar.metrics import classification_metrics
from attar.registry import validation_error
from attar.select import build_selector, check_selector
from attar.text.data import TextBundle, TextSpec, load_text, text_spec
from attar.text.hf import (
    HFClassifier,
    load_hf_classifier,
    load_tokenizer,
    resolve_model_path,
    save_hf_classifier,
)
from attar.train.config import FINETUNE_TRAIN, TrainConfig
from attar.train.trainer import Trainer, predict

DEFAULT_TRAIN = FINETUNE_TRAIN


class FinetuneSpec(BaseModel):
    """Everything ``finetune`` needs, as plain data (a recipe stage or a YAML file can hold it)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="a local Hugging Face folder or an alias (minilm)")
    data: TextSpec
    adapter: dict[str, Any] | str = "lora"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**DEFAULT_TRAIN))
    optimizer: Literal["backprop", "mezo"] = "backprop"
    mezo: MeZOConfig = Field(default_factory=MeZOConfig)
    objective: dict[str, Any] = Field(default_factory=lambda: {"name": "ce"})
    selector: dict[str, Any] | None = Field(None, description="data selection, e.g. {name: rs2, keep: 0.3} (docs/select.md)")
    seed: int = 0
    new_head: bool = Field(False, description="replace a saved classification head with a fresh one")


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # adapters merged, eval mode
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    out_dir: Path | None = None
    adapter_info: dict[str, Any] = field(default_factory=dict)


def _train_config(train: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    if isinstance(train, TrainConfig):
        return train
    try:
        return TrainConfig(**(DEFAULT_TRAIN | dict(train or {})))
    except ValidationError as e:
        raise validation_error("Invalid training settings", e, TrainConfig) from None


def _finetune_spec(spec: FinetuneSpec | dict[str, Any]) -> FinetuneSpec:
    if isinstance(spec, FinetuneSpec):
        return spec
    try:
        return FinetuneSpec.model_validate(spec)
    except ValidationError as e:
        raise validation_error("Invalid finetune spec", e, FinetuneSpec) from None


def finetune(
    model: Any,
    data: TextSpec | TextBundle | dict[str, Any] | str,
    adapter: Adapter | dict[str, Any] | str = "lora",
    train: TrainConfig | dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    optimizer: str = "backprop",
    mezo: MeZOConfig | dict[str, Any] | None = None,
    objective: dict[str, Any] | None = None,
    new_head: bool = False,
    export_peft: bool = True,
    resume: bool = False,
    on_metrics=None,
    eval_batch_size: int | None = None,
    selector: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (folder, alias such as ``"minilm"``, or a loaded HFClassifier) on text ``data``.

    ``adapter`` is a registered adapter (``attar.adapt.ADAPTERS``: full, head, lora, ssf, hft, lift,
    magnitude) by name or mapping; ``optimizer="mezo"`` trains the adapter's trainable parameters
    with MeZO instead of backprop. The test split is scored at ``eval_batch_size`` (default: the
    training batch size, so evaluation never needs more memory than training). ``selector`` picks the
    training rows as in a recipe stage (``{name: rs2, keep: 0.3}``, docs/select.md; backprop only); its
    accounting is ``metrics["selection"]``. Returns the merged model and its metrics.
    """
    # -- everything checkable before loading weights
    ad = build_adapter(adapter)
    cfg = _train_config(train)
    if getattr(cfg, "optimizer", None) == "mezo":  # a TrainConfig that names MeZO itself
        optimizer = "mezo"
        if mezo is None and getattr(cfg, "mezo_eps", None):
            mezo = {"eps": cfg.mezo_eps}
    if optimizer not in ("backprop", "mezo"):
        raise AttarError(f"optimizer must be 'backprop' or 'mezo', got {optimizer!r}")
    mezo_cfg = mezo if isinstance(mezo, MeZOConfig) else MeZOConfig(**(mezo or {}))
    obj = build_objective(objective or {"name": "ce"})
    if obj.needs_teacher:
        raise AttarError("finetune takes teacher-free objectives (ce); distillation into a text model is a distill stage.")
    sel = _selector(selector, optimizer)
    tok = model.tokenizer if isinstance(model, HFClassifier) else load_tokenizer(model)
    bundle = data if isinstance(data, TextBundle) else load_text(text_spec(data), tok)
    _check_selector(sel, obj, bundle)
    if isinstance(model, HFClassifier):
        net = model
        if net.classes != bundle.classes:
            raise AttarError(f"the model predicts classes {net.classes} but the data has {bundle.classes}.")
    else:
        net = load_hf_classifier(model, classes=bundle.classes, seed=seed, new_head=new_head)
    if net.pad_id != bundle.pad_id:
        raise AttarError(f"the data was tokenised with pad id {bundle.pad_id} but the model's tokenizer pads with {net.pad_id}; "
                         "tokenise the data with the model's own tokenizer.")

    # -- adapt
    calib = None
    if ad.needs_calibration:
        calib = Calibration.from_data(net, bundle.train.ids, bundle.train.y, ad.p.calib_batches, ad.p.calib_batch_size, seed)
    t0 = time.perf_counter()
    info = ad.apply(net, calib, seed=seed)
    info["apply_seconds"] = time.perf_counter() - t0
    trainable, total = count_params(net)
    if trainable == 0:
        raise AttarError(f"adapter {ad.name!r} left no trainable parameter; check its targets and train_head.")

    # -- train
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoints" if out is not None else None
    val = (bundle.val.ids, bundle.val.y) if len(bundle.val) else None
    t0 = time.perf_counter()
    if optimizer == "mezo":
        res = mezo_fit(net, obj, bundle.train.ids, bundle.train.y, cfg, mezo_cfg, seed=seed, val=val, ckpt_dir=ckpt,
                       on_metrics=on_metrics, resume=resume, num_classes=bundle.num_classes)
    else:
        tr = Trainer(net, obj, bundle.train.ids, bundle.train.y, cfg, seed=seed, val=val, ckpt_dir=ckpt,
                     on_metrics=on_metrics, name="finetune", num_classes=bundle.num_classes, selector=sel)
        res = tr.fit(resume=resume)
    train_seconds = time.perf_counter() - t0

    # -- evaluate the adapted model, then merge and check the merge changed nothing
    net.eval()
    logits = predict(net, bundle.test.ids, batch_size=eval_batch_size or cfg.batch_size)
    m = classification_metrics(logits, bundle.test.y)
    adapter_dir = None
    if out is not None and export_peft and lora_modules(net):
        from attar.adapt.peft_format import export_peft as _export

        adapter_dir = _export(net, out / "adapter")
    probe = bundle.test.ids[:16]
    before = predict(net, probe) if len(probe) else None
    merge_adapters(net)
    if before is not None:
        gap = float((predict(net, probe) - before).abs().max())
        if gap > 1e-3:
            raise AttarError(f"merging the adapter changed the outputs by {gap:.2e}; this is a bug, please report it.")
    metrics = {
        "test_accuracy": m["accuracy"], "test_nll": m["nll"],
        "val_accuracy": next((h["val_accuracy"] for h in reversed(res.history) if "val_accuracy" in h), None),
        "trainable_params": trainable, "total_params": total, "train_seconds": train_seconds,
        "examples_per_s": res.samples_seen / max(train_seconds, 1e-9), "steps": res.steps,
        "adapter": ad.config(), "optimizer": optimizer, "seed": seed, "classes": bundle.classes,
        "data": bundle.info.get("sizes"), "model_source": getattr(net, "source", None),
        "samples_seen": res.samples_seen,
    }
    if sel is not None:
        metrics["selector"] = sel.spec()
        metrics["selection"] = dict(res.selection)
    if out is not None:
        save_hf_classifier(net, out / "model", extra={"metrics": {k: metrics[k] for k in ("test_accuracy", "val_accuracy")}})
        (out / "metrics.json").write_text(json.dumps(metrics | {"adapter_info": _jsonable(info)}, indent=2, default=str))
        (out / "history.json").write_text(json.dumps(res.history, indent=2))
        if adapter_dir is not None:
            metrics["adapter_dir"] = str(adapter_dir)
    return FinetuneResult(model=net, metrics=metrics, history=res.history, out_dir=out, adapter_info=info)


def _selector(spec: dict[str, Any] | None, optimizer: str):
    try:
        sel = build_selector(spec)
    except AttarError as e:
        raise AttarError(f"selector: {e}") from None
    if sel is not None and optimizer != "backprop":
        raise AttarError(f"selector: {sel.name!r} needs optimizer backprop; MeZO draws its own batches.")
    return sel


def _check_selector(sel, objective, bundle: TextBundle) -> None:
    check_selector(sel, objective=objective, input_shape=tuple(bundle.train.ids.shape[1:]), labels=bundle.train.y,
                   where="selector")


def check_finetune(spec: FinetuneSpec | dict[str, Any]) -> FinetuneSpec:
    """Validate a finetune request without training or loading weights (for a pipeline's preflight).

    Checks the adapter's fields, the training settings, the data (read and tokenised, so a missing or
    empty text column fails here), the model folder, and the adapter's target patterns against the
    model's module names (the model is built on the meta device: no weights are read).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = _finetune_spec(spec)
    ad = build_adapter(spec.adapter)
    obj = build_objective(spec.objective)
    sel = _selector(spec.selector, spec.optimizer)
    path = resolve_model_path(spec.model)
    bundle = load_text(spec.data, load_tokenizer(path))
    _check_selector(sel, obj, bundle)
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, num_labels=bundle.num_classes)
    with torch.device("meta"):
        hf = AutoModelForSequenceClassification.from_config(cfg)
    ad.check(HFClassifier(hf, bundle.pad_id, bundle.classes))
    return spec


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


def finetune_spec(spec: FinetuneSpec | dict[str, Any], out_dir: str | Path | None = None, **kw: Any) -> FinetuneResult:
    """Run a :class:`FinetuneSpec` (e.g. a recipe stage's fields)."""
    spec = _finetune_spec(spec)
    return finetune(spec.model, spec.data, spec.adapter, spec.train, out_dir, seed=spec.seed, optimizer=spec.optimizer,
                    mezo=spec.mezo, objective=spec.objective, new_head=spec.new_head, selector=spec.selector, **kw)
