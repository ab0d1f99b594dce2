"""A tiny random BERT folder (model + word-piece tokenizer) for tests and examples; builds in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

from attar.checkpoint import apply_umask
from attar.text.hf import _quiet_transformers

_WORDS = (
    "the a an and or but not no yes i you he she it we they is are was be have has do does car cars drive driving "
    "self driverless autonomous google tesla safe unsafe love hate good bad great terrible never always trust "
    "future road people will would can could like want think new today time way make see know go come get"
).split()


def make_tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                   seed: int = 0, num_labels: int | None = None, init_range: float = 0.2) -> Path:
    """Write a random ``BertModel`` (or ``BertForSequenceClassification`` when ``num_labels``) + tokenizer to ``folder``.

    ``init_range`` (std of the initial weights) is larger than BERT's 0.02 so that a tiny model learns in a few steps.
    """
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    _quiet_transformers()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "#", "'"] + _WORDS
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = list(dict.fromkeys(vocab))
    try:  # transformers 5: the (fast) BertTokenizer takes the vocabulary itself
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:  # pragma: no cover - transformers 4
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=128, pad_token_id=0,
                     initializer_range=init_range)
    torch.manual_seed(seed)
    if num_labels:
        cfg.num_labels = num_labels
        model = BertForSequenceClassification(cfg)
    else:
        model = BertModel(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)

    apply_umask(*folder.glob("*.safetensors"))  # safetensors writes 0600
    return folder
