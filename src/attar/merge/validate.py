"""Checks that merge inputs agree, run before any arithmetic so a bad merge fails in seconds, not hours.

Each message names the tensor and the model that differs, because with ten
inputs "shape mismatch" alone is useless.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from attar.errors import AttarError
from attar.merge.tensor_source import TensorSource
from attar.merge.vocab import is_vocab_tensor


def _vocab_size(src: TensorSource) -> int | None:
    cfg = src.config or {}
    for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None


def _is_vocab_tensor(name: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], a: TensorSource, b: TensorSource) -> bool:
    if len(shape_a) != len(shape_b) or not shape_a or shape_a[1:] != shape_b[1:]:
        return False
    if is_vocab_tensor(name):
        return True
    va, vb = _vocab_size(a), _vocab_size(b)
    return va is not None and vb is not None and va != vb and shape_a[0] == va and shape_b[0] == vb


def check_configs(ref: TensorSource, others: Sequence[TensorSource]) -> None:
    """Same ``architectures`` and ``model_type`` wherever a config.json says so (same ``spec.arch`` for artifacts)."""
    for src in others:
        for key in ("architectures", "model_type"):
            a = (ref.config or {}).get(key)
            b = (src.config or {}).get(key)
            if a is not None and b is not None and a != b:
                raise AttarError(
                    f"{src.label} has {key} {b!r} but {ref.label} has {a!r}: merging different architectures "
                    "gives garbage. Merge only fine-tunes of the same base architecture."
                )
        a = ((ref.state or {}).get("spec") or {}).get("arch")
        b = ((src.state or {}).get("spec") or {}).get("arch")
        if a is not None and b is not None and a != b:
            raise AttarError(f"{src.label} is a {b!r} model artifact but {ref.label} is {a!r}; they cannot be merged.")


def check_tensors(ref: TensorSource, others: Sequence[TensorSource], vocab_aligned: bool = False) -> None:
    """Same tensor names and shapes everywhere (vocabulary rows may differ when ``vocab_aligned``: the merge
    aligns them); float vs non-float tensors must agree too."""
    ref_names = ref.names()
    ref_set = set(ref_names)
    for src in others:
        names = set(src.names())
        missing = [n for n in ref_names if n not in names]
        extra = sorted(names - ref_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) that {ref.label} has, e.g. {missing[:3]}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) that {ref.label} lacks, e.g. {extra[:3]}")
            raise AttarError(
                f"{src.label} {' and '.join(parts)}. Inputs must be the same architecture with the same tensor names "
                "(e.g. all saved with save_pretrained from the same model class)."
            )
        for n in ref_names:
            sa, sb = ref.shape(n), src.shape(n)
            if sa != sb:
                if _is_vocab_tensor(n, sa, sb, ref, src):
                    if vocab_aligned:
                        continue
                    raise AttarError(
                        f"vocabulary size differs: tensor {n!r} has {sa[0]} rows in {ref.label} but {sb[0]} in "
                        f"{src.label} (embedding / output head). The models use different tokenizers or added tokens; "
                        "set `tokenizer_source: union` (or `base`, or a model) in the merge config to align their "
                        "vocabularies by token string."
                    )
                raise AttarError(
                    f"tensor {n!r} has shape {tuple(sb)} in {src.label} but {tuple(sa)} in {ref.label}; "
                    "the models are not the same architecture/size."
                )
            fa, fb = ref.dtype(n).is_floating_point, src.dtype(n).is_floating_point
            if fa != fb:
                raise AttarError(
                    f"tensor {n!r} is {ref.dtype(n)} in {ref.label} but {src.dtype(n)} in {src.label}; "
                    "a floating-point tensor cannot be merged with an integer one."
                )


def check_inputs(ref: TensorSource, others: Sequence[TensorSource], vocab_aligned: bool = False) -> None:
    check_configs(ref, others)
    check_tensors(ref, others, vocab_aligned)


def check_state_dicts(ref: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                      labels: Sequence[str] | None = None, ref_label: str = "the reference model") -> None:
    """In-memory inputs (a recipe's merge stage): same tensor names and shapes, or an error naming both shapes."""
    labels = list(labels) if labels is not None else [f"model #{i + 1}" for i in range(len(others))]
    for label, sd in zip(labels, others):
        missing = [n for n in ref if n not in sd]
        extra = [n for n in sd if n not in ref]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra tensors {extra[:3]}"
            raise AttarError(f"{label} {what} compared with {ref_label}; merged models must have the same architecture.")
        for n, t in ref.items():
            if tuple(sd[n].shape) != tuple(t.shape):
                raise AttarError(
                    f"tensor {n!r} has shape {tuple(sd[n].shape)} in {label} but {tuple(t.shape)} in {ref_label}; "
                    "only models of the same architecture and size can be merged (same widths, depths and classes)."
                )


def check_finite(name: str, merged: torch.Tensor, stored: torch.Tensor,
                 inputs: Callable[[], Mapping[str, torch.Tensor]]) -> None:
    """Refuse a merged tensor holding inf or NaN (before anything is committed), saying where it came from.

    ``merged`` is the float32 result, ``stored`` the same cast to the output dtype, ``inputs`` reads the
    inputs' tensors (only called on failure, to tell a poisoned input from an overflow).
    """
    if not stored.is_floating_point():
        return
    # A sum is one streaming read (isfinite(t).all() allocates a mask as large as the tensor); inf and NaN always
    # reach it. A finite sum clears the tensor; a non-finite one may be an overflow of the sum, so look closer.
    acc = torch.float64 if stored.dtype == torch.float64 else torch.float32
    if math.isfinite(float(stored.sum(dtype=acc))) or bool(torch.isfinite(stored).all()):
        return
    bad = int((~torch.isfinite(stored)).sum())
    poisoned = [label for label, t in inputs().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if poisoned:
        why = f"the input {poisoned[0]} already holds inf/NaN in this tensor; repair or leave out that model"
    elif bool(torch.isfinite(merged).all()):
        why = (f"the merged values (largest |x| {float(merged.abs().max()):.3g}) do not fit in {str(stored.dtype).removeprefix('torch.')}; "
               "store the merge as float32 or bfloat16 (--dtype or out_dtype)")
    else:
        why = ("the arithmetic overflowed float32: the weights or lambda are far too large (or the normalized "
               "weights nearly cancel); use weights of ordinary size")
    raise AttarError(f"the merged tensor {name!r} has {bad} non-finite value(s) (inf or NaN) out of {stored.numel()}: "
                     f"{why}. Nothing was written.")
