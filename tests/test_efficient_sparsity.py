"""SPDF through the one Trainer: masked weights exactly zero until dense_from, then they train."""

import pytest
import torch
from torch import nn

from attar.checkpoint import latest_checkpoint
from attar.errors import AttarError
from attar.train.callbacks import Callback
from attar.train.config import TrainConfig
from attar.train.sparsity import masked_parameters
from attar.train.trainer import Trainer
from tiny_task import CE, digits

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Watch(Callback):
    """After every step (before SPDF's own guard runs, as it is the last callback): are the masked entries zero?"""

    def __init__(self, zero_positions):
        self.zero_positions, self.zero_after = zero_positions, {}

    def on_step_end(self, trainer, step):
        self.zero_after[step] = [int((p.detach()[z] != 0).sum()) for p, z in self.zero_positions]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_weights_stay_exactly_zero_until_dense_from_then_train(optimizer):
    x, y = digits()
    model = _mlp()
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, weight_decay=1e-2, optimizer=optimizer,
                      sparsity={"schedule": "spdf", "sparsity": 0.75, "dense_from": 20})
    bias0 = model[0].bias.detach().clone()
    tr = Trainer(model, CE(), x, y, cfg, seed=3)
    spdf = tr.callbacks[-1]
    assert [n for n, _ in spdf.params] == ["0.weight", "2.weight"]  # matrices only
    zeros = [(p, p.detach() == 0) for _, p in spdf.params]
    for p, z in zeros:  # exactly 75% of each matrix, zeroed at construction
        assert int(z.sum()) == round(0.75 * p.numel())
    assert torch.equal(model[0].bias, bias0)
    watch = Watch(zeros)
    tr.callbacks.insert(0, watch)
    tr.fit()
    assert all(watch.zero_after[s] == [0, 0] for s in range(1, 21))  # 20 sparse steps (0..19), the grads masked
    # step 20 is dense: the masked weights move (those on digits' always-blank pixels have no gradient: ~30%)
    assert all(n > 0.6 * int(z.sum()) for n, (_, z) in zip(watch.zero_after[21], zeros))
    assert spdf.density() > 0.8


def test_exclude_and_embeddings_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    names = [n for n, _ in masked_parameters(model, exclude=["2.*"])]
    assert names == ["1.weight"]


def test_spdf_resumed_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    x, y = digits()
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, checkpoint_every=5,
                      sparsity={"sparsity": 0.5, "dense_from": 30})

    class Stop(Exception):
        pass

    def stop_at_40(step, metrics):
        if step == 40:
            raise Stop

    ref = Trainer(_mlp(), CE(), x, y, cfg, seed=1).fit()
    with pytest.raises(Stop):
        Trainer(_mlp(), CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path, on_metrics=stop_at_40).fit()
    assert latest_checkpoint(tmp_path).name == "step-00000035"  # in the dense phase
    res = Trainer(_mlp(), CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path).fit(resume=True)
    for a, b in zip(ref.model.parameters(), res.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(AttarError, match="different training settings"):  # nor resumable without the schedule
        Trainer(_mlp(), CE(), x, y, cfg.model_copy(update={"sparsity": None}), seed=1,
                ckpt_dir=tmp_path).fit(resume=True)
