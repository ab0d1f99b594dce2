"""attar.condense mtt: trajectory matching, the expert store, TESLA constant memory, DATM, FYI and ZCA plug-ins."""

from __future__ import annotations

import json

import pytest
import torch

from attar.condense import CONDENSERS, condense, load_synthetic
from attar.condense.augment import DSA
from attar.condense.base import CondenseContext
from attar.condense.experts import ExpertConfig, check_store, open_store, store_identity
from attar.condense.mtt import FlatNet, make_batch_fn, normalised_distance, plan_steps, trajectory_grads
from attar.condense.zca import ZCA
from attar.data import load_data
from attar.errors import AttarError
from attar.models import build_model
from attar.specs import DataSpec, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=1)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


def _ctx(b, rows=300, model=TINY, **kw) -> CondenseContext:
    return CondenseContext(x=b.train.x[:rows], y=b.train.y[:rows], num_classes=10, ipc=1, iterations=1, seed=0,
                           model=model, mean=b.mean, std=b.std, data_name="digits", **kw)


# ------------------------------------------------------------------ the loss and its gradient


def test_normalised_distance_matches_hand_computation():
    start = torch.tensor([0.0, 0.0, 0.0])
    target = torch.tensor([3.0, 4.0, 0.0])  # ‖start − target‖² = 25
    theta = torch.tensor([1.0, 2.0, 2.0])  # ‖θ − target‖² = 4 + 4 + 4 = 12
    assert float(normalised_distance(theta, start, target)) == pytest.approx(12 / 25)
    assert float(normalised_distance(target, start, target)) == 0.0
    assert float(normalised_distance(start, start, target)) == 1.0


