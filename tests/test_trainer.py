import pytest
import torch
from torch import nn

from attar.checkpoint import latest_checkpoint, read_checkpoint
from attar.errors import AttarError
from attar.train.objective import Objective
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer, TrainingDiverged
from tiny_task import CE, digits


class NaNAt(Objective):
    """Cross-entropy that turns into NaN at a given step, to exercise the guard."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, batch, logits):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, batch.y)
        return {"loss": loss * float("nan") if self.calls > self.at else loss}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def test_training_learns_and_is_deterministic():
    x, y = digits()
    cfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3)
    a = Trainer(_mlp(), CE(), x, y, cfg, seed=1, val=(x, y)).fit()
    b = Trainer(_mlp(), CE(), x, y, cfg, seed=1, val=(x, y)).fit()
    assert a.history[-1]["val_accuracy"] > 0.85
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_accumulation_matches_large_batch():
    """accumulate=2 over micro-batches of 32 takes the same SGD step as one batch of the same 64 rows."""
    x, y = digits()
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
    x, y = digits()
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=5)
    tr = Trainer(_mlp(), NaNAt(12), x, y, cfg, ckpt_dir=tmp_path)
    with pytest.raises(TrainingDiverged) as e:
        tr.fit()
    msg = str(e.value)
    assert "step 12" in msg and "step-00000010" in msg
    assert latest_checkpoint(tmp_path).name == "step-00000010"


def test_resume_rejects_changed_settings(tmp_path):
    from attar.errors import AttarError

    x, y = digits()
    Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, batch_size=64), ckpt_dir=tmp_path).fit()
    with pytest.raises(AttarError, match="different training settings"):
        Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, batch_size=32), ckpt_dir=tmp_path).fit(resume=True)


def test_nan_right_after_a_checkpoint_drops_it_and_names_the_previous_one(tmp_path):
    """The checkpoint written just before the divergence holds the weights that produced it: it is not 'good'."""
    x, y = digits()
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=5)
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), NaNAt(10), x, y, cfg, ckpt_dir=tmp_path).fit()
    msg = str(e.value)
    assert "step 10" in msg and "step-00000005" in msg and "step-00000010" not in msg
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert "--allow-optim-change" in msg


def test_nan_before_any_checkpoint_says_so_in_words(tmp_path):
    x, y = digits()
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), NaNAt(0), x, y, TrainConfig(epochs=1, batch_size=64), ckpt_dir=tmp_path).fit()
    msg = str(e.value)
    assert "No checkpoint was written yet" in msg and "None" not in msg


def test_resume_with_changed_optimiser_settings_only_on_request(tmp_path):
    from attar.errors import AttarError

    x, y = digits()
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


# ------------------------------------------------------------------ extension points: strategy, callbacks, task


class Stop(Exception):
    pass


def _stop_at(step_to_stop):
    def cb(step, metrics):
        if step == step_to_stop:
            raise Stop  # like SIGKILL: everything after the newest checkpoint is lost

    return cb


def _mezo():
    from attar.adapt.mezo import MeZOConfig, MeZOStep

    return MeZOStep(MeZOConfig(eps=1e-3))


def _same_weights(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


MEZO_CFG = TrainConfig(epochs=2, batch_size=64, lr=1e-2, weight_decay=1e-3, checkpoint_every=5)


@pytest.mark.usefixtures("one_thread")
def test_mezo_strategy_resumed_after_a_kill_matches_uninterrupted(tmp_path):
    x, y = digits()
    ref = Trainer(_mlp(), CE(), x, y, MEZO_CFG, seed=2, strategy=_mezo()).fit()
    with pytest.raises(Stop):
        Trainer(_mlp(), CE(), x, y, MEZO_CFG, seed=2, strategy=_mezo(), ckpt_dir=tmp_path, on_metrics=_stop_at(20)).fit()
    assert latest_checkpoint(tmp_path).name == "step-00000015"
    from attar.train.callbacks import Callback

    class Count(Callback):
        n = 0

        def on_batch_end(self, trainer, batch, outputs, losses):
            Count.n += 1

    res = Trainer(_mlp(), CE(), x, y, MEZO_CFG, seed=2, strategy=_mezo(), ckpt_dir=tmp_path,
                  callbacks=[Count()]).fit(resume=True)
    assert res.steps == ref.steps == 2 * (len(y) // 64) and res.samples_seen == ref.samples_seen
    assert Count.n == ref.steps - 15  # it continued from the checkpoint
    assert res.history[-1]["train_loss"] == ref.history[-1]["train_loss"]  # (epoch 1 averages only what ran after)
    _same_weights(ref.model, res.model)
    assert not torch.equal(ref.model[0].weight, _mlp()[0].weight)  # it trained
    # a backprop run cannot resume a MeZO checkpoint (nor the reverse): the strategy is part of the config hash
    from attar.errors import AttarError

    with pytest.raises(AttarError, match="different training settings"):
        Trainer(_mlp(), CE(), x, y, MEZO_CFG, seed=2, ckpt_dir=tmp_path).fit(resume=True)


@pytest.mark.usefixtures("one_thread")
def test_mezo_strategy_stops_on_sigterm_with_a_checkpoint_and_resumes_exactly(tmp_path):
    import os
    import signal

    from attar.lifecycle import RunInterrupted, stop_on_signals
    from attar.train.callbacks import Callback

    class TermAt(Callback):
        def __init__(self):
            self.n, self.outputs = 0, set()

        def on_batch_end(self, trainer, batch, outputs, losses):
            self.n += 1
            self.outputs.add(outputs is None)  # MeZO's passes are perturbed: no clean outputs to show
            if self.n == 8:
                os.kill(os.getpid(), signal.SIGTERM)

    x, y = digits()
    cfg = MEZO_CFG.model_copy(update={"checkpoint_every": 0})
    ref = Trainer(_mlp(), CE(), x, y, cfg, seed=2, strategy=_mezo()).fit()
    term = TermAt()
    with stop_on_signals(), pytest.raises(RunInterrupted) as e:
        Trainer(_mlp(), CE(), x, y, cfg, seed=2, strategy=_mezo(), ckpt_dir=tmp_path, callbacks=[term]).fit()
    assert e.value.checkpoint.endswith("step-00000008") and term.outputs == {True}
    res = Trainer(_mlp(), CE(), x, y, cfg, seed=2, strategy=_mezo(), ckpt_dir=tmp_path).fit(resume=True)
    _same_weights(ref.model, res.model)


def test_mezo_strategy_has_the_nan_guard_and_refuses_teacher_objectives(tmp_path):
    from attar.errors import AttarError

    x, y = digits()
    with pytest.raises(TrainingDiverged) as e:  # two forward passes per MeZO step: call 25 is step 12's first
        Trainer(_mlp(), NaNAt(24), x, y, MEZO_CFG, strategy=_mezo(), ckpt_dir=tmp_path).fit()
    assert "step 12" in str(e.value) and "step-00000010" in str(e.value)

    class KD(CE):
        needs_teacher = True

    with pytest.raises(AttarError, match="teacher-free objectives"):
        Trainer(_mlp(), KD(), x, y, MEZO_CFG, strategy=_mezo())


def test_mezo_fit_is_the_trainer_with_the_mezo_strategy():
    from attar.adapt.mezo import MeZOConfig, mezo_fit

    x, y = digits()
    a = mezo_fit(_mlp(), CE(), x, y, MEZO_CFG, MeZOConfig(eps=1e-3), seed=2)
    b = Trainer(_mlp(), CE(), x, y, MEZO_CFG, seed=2, name="finetune", strategy=_mezo()).fit()
    _same_weights(a.model, b.model)


@pytest.mark.usefixtures("one_thread")
def test_callbacks_see_every_batch_and_epoch_and_resume_with_their_state(tmp_path):
    """A trajectory callback (one row per epoch) resumed from a periodic checkpoint records what an
    uninterrupted run does; on_batch_end sees the model's outputs on the exact batch."""
    from attar.train.callbacks import Callback, ForgettingCounter, Trajectory, flatten_params

    class Count(Callback):
        def __init__(self):
            self.batches, self.epochs = 0, []

        def on_batch_end(self, trainer, batch, outputs, losses):
            assert outputs.shape == (len(batch.y), 10) and "loss" in losses
            self.batches += 1

        def on_epoch_end(self, trainer, epoch):
            self.epochs.append(epoch)

    x, y = digits()
    cfg = TrainConfig(epochs=3, batch_size=64, checkpoint_every=10, lr=3e-3)
    count, traj, forget = Count(), Trajectory(m := _mlp()), ForgettingCounter(len(y))
    ref = Trainer(m, CE(), x, y, cfg, seed=1, callbacks=[count, traj, forget]).fit()
    assert count.batches == ref.steps and count.epochs == [0, 1, 2]
    t = traj.stack()
    assert t.shape == (4, sum(p.numel() for p in m.parameters())) and torch.equal(t[-1], flatten_params(ref.model))
    assert torch.equal(t[0], flatten_params(_mlp()))
    assert forget.scores().shape == (len(y),) and bool(forget.ever.any())

    m2 = _mlp()
    with pytest.raises(Stop):
        Trainer(m2, CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path, on_metrics=_stop_at(50),
                callbacks=[Trajectory(m2), ForgettingCounter(len(y))]).fit()  # newest checkpoint: step 40, epoch 2
    m3 = _mlp()
    traj3, forget3 = Trajectory(m3), ForgettingCounter(len(y))
    count3 = Count()
    res = Trainer(m3, CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path, callbacks=[traj3, forget3, count3]).fit(resume=True)
    assert count3.batches == ref.steps - 40 and count3.epochs == [1, 2]  # continued from the checkpoint
    _same_weights(ref.model, res.model)
    assert torch.equal(traj3.stack(), t)
    assert torch.equal(forget3.forgets, forget.forgets) and torch.equal(forget3.ever, forget.ever)


