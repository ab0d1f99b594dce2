"""Classification metrics every stage reports: accuracy, NLL and calibration error.

Why these three: distillation and condensation change calibration as much as
accuracy (a KD student is often better calibrated than a scratch one at equal
accuracy), so the results table shows NLL and ECE next to accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attar.errors import AttarError


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): ``Σ_b |B_b|/N · |acc_b − conf_b|``.

    Bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]``, so a confidence of
    exactly 1.0 falls in the last bin. Empty bins contribute nothing.
    """
    if n_bins < 1:
        raise AttarError(f"n_bins must be at least 1, got {n_bins}.")
    conf = confidence.detach().double().flatten()
    hit = correct.detach().double().flatten()
    n = conf.numel()
    if n == 0:
        return float("nan")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    bins = torch.bucketize(conf, edges, right=False)  # index b such that edges[b-1] < conf <= edges[b]
    # Σ_b |B_b|/N · |acc_b − conf_b| = (1/N) Σ_b |Σ_{i∈B_b} (hit_i − conf_i)|
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, hit - conf)
    return float(gap.abs().sum() / n)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, mean NLL (nats) and ECE of ``logits [N, C]`` against labels ``y [N]``.

    Rows with ``y == -1`` (unlabeled) are ignored. Computed in float64 so that
    half-precision logits from a large evaluation set still give exact-looking numbers.
    """
    if logits.dim() != 2:
        raise AttarError(f"classification_metrics expects logits of shape [N, C], got {tuple(logits.shape)}.")
    if y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise AttarError(
            f"classification_metrics expects labels y of shape [{logits.shape[0]}] to match logits "
            f"{tuple(logits.shape)}, got {tuple(y.shape)}."
        )
    keep = y != -1
    logits, y = logits.detach()[keep].double(), y.detach()[keep].long()
    if y.numel() == 0:
        raise AttarError("classification_metrics got no labeled rows (every y is -1); evaluate on a labeled split.")
    num_classes = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise AttarError(
            f"Labels must lie in [0, {num_classes - 1}] (or be -1 for unlabeled), but range over "
            f"[{int(y.min())}, {int(y.max())}]: the data set and the model disagree on the number of classes."
        )
    log_probs = F.log_softmax(logits, dim=1)
    nll = F.nll_loss(log_probs, y)
    log_conf, pred = log_probs.max(dim=1)
    correct = pred == y
    return {
        "accuracy": float(correct.double().mean()),
        "nll": float(nll),
        "ece": expected_calibration_error(log_conf.exp(), correct, n_bins),
    }
