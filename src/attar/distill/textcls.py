"""Sequence-classification KD: a fine-tuned Hugging Face text classifier into a much smaller student.

The teacher is any ``model(ids [B, L]) -> logits [B, C]`` (typically an
:class:`~attar.text.hf.HFClassifier`, e.g. all-MiniLM-L6-v2 fine-tuned with :func:`attar.adapt.finetune`).
The student reads **the teacher's token ids** (it shares the teacher's tokenizer), so one tokenised
data set serves both and the teacher's outputs can be cached:

* :class:`BagOfEmbeddings` — mean of learned token embeddings over the non-pad tokens, then a small
  MLP; ``vocab × dim`` parameters (64-dim over MiniLM's 30,522 tokens: ~2M, a tenth of MiniLM).
* :func:`tiny_transformer_student` — a fresh 2-layer BERT (hidden 64) with the teacher's tokenizer,
  wrapped as an ``HFClassifier`` (saved with :func:`attar.text.hf.save_hf_classifier`).

:func:`distill_classifier` trains the student with attar's own :class:`~attar.train.trainer.Trainer`
and a registered objective (``kd`` with any divergence, ``ce`` for the baseline) — the batches are
plain ``(ids, label)`` rows, exactly what the Trainer handles. The teacher runs once over the
training rows (:class:`~attar.distill.teacher_cache.TeacherCache`, optionally saved to ``cache_path``);
``transfer`` adds unlabeled rows (label ``-1``) that only the teacher labels (label-free KD on a pool).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attar.distill.lm_objectives import check_vocab
from attar.distill.objectives import build_objective
from attar.distill.teacher_cache import TeacherCache
from attar.errors import AttarError
from attar.metrics import classification_metrics
from attar.text.hf import HFClassifier, _quiet_transformers
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer, predict

__all__ = ["BagOfEmbeddings", "tiny_transformer_student", "distill_classifier", "teacher_accuracy"]


class BagOfEmbeddings(nn.Module):
    """``ids [B, L] -> logits [B, C]``: masked mean of token embeddings -> Linear-GELU -> Linear."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64, pad_id: int = 0, tokenizer: Any = None,
                 classes: list[str] | None = None):
        super().__init__()
        self.vocab_size, self.num_classes, self.pad_id = int(vocab_size), int(num_classes), int(pad_id)
        self.tokenizer = tokenizer  # plain attribute, not a submodule
        self.classes = list(classes or [str(i) for i in range(num_classes)])
        self.emb = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.long:
            raise AttarError(f"BagOfEmbeddings takes int64 token ids [B, L], got {ids.dtype}.")
        m = (ids != self.pad_id).unsqueeze(-1).float()
        e = self.emb(ids.clamp(0, self.vocab_size - 1))
        pooled = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.mlp(pooled)

    @classmethod
    def for_teacher(cls, teacher: Any, dim: int = 64, seed: int = 0) -> "BagOfEmbeddings":
        """A student over the teacher's tokenizer and classes (``teacher`` an HFClassifier)."""
        tok = getattr(teacher, "tokenizer", None)
        if tok is None:
            raise AttarError("BagOfEmbeddings.for_teacher: the teacher carries no tokenizer; build the student directly.")
        torch.manual_seed(seed)
        return cls(len(tok), teacher.num_classes, dim, teacher.pad_id, tok, list(teacher.classes))


def tiny_transformer_student(teacher: Any, layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
                             max_positions: int = 512, seed: int = 0) -> Any:
    """A fresh small BERT classifier (``layers`` x ``hidden``) using the teacher's tokenizer and classes."""
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    tok = getattr(teacher, "tokenizer", None)
    if tok is None:
        raise AttarError("tiny_transformer_student: the teacher carries no tokenizer (an HFClassifier does).")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions, pad_token_id=teacher.pad_id,
                     num_labels=teacher.num_classes, id2label=dict(enumerate(teacher.classes)),
                     label2id={c: i for i, c in enumerate(teacher.classes)})
    torch.manual_seed(seed)
    return HFClassifier(BertForSequenceClassification(cfg), teacher.pad_id, list(teacher.classes), tok,
                        source=f"tiny-bert-{layers}x{hidden}")


