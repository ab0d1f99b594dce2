import math

import pytest
import torch
import torch.nn.functional as F

from attar.errors import AttarError
from attar.metrics import classification_metrics, expected_calibration_error


def binary_logits(p_class0: list[float]) -> torch.Tensor:
    """Two-class logits whose softmax gives class 0 probability p: [log(p/(1-p)), 0]."""
    p = torch.tensor(p_class0, dtype=torch.float64)
    return torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=1)


def test_hand_computed_values():
    # Class-0 probabilities 0.9, 0.15, 0.7, 0.55 -> predictions 0, 1, 0, 0 with
    # confidences 0.9, 0.85, 0.7, 0.55. Labels 0, 0, 0, 0 -> correct: yes, no, yes, yes.
    # A fifth, unlabeled row (y = -1) must be ignored entirely.
    logits = torch.cat([binary_logits([0.9, 0.15, 0.7, 0.55]), binary_logits([0.99])])
    y = torch.tensor([0, 0, 0, 0, -1])
    m = classification_metrics(logits, y, n_bins=5)  # bins (0.4,0.6] (0.6,0.8] (0.8,1.0]
    assert m["accuracy"] == pytest.approx(0.75)
    # NLL = -(ln 0.9 + ln 0.15 + ln 0.7 + ln 0.55) / 4  (probability of the true class 0)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.15) + math.log(0.7) + math.log(0.55)) / 4)
    # ECE by hand:
    #   (0.8,1.0]: {0.9 ✓, 0.85 ✗}: acc 0.5, conf 0.875 -> 2/4 * |0.5 - 0.875| = 0.1875
    #   (0.6,0.8]: {0.7 ✓}:         acc 1.0, conf 0.7   -> 1/4 * 0.3           = 0.075
    #   (0.4,0.6]: {0.55 ✓}:        acc 1.0, conf 0.55  -> 1/4 * 0.45          = 0.1125
    #   total 0.375
    assert m["ece"] == pytest.approx(0.375)
    assert set(m) == {"accuracy", "nll", "ece"}


def test_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g) * 3
    y = torch.randint(0, 7, (200,), generator=g)
    m = classification_metrics(logits, y)
    assert m["nll"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    # Unlabeled rows are dropped: same numbers as the labeled subset alone.
    y2 = y.clone()
    y2[::3] = -1
    keep = y2 != -1
    assert classification_metrics(logits, y2)["nll"] == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)


def test_perfectly_calibrated_is_zero():
    # Every prediction has confidence 0.75 and exactly 3 of 4 are right: acc == conf in the one used bin.
    logits = binary_logits([0.75] * 8)
    y = torch.tensor([0, 0, 0, 1] * 2)
    m = classification_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_loop_reference_with_default_bins():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(500, generator=g) * 0.9 + 0.1
    correct = torch.rand(500, generator=g) < conf
    ref = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ref += in_bin.float().mean().item() * abs(correct[in_bin].float().mean().item() - conf[in_bin].mean().item())
    assert expected_calibration_error(conf, correct) == pytest.approx(ref, abs=1e-6)
    # confidence exactly 1.0 lands in the last bin and, if correct, adds nothing
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([True])) == 0.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(AttarError, match=r"\[N, C\]"):
        classification_metrics(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AttarError, match="labels y"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(AttarError, match="no labeled rows"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([-1, -1]))
    with pytest.raises(AttarError, match="number of classes"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 5]))
