"""attar's merges against mergekit 0.1.5's outputs on the same tiny Llama models.

The inputs, configs and mergekit outputs under tests/golden/merge/ are made by
bench/merge_golden.py (run once, in a separate venv with mergekit).
Deterministic methods must agree to float32 rounding; DARE draws its own random
masks, so it is compared in distribution (kept fraction, rescale rule).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attar.merge import run_merge

GOLDEN = Path(__file__).parent / "golden" / "merge"
DETERMINISTIC = ["linear", "linear_unnormalized", "task_arithmetic", "ties", "ties_filtered", "breadcrumbs_ties", "slerp", "slerp_gradient"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def merged(config: Path, tmp_path: Path, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / config.stem
    run_merge(config, out, base_dir=GOLDEN / "models", progress=False, **kw)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_mergekit(name, tmp_path):
    ours = merged(GOLDEN / "configs" / f"{name}.yaml", tmp_path)
    gold = load_file(str(GOLDEN / "mergekit" / name / "model.safetensors"))
    assert set(ours) == set(gold)
    for k in gold:
        torch.testing.assert_close(ours[k], gold[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")


def _deltas(out: dict[str, torch.Tensor]):
    base = load_file(str(GOLDEN / "models" / "base" / "model.safetensors"))
    ft = load_file(str(GOLDEN / "models" / "ft_a" / "model.safetensors"))
    return {k: (out[k] - base[k], ft[k] - base[k]) for k in base}


def test_dare_matches_mergekit_in_distribution(tmp_path):
    gold = _deltas(load_file(str(GOLDEN / "mergekit" / "dare_linear" / "model.safetensors")))
    config = GOLDEN / "configs" / "dare_linear.yaml"
    ours = _deltas(merged(config, tmp_path))
    text = config.read_text().replace("dtype: float32", "dtype: float32\nparameters: {rescale: l1}")
    (tmp_path / "l1.yaml").write_text(text)
    ours_l1 = _deltas(merged(tmp_path / "l1.yaml", tmp_path / "l1"))

    def kept_fraction(d):
        kept = sum(int((o.abs() > 1e-6).sum()) for o, _ in d.values())
        return kept / sum(o.numel() for o, _ in d.values())

    for d in (gold, ours, ours_l1):  # density 0.5 over ~1.9k entries: std of the fraction ~0.012
        assert abs(kept_fraction(d) - 0.5) < 0.06
    for o, delta in ours.values():  # attar's default: the paper's 1/density rescale
        kept = o.abs() > 1e-6
        torch.testing.assert_close(o[kept], 2 * delta[kept], rtol=1e-4, atol=1e-6)
    for d in (gold, ours_l1):  # mergekit 0.1.5 (and rescale: l1) keep each tensor's L1 norm
        for o, delta in d.values():
            if delta.numel() >= 8:
                torch.testing.assert_close(o.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=1e-6)
