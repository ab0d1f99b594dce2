"""Text data and Hugging Face text classifiers.

* :func:`load_text` (a :class:`TextSpec`: built-in ``tweets`` / ``fortunes``, CSV, Parquet, ``datasets`` folder)
  -> :class:`TextBundle` of right-padded token-id tensors, split like image data (fixed test, seeded validation).
* :func:`load_hf_classifier` / :func:`save_hf_classifier`: ``AutoModelForSequenceClassification`` from a local
  folder (``minilm`` = the packaged all-MiniLM-L6-v2) as ``model(ids) -> logits``, and back to a HF folder.

Importing this package does not import transformers; the functions do, when called.
"""

from attar.text.data import (
    TextBundle,
    TextSpec,
    TextSplit,
    load_text,
    text_spec,
    tokenize,
)
from attar.text.sources import TEXT_BUILTINS, TextRaw, list_text_datasets

__all__ = [
    "TEXT_BUILTINS",
    "TextBundle",
    "TextRaw",
    "TextSpec",
    "TextSplit",
    "list_text_datasets",
    "load_hf_classifier",
    "load_text",
    "load_tokenizer",
    "save_hf_classifier",
    "text_spec",
    "tokenize",
]


def __getattr__(name: str):
    if name in ("load_hf_classifier", "save_hf_classifier", "load_tokenizer", "HFClassifier", "minilm_path"):
        from attar.text import hf

        return getattr(hf, name)
    raise AttributeError(name)