def _vocab_size(m: nn.Module) -> int | None:
    if hasattr(m, "vocab_size"):
        return int(m.vocab_size)
    hf = getattr(m, "hf", None)
    if hf is not None and hasattr(hf, "get_input_embeddings"):
        return int(hf.get_input_embeddings().weight.shape[0])
    return None


def _pad_to(x: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x
    return torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), pad, dtype=x.dtype)], 1)


def distill_classifier(teacher: nn.Module, student: nn.Module, data: Any, *, transfer: torch.Tensor | None = None,
                       objective: dict[str, Any] | None = None, train: dict[str, Any] | Any = None, seed: int = 0,
                       cache_path: str | Path | None = None, eval_batch_size: int = 64) -> dict[str, Any]:
    """Train ``student`` on ``data`` (a :class:`~attar.text.data.TextBundle` tokenised with the teacher's
    tokenizer) with ``objective`` (default ``{"name": "kd", "alpha": 0.5, "temperature": 2}``).

    Returns ``{"model", "test_accuracy", "test_nll", "history", "teacher_mode", "train_rows", "labeled_rows"}``.
    Refuses a student whose tokenizer (or embedding table) does not match the teacher's."""
    t_tok, s_tok = getattr(teacher, "tokenizer", None), getattr(student, "tokenizer", None)
    check_vocab(len(t_tok) if t_tok is not None else None, _vocab_size(student), t_tok, s_tok)
    pad = data.pad_id
    if getattr(student, "pad_id", pad) != pad or getattr(teacher, "pad_id", pad) != pad:
        raise AttarError(f"the data pads with id {pad} but the teacher/student pad with "
                         f"{getattr(teacher, 'pad_id', None)}/{getattr(student, 'pad_id', None)}.")
    obj = build_objective(objective or {"name": "kd", "alpha": 0.5, "temperature": 2.0})
    cfg = train if isinstance(train, TrainConfig) else TrainConfig(**({"epochs": 5, "batch_size": 32, "lr": 3e-3,
                                                                       "weight_decay": 0.0} | dict(train or {})))
    x, y = data.train.ids, data.train.y
    if transfer is not None and len(transfer):
        w = max(x.shape[1], transfer.shape[1])
        x = torch.cat([_pad_to(x, w, pad), _pad_to(transfer, w, pad)])
        y = torch.cat([y, torch.full((len(transfer),), -1, dtype=torch.long)])
    cache = None
    if obj.needs_teacher:
        if cache_path is not None:
            cache, _ = TeacherCache.load_or_build(cache_path, [teacher], x, batch_size=eval_batch_size,
                                                  temperature=getattr(obj.p, "temperature", 1.0))
        else:
            cache = TeacherCache.build([teacher], x, batch_size=eval_batch_size,
                                       temperature=getattr(obj.p, "temperature", 1.0))
    elif transfer is not None and len(transfer):
        raise AttarError("distill_classifier: unlabeled transfer rows need a teacher objective (kd); 'ce' ignores them.")
    val = (data.val.ids, data.val.y) if len(data.val) else None
    tr = Trainer(student, obj, x, y, cfg, seed=seed, val=val, teacher_cache=cache, name="distill-text",
                 num_classes=data.num_classes)
    res = tr.fit()
    student.eval()
    m = classification_metrics(predict(student, data.test.ids, eval_batch_size), data.test.y)
    out = {"model": res.model, "test_accuracy": m["accuracy"], "test_nll": m["nll"], "history": res.history,
           "teacher_mode": res.teacher_mode, "train_rows": int(len(x)), "labeled_rows": int((y >= 0).sum())}
    return out


def teacher_accuracy(teacher: nn.Module, data: Any, batch_size: int = 64) -> float:
    """The teacher's test accuracy on ``data.test`` (for tables beside the student)."""
    return classification_metrics(predict(teacher, data.test.ids, batch_size), data.test.y)["accuracy"]