@pytest.mark.parametrize("soft,flip,augment", [(False, False, False), (True, True, True)])
def test_constant_memory_gradient_equals_unrolled(soft, flip, augment):
    """TESLA mode (replayed steps, Hessian-vector products) gives the unrolled autograd gradient, float64."""
    torch.manual_seed(0)
    c, n, shape = 3, 6, (1, 8, 8)
    net = build_model(ModelSpec(arch="convnet", width=4, depth=1), shape, c, [0.5], [0.25]).double()
    for q in net.parameters():
        q.requires_grad_(False)
    names = [k for k, _ in net.named_parameters()]
    shapes = [list(p.shape) for _, p in net.named_parameters()]
    fnet = FlatNet(net, names, shapes)
    start = torch.cat([p.reshape(-1) for p in net.parameters()]).double()
    target = start + 0.05 * torch.randn_like(start)
    z = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.arange(c).repeat_interleave(n // c)
    logits = torch.randn(n, c, dtype=torch.float64) if soft else None
    lr = torch.tensor(0.05, dtype=torch.float64)
    dsa = DSA(mean=0.5, std=0.25) if augment else None
    g = torch.Generator().manual_seed(3)
    steps = 5
    plan = plan_steps(n, 4, steps, g, dsa, shape, flip)  # batches of 4 and 2: images recur across steps
    batch = make_batch_fn(plan, lambda t: t * 0.25 + 0.5, y, dsa, flip)
    a = trajectory_grads(fnet, start, target, z, logits, lr, batch, steps, constant_memory=False)
    b = trajectory_grads(fnet, start, target, z, logits, lr, batch, steps, constant_memory=True)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    assert float(a.z.abs().max()) > 0
    assert torch.allclose(a.z, b.z, rtol=1e-9, atol=1e-12)
    assert torch.allclose(a.lr, b.lr, rtol=1e-9, atol=1e-12)
    if soft:
        assert torch.allclose(a.soft, b.soft, rtol=1e-9, atol=1e-12) and float(a.soft.abs().max()) > 0
    # and both agree with a finite difference on the learning rate
    eps = 1e-6
    up = trajectory_grads(fnet, start, target, z, logits, lr + eps, batch, steps, True).loss
    dn = trajectory_grads(fnet, start, target, z, logits, lr - eps, batch, steps, True).loss
    assert float(a.lr) == pytest.approx((up - dn) / (2 * eps), rel=1e-5)


# ------------------------------------------------------------------ the expert store


def test_expert_store_built_once_then_reused_and_extended(tmp_path, digits):
    ctx = _ctx(digits)
    cfg = ExpertConfig(num_experts=1, epochs=2, batch_size=64, dsa=False)
    s = open_store(tmp_path / "ex", ctx, cfg)
    assert s.trained == [0] and s.trajectory(0).shape == (3, s.meta["num_params"])
    meta = json.loads((tmp_path / "ex" / "experts.json").read_text())
    assert meta["architecture"]["width"] == 8 and meta["data"] == "digits" and len(meta["data_hash"]) == 64
    assert meta["epochs"] == 2 and meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    f = tmp_path / "ex" / "expert-000.safetensors"
    mtime = f.stat().st_mtime_ns
    again = open_store(tmp_path / "ex", _ctx(digits), cfg)
    assert again.trained == [] and f.stat().st_mtime_ns == mtime  # no training, nothing rewritten
    assert torch.equal(again.trajectory(0), s.trajectory(0))
    # the trajectory moves: epoch 0 is the initialisation, later epochs differ
    assert not torch.equal(s.trajectory(0)[0], s.trajectory(0)[2])
    more = open_store(tmp_path / "ex", _ctx(digits), ExpertConfig(num_experts=2, epochs=2, batch_size=64, dsa=False))
    assert more.trained == [1] and more.num_experts == 2 and f.stat().st_mtime_ns == mtime


def test_expert_store_mismatch_names_the_field(tmp_path, digits):
    cfg = ExpertConfig(num_experts=1, epochs=1, batch_size=64, dsa=False)
    open_store(tmp_path / "ex", _ctx(digits), cfg)
    other_arch = _ctx(digits, model=ModelSpec(arch="convnet", width=16, depth=1))
    with pytest.raises(AttarError, match=r"different architecture or data — architecture: store has .*\"width\": 8.*"
                                         r"Point expert_dir at another folder"):
        check_store(tmp_path / "ex", store_identity(other_arch), cfg)
    other_data = _ctx(digits, rows=200)
    with pytest.raises(AttarError, match=r"data_hash: store has [0-9a-f]+"):
        open_store(tmp_path / "ex", other_data, cfg)
    with pytest.raises(AttarError, match=r"training settings — epochs: store has 1, this run needs 3"):
        open_store(tmp_path / "ex", _ctx(digits), ExpertConfig(num_experts=1, epochs=3, batch_size=64, dsa=False))


def test_condense_refuses_a_foreign_store_before_any_work(tmp_path, digits, monkeypatch):
    import attar.condense.experts as ex

    cfg = {"num_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 1, "expert_batch": 64, "expert_dsa": False,
           "expert_dir": str(tmp_path / "ex")}
    open_store(tmp_path / "ex", _ctx(digits, rows=len(digits.train.y)),
               ExpertConfig(num_experts=1, epochs=2, batch_size=64, dsa=False))
    calls = []
    monkeypatch.setattr(ex, "train_expert", lambda *a, **k: calls.append(1))
    with pytest.raises(AttarError, match=r"architecture: store has"):
        condense("digits", "mtt", 1, tmp_path / "out", iterations=1, model=ModelSpec(arch="convnet", width=4, depth=1),
                 params=cfg, progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_expert_interrupted_mid_epoch_resumes_to_the_uninterrupted_trajectory(tmp_path, digits, monkeypatch):
    """An expert is an ordinary Trainer run: SIGTERM mid-epoch leaves a checkpoint in the store, the next
    open_store resumes it, and the stored trajectory equals an uninterrupted build (with DSA on)."""
    import os
    import signal

    import attar.condense.experts as ex
    from attar.lifecycle import RunInterrupted, stop_on_signals

    cfg = ExpertConfig(num_experts=1, epochs=3, batch_size=64, dsa=True)
    ref = open_store(tmp_path / "ref", _ctx(digits), cfg).trajectory(0)

    class TermAt(ex.Trajectory):
        def on_batch_end(self, trainer, batch, outputs, losses):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 7:  # 300 rows in batches of 64: 5 per epoch, so epoch 2's second batch
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ex, "Trajectory", TermAt)
    with stop_on_signals(), pytest.raises(RunInterrupted) as e:
        open_store(tmp_path / "ex", _ctx(digits), cfg)
    assert ".expert-000.partial" in e.value.checkpoint
    assert json.loads((tmp_path / "ex" / "experts.json").read_text())["experts"] == []
    batches = []

    class Count(ex.Trajectory):
        def on_batch_end(self, trainer, batch, outputs, losses):
            batches.append(len(batch.y))

    monkeypatch.setattr(ex, "Trajectory", Count)
    s = open_store(tmp_path / "ex", _ctx(digits), cfg)
    assert s.trained == [0] and torch.equal(s.trajectory(0), ref)
    assert len(batches) == 15 - 7 and sum(batches) == 3 * 300 - (300 + 2 * 64)  # resumed after step 7, not redone
    assert not (tmp_path / "ex" / ".expert-000.partial").exists()


def test_params_validate_the_start_window():
    with pytest.raises(AttarError, match="exceeds expert_train_epochs"):
        CONDENSERS.get("mtt")({"expert_train_epochs": 5, "max_start_epoch": 5, "expert_epochs": 2})
    with pytest.raises(AttarError, match="min_start_epoch"):
        CONDENSERS.get("mtt")({"min_start_epoch": 3, "max_start_epoch": 3})
    m = CONDENSERS.get("mtt")({"max_start_epoch": 2, "max_start_epoch_final": 10, "expert_train_epochs": 12})
    assert m.window(0, 101) == (0, 2) and m.window(50, 101) == (0, 6) and m.window(100, 101) == (0, 10)


# ------------------------------------------------------------------ end to end


MTT_FAST = {"num_experts": 1, "expert_train_epochs": 3, "max_start_epoch": 1, "expert_epochs": 2, "expert_batch": 64,
            "expert_dsa": False, "syn_steps": 6, "dsa": False, "lr_img": 100.0, "syn_lr": 0.01, "lr_lr": 1e-5}


def test_short_mtt_run_lowers_the_matching_loss_and_writes_a_valid_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "home"))
    losses = []
    out = condense("digits", "mtt", 1, tmp_path / "mtt", iterations=12, model=TINY, params=MTT_FAST, progress=False,
                   on_step=lambda i, m: losses.append(m["loss"]))
    s = load_synthetic(out)
    assert s.x.shape == (10, 1, 8, 8) and torch.isfinite(s.x).all() and s.soft is None
    m = s.meta["mtt"]
    assert m["experts_trained_now"] == [0] and m["expert_store"].startswith(str(tmp_path / "home"))
    # one expert, one start epoch, full batch, no augmentation: the same objective every iteration
    assert losses[-1] < 0.95 * losses[0], losses
    assert m["syn_lr"] > 0 and m["syn_lr"] != 0.01
    b = load_data(DataSpec(artifact=str(out)))
    assert torch.equal(b.train.x, s.x) and len(b.test.y) > 0
    # the same call reuses the cached store (no expert trained) and gives the same images
    again = load_synthetic(condense("digits", "mtt", 1, tmp_path / "mtt2", iterations=12, model=TINY, params=MTT_FAST,
                                    progress=False))
    assert again.meta["mtt"]["experts_trained_now"] == [] and torch.equal(again.x, s.x)


