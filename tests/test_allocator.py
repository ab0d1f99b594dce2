"""glibc malloc thresholds for training (attar.allocator): set once, on CPU runs of the Trainer."""

import sys

import pytest
import torch

from attar import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_is_taken_by_glibc_and_idempotent():
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    x = torch.empty(20 * 2**20, dtype=torch.uint8)  # allocations still work, and are plain tensors
    x.fill_(1)
    assert int(x.sum()) == 20 * 2**20


def test_a_cpu_training_run_sets_it(monkeypatch):
    from attar.train import trainer as trainer_mod
    from attar.train.config import TrainConfig
    from attar.train.objective import build_objective

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    x, y = torch.rand(32, 4), torch.randint(0, 2, (32,))
    model = torch.nn.Linear(4, 2)
    trainer_mod.Trainer(model, build_objective({"name": "ce"}), x, y, TrainConfig(epochs=1, batch_size=16, device="cpu"),
                        progress=False).fit()
    assert calls == [1]