def test_a_task_turns_rows_into_batches_and_batches_into_losses():
    """The seam a new kind of data plugs into: here rows become (x, y) with noise and the loss is the task's own."""
    from attar.train.objective import Batch
    from attar.train.task import Task

    class NoisyRows(Task):
        calls = 0

        def batch(self, trainer, rows, epoch, micro):
            NoisyRows.calls += 1
            g = trainer.generator(9, epoch, micro)
            return Batch(x=trainer.x[rows] + 0.01 * torch.randn(len(rows), 64, generator=g), y=trainer.y[rows], idx=rows)

        def forward(self, model, objective, batch):
            logits = model(batch.x)
            l2 = logits.pow(2).mean()
            return {"loss": objective(batch, logits)["loss"] + 1e-3 * l2, "logit_l2": l2.detach()}, logits

    x, y = digits()
    seen = []
    res = Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=3, batch_size=64, lr=3e-3), val=(x, y), task=NoisyRows(),
                  on_metrics=lambda step, m: seen.append(m)).fit()
    assert NoisyRows.calls == res.steps and res.history[-1]["val_accuracy"] > 0.8
    assert any("train_logit_l2" in m for m in seen)


def test_inner_runs_see_every_row_and_leave_the_global_rng_alone():
    x, y = digits()
    tr = Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=2, batch_size=64), drop_last=False, inner=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = tr.fit()
    assert res.samples_seen == 2 * len(y) and res.steps == 2 * 29  # 28 batches of 64 and one of 5, per epoch
    assert torch.equal(torch.get_rng_state(), before)  # an ordinary run reseeds it at every step
    with pytest.raises(ValueError, match="drop_last"):
        Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, batch_size=32, accumulate=2), drop_last=False)