def test_constant_memory_run_matches_plain_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "home"))
    kw = dict(iterations=3, model=TINY, progress=False)
    a = load_synthetic(condense("digits", "mtt", 1, tmp_path / "a", params=MTT_FAST | {"dsa": True}, **kw))
    b = load_synthetic(condense("digits", "mtt", 1, tmp_path / "b", params=MTT_FAST | {"dsa": True, "constant_memory": True},
                                **kw))
    assert torch.allclose(a.x, b.x, atol=1e-4) and a.meta["mtt"]["syn_lr"] == pytest.approx(b.meta["mtt"]["syn_lr"], rel=1e-4)


def test_soft_labels_learned_and_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "home"))
    out = condense("digits", "mtt", 2, tmp_path / "soft", iterations=3, model=TINY, progress=False,
                   params=MTT_FAST | {"soft_labels": True, "batch_syn": 8, "constant_memory": True})
    s = load_synthetic(out)
    assert s.soft is not None and s.soft.shape == (20, 10) and torch.isfinite(s.soft).all()
    assert s.meta["params"]["soft_labels"] is True
    with pytest.raises(AttarError, match="learns its own soft labels"):
        condense("digits", "mtt", 1, tmp_path / "both", iterations=1, model=TINY, params=MTT_FAST | {"soft_labels": True},
                 soft_labels=tmp_path / "teacher", progress=False)


