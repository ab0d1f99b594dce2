import pytest
import torch
from torch import nn

from attar.checkpoint import latest_checkpoint, read_checkpoint
from attar.train.objective import Objective
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer, TrainingDiverged


class CE(Objective):
    def forward(self, batch, logits):
        return {"loss": nn.functional.cross_entropy(logits, batch.y)}


class NaNAt(Objective):
    """Cross-entropy that turns into NaN at a given step, to exercise the guard."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, batch, logits):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, batch.y)
        return {"loss": loss * float("nan") if self.calls > self.at else loss}


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def test_training_learns_and_is_deterministic():
    x, y = _digits()
    cfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3)
    a = Trainer(_mlp(), CE(), x, y, cfg, seed=1, val=(x, y)).fit()
    b = Trainer(_mlp(), CE(), x, y, cfg, seed=1, val=(x, y)).fit()
    assert a.history[-1]["val_accuracy"] > 0.85
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_accumulation_matches_large_batch():
    """accumulate=2 over micro-batches of 32 takes the same SGD step as one batch of the same 64 rows."""
    x, y = _digits()
    m1, m2 = nn.Sequential(nn.Linear(64, 10)), nn.Sequential(nn.Linear(64, 10))
    m2.load_state_dict(m1.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=32, accumulate=2, optimizer="sgd", momentum=0.0, weight_decay=0,
                      schedule="constant", lr=0.1)
    t = Trainer(m1, CE(), x, y, cfg, seed=0)
    rows = t._epoch_order(0)[:64]
    nn.functional.cross_entropy(m2(x[rows]), y[rows]).backward()
    with torch.no_grad():
        ref_w = m2[0].weight - 0.1 * m2[0].weight.grad
    t.steps_per_epoch = t.total_steps = 1  # stop after the first optimizer step
    t.fit()
    torch.testing.assert_close(m1[0].weight, ref_w, rtol=1e-5, atol=1e-6)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    x, y = _digits()
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=5)
    tr = Trainer(_mlp(), NaNAt(12), x, y, cfg, ckpt_dir=tmp_path)
    with pytest.raises(TrainingDiverged) as e:
        tr.fit()
    msg = str(e.value)
    assert "step 12" in msg and "step-00000010" in msg
    assert latest_checkpoint(tmp_path).name == "step-00000010"


def test_resume_rejects_changed_settings(tmp_path):
    from attar.errors import AttarError

    x, y = _digits()
    Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, batch_size=64), ckpt_dir=tmp_path).fit()
    with pytest.raises(AttarError, match="different training settings"):
        Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, batch_size=32), ckpt_dir=tmp_path).fit(resume=True)


def test_nan_right_after_a_checkpoint_drops_it_and_names_the_previous_one(tmp_path):
    """The checkpoint written just before the divergence holds the weights that produced it: it is not 'good'."""
    x, y = _digits()
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=5)
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), NaNAt(10), x, y, cfg, ckpt_dir=tmp_path).fit()
    msg = str(e.value)
    assert "step 10" in msg and "step-00000005" in msg and "step-00000010" not in msg
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert "--allow-optim-change" in msg


def test_nan_before_any_checkpoint_says_so_in_words(tmp_path):
    x, y = _digits()
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), NaNAt(0), x, y, TrainConfig(epochs=1, batch_size=64), ckpt_dir=tmp_path).fit()
    msg = str(e.value)
    assert "No checkpoint was written yet" in msg and "None" not in msg


def test_resume_with_changed_optimiser_settings_only_on_request(tmp_path):
    from attar.errors import AttarError

    x, y = _digits()
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=5, optimizer="sgd", schedule="constant")
    with pytest.raises(TrainingDiverged):
        Trainer(_mlp(), NaNAt(12), x, y, cfg, ckpt_dir=tmp_path).fit()
    lower = cfg.model_copy(update={"lr": 1e-4, "weight_decay": 0.0, "momentum": 0.5})
    with pytest.raises(AttarError, match="different training settings"):
        Trainer(_mlp(), CE(), x, y, lower, ckpt_dir=tmp_path).fit(resume=True)
    seen = []

    class Spy(CE):
        def forward(self, batch, logits):
            seen.append(1)
            return super().forward(batch, logits)

    tr = Trainer(_mlp(), Spy(), x, y, lower, ckpt_dir=tmp_path, accept_changed_config=True)
    res = tr.fit(resume=True)
    assert res.steps == tr.total_steps and len(seen) == tr.total_steps - 10  # continued from step 10, not 0
    # the resumed checkpoint's hyper-parameters yield to the new config
    state = read_checkpoint(latest_checkpoint(tmp_path))[1]
    groups = state["optimizer"]["param_groups"]
    assert all(g["lr"] == 1e-4 and g["weight_decay"] == 0.0 and g["momentum"] == 0.5 for g in groups)