@pytest.mark.usefixtures("one_thread")
def test_a_selectors_progress_spans_the_micro_batches_the_trainer_runs_with_mezo(tmp_path):
    """MeZO takes one step per micro-batch (train.accumulate does not apply), so a selector's schedule must count
    the micro-batches the trainer really runs: progress reaches the end of training, not half of it."""
    from attar.select import build_selector

    x, y = digits()
    seen = []
    sel = build_selector({"name": "uniform", "keep": 0.5})
    begin = sel.begin_micro

    def spy(epoch, micro):
        begin(epoch, micro)
        seen.append(sel.progress())

    sel.begin_micro = spy
    cfg = MEZO_CFG.model_copy(update={"accumulate": 2, "checkpoint_every": 0})
    tr = Trainer(_mlp(), CE(), x, y, cfg, selector=sel, strategy=_mezo())
    tr.fit()
    assert tr.accumulate == 1 and len(seen) == tr.total_steps
    assert seen[0] == 0.0 and 1 - 1 / len(seen) - 1e-9 <= seen[-1] < 1.0


def test_a_step_budget_and_a_callbacks_stop_end_the_run_and_stay_ended(tmp_path):
    """train.steps replaces epochs; a callback's request_stop ends the run, and resuming it trains no further."""
    from attar.train.callbacks import Callback

    x, y = digits()
    res = Trainer(_mlp(), CE(), x, y, TrainConfig(steps=7, batch_size=64), progress=False).fit()
    assert res.steps == 7 and len(res.history) == 1

    class StopAt(Callback):
        ended = 0

        def on_step_end(self, trainer, step):
            if step == 3:
                trainer.request_stop("enough")

        def on_train_end(self, trainer):
            StopAt.ended += 1

    cfg = TrainConfig(epochs=4, batch_size=64, checkpoint_every=2)
    first = Trainer(_mlp(), CE(), x, y, cfg, ckpt_dir=tmp_path, callbacks=[StopAt()], progress=False).fit()
    again = Trainer(_mlp(), CE(), x, y, cfg, ckpt_dir=tmp_path, callbacks=[StopAt()], progress=False).fit(resume=True)
    assert first.steps == again.steps == 3 and StopAt.ended == 2
    _same_weights(first.model, again.model)


def test_device_cuda_without_one_is_refused_with_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    x, y = digits()
    with pytest.raises(AttarError, match="no CUDA device; use device: auto or cpu"):
        Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=1, device="cuda")).fit()