# ------------------------------------------------------------------ plug-ins


def test_zca_round_trip_and_whitening():
    torch.manual_seed(0)
    mix = torch.eye(16) + 0.3 * torch.randn(16, 16)  # correlated pixels, well conditioned
    x = (torch.randn(3000, 16) @ mix * 0.2 + 0.5).reshape(-1, 1, 4, 4)
    zca = ZCA.fit(x, torch.tensor([0.5]), torch.tensor([0.2]), eps=1e-5)
    w = zca.whiten(x)
    assert torch.allclose(zca.unwhiten(w), x, atol=1e-4)
    cov = torch.cov(w.flatten(1).T.double())
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=0.02)
    # symmetric (ZCA, not PCA): whitening keeps images close to the standardised originals' layout
    assert torch.allclose(zca.w, zca.w.T, atol=1e-5)
    with pytest.raises(AttarError, match="eps must be > 0"):
        ZCA.fit(x, 0.5, 0.2, eps=0)


def test_zca_and_flip_plugins_through_condense(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "home"))
    out = condense("digits", "dm", 1, tmp_path / "dm", iterations=2, model=TINY, params={"batch_real": 8}, zca=True,
                   flip=True, progress=False)
    s = load_synthetic(out)
    assert s.meta["zca"]["eps"] == 0.1 and s.meta["zca"]["dim"] == 64 and s.meta["flip"] is True
    # stored in pixel space: the images' scale is the data's, not the whitened one's
    assert 0.0 <= float(s.x.mean()) <= 1.0 and torch.isfinite(s.x).all()
    out = condense("digits", "mtt", 1, tmp_path / "mtt", iterations=2, model=TINY, params=MTT_FAST, zca=True, flip=True,
                   progress=False)
    store = json.loads((tmp_path / load_synthetic(out).meta["mtt"]["expert_store"] / "experts.json").read_text())
    assert store["input_space"] == "zca(eps=0.1)"
    with pytest.raises(AttarError, match="plug-in for methods that learn images"):
        condense("digits", "random", 1, tmp_path / "r", flip=True)


def test_flip_aware_is_class_major(digits):
    ctx = _ctx(digits, flip=True)
    x = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(20, 1, 2, 2)  # 10 classes, 2 images each
    y = torch.arange(10).repeat_interleave(2)
    x2, y2 = ctx.flip_aware(x, y)
    assert x2.shape == (40, 1, 2, 2) and y2.tolist() == [c for c in range(10) for _ in range(4)]
    assert torch.equal(x2[:2], x[:2]) and torch.equal(x2[2:4], x[:2].flip(-1)) and torch.equal(x2[4:6], x[2:4])
    assert _ctx(digits).flip_aware(x, y)[0] is x
