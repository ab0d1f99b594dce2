"""FP8 optimizer state (COAT) and low-rank gradient projection (GaLore) on the one Trainer."""

import hashlib
import json

import pytest
import torch
from torch import nn

from attar.checkpoint import latest_checkpoint
from attar.errors import AttarError
from attar.train import fp8_state, projection
from attar.train.adamw import CompactAdamW, state_bytes
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer
from tiny_task import CE, digits

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# ---------------------------------------------------------------- FP8 codec
@pytest.mark.parametrize("name", ["first_moment", "second_moment", "twelve_decades"])
def test_fp8_round_trip_is_within_the_formats_error_and_keeps_every_nonzero(name):
    g = torch.Generator().manual_seed(1)
    x = {"first_moment": torch.randn(1000, generator=g) * 1e-3,
         "second_moment": torch.rand(1000, generator=g) ** 4 * 1e-6,
         "twelve_decades": torch.exp(torch.randn(1000, generator=g) * 5) * torch.randn(1000, generator=g).sign()}[name]
    x[::97] = 0.0
    p = fp8_state.quantize(x, group=128)
    assert p.codes.dtype == torch.float8_e4m3fn
    y = fp8_state.dequantize(p)
    nz = x != 0
    assert torch.equal(y[~nz], x[~nz])  # zeros stay zero
    rel = (y - x).abs() / x.abs().clamp_min(1e-38)
    bound = fp8_state.error_bound(p).repeat_interleave(128)[: x.numel()]
    assert bool((rel[nz] <= bound[nz] * (1 + 1e-4) + 1e-6).all())  # 2^-4 carried through |x|^(1/k)
    assert bool((y[nz] != 0).all()) and bool((y.sign() == x.sign()).all())


def test_second_moments_near_float32_underflow_stay_finite():
    """sqrt(amax * amin) of a group of 1e-20..1e-40 underflows to 0 in float32; the centre is taken in logs."""
    x = torch.tensor([1e-40, 1e-30, 1e-20, 0.0] + [1e-25] * 124)
    y = fp8_state.dequantize(fp8_state.quantize(x))
    assert bool(torch.isfinite(y).all()) and bool((y[x != 0] > 0).all()) and y[3] == 0


def test_without_expansion_small_values_underflow_and_with_it_they_do_not():
    x = torch.exp(torch.linspace(-25, 0, 128))  # 11 decades in one group: wider than E4M3's normal range
    plain = fp8_state.dequantize(fp8_state.quantize(x, 128, expansion=False))
    expanded = fp8_state.dequantize(fp8_state.quantize(x, 128, expansion=True))
    assert int((plain == 0).sum()) > 30 and int((expanded == 0).sum()) == 0
    # absmax scaling alone: each value within 2^-4 of itself or of the format's step near zero
    big = x > x.max() * fp8_state.FP8_MIN_NORMAL / fp8_state.FP8_MAX
    assert float(((plain - x).abs() / x)[big].max()) <= 2**-4 + 1e-6


# ---------------------------------------------------------------- the optimizer
def _run(opt_factory, steps=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, 24), nn.Tanh(), nn.Linear(24, 5))
    opt = opt_factory(model.parameters())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, opt, losses


def test_plain_and_full_rank_equal_torch_adamw():
    ref, _, _ = _run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    plain, _, _ = _run(lambda p: CompactAdamW(p, lr=1e-2, weight_decay=0.1))
    full, opt, _ = _run(lambda p: CompactAdamW(p, lr=1e-2, weight_decay=0.1, rank=24, update_every=5))
    for a, b, c in zip(ref.parameters(), plain.parameters(), full.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    assert not any("proj" in st for st in opt.state.values())  # rank >= min(m, n) everywhere: nothing projected


def _dist(a, b):
    return sum(float(((p - q).detach() ** 2).sum()) for p, q in zip(a.parameters(), b.parameters())) ** 0.5


def test_fp8_state_tracks_adamw_and_holds_under_a_third_of_its_bytes():
    ref, ref_opt, ref_loss = _run(lambda p: torch.optim.AdamW(p, lr=1e-2), steps=60)
    init, _, _ = _run(lambda p: torch.optim.AdamW(p, lr=1e-2), steps=0)
    fp8, opt, loss = _run(lambda p: CompactAdamW(p, lr=1e-2, state_dtype="fp8_e4m3"), steps=60)
    absmax, _, _ = _run(lambda p: CompactAdamW(p, lr=1e-2, state_dtype="fp8_e4m3", expansion=False), steps=60)
    assert {st["exp_avg"].dtype for st in opt.state.values()} == {torch.float8_e4m3fn}
    assert max(abs(a - b) for a, b in zip(loss, ref_loss)) < 0.01 * ref_loss[0]
    # off AdamW's path by under 6% of the distance AdamW travelled (measured 3.6%; absmax scaling alone: 9.3%)
    assert _dist(fp8, ref) < 0.06 * _dist(ref, init) and _dist(fp8, ref) < _dist(absmax, ref)
    assert state_bytes(opt) < state_bytes(ref_opt) / 3


def test_galore_first_step_is_the_hand_derived_projected_update():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    x, t = torch.randn(32, 10), torch.randn(32, 6)
    ((x @ w.t() - t) ** 2).mean().backward()
    gm = w.grad.clone()
    w0 = w.detach().clone()
    opt = CompactAdamW([w], lr=0.1, weight_decay=0.0, rank=2, scale=0.5, eps=1e-8)
    opt.step()
    u, _, _ = torch.linalg.svd(gm)  # m=6 <= n=10: left singular vectors
    p = u[:, :2]
    r = p.t() @ gm
    expected = w0 - 0.1 * 0.5 * p @ (r / (r.abs() + 1e-8))  # Adam's first step: m_hat / sqrt(v_hat) = sign
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[w]["exp_avg"].shape == (2, 10)


def test_galore_with_a_fixed_basis_is_adamw_on_the_reparameterised_weights():
    """W = W0 + P Z with P fixed: GaLore on W takes exactly the steps AdamW takes on Z (right projection, m > n)."""
    torch.manual_seed(0)
    x, t = torch.randn(40, 5), torch.randn(40, 12)
    w0 = torch.randn(12, 5)
    loss = lambda w: ((x @ w.t() - t) ** 2).mean()  # noqa: E731
    w = nn.Parameter(w0.clone())
    opt = CompactAdamW([w], lr=0.05, weight_decay=0.0, rank=3, update_every=10**6)
    for _ in range(15):
        opt.zero_grad()
        loss(w).backward()
        opt.step()
    q = opt.state[w]["proj"]  # [3, 5]: first right singular vectors of the first gradient
    g0 = torch.func.grad(loss)(w0)
    torch.testing.assert_close(q, projection.basis(g0, 3))
    z = nn.Parameter(torch.zeros(12, 3))
    zopt = torch.optim.AdamW([z], lr=0.05, weight_decay=0.0)
    for _ in range(15):
        zopt.zero_grad()
        loss(w0 + z @ q).backward()
        zopt.step()
    torch.testing.assert_close(w.detach(), w0 + z.detach() @ q, rtol=1e-5, atol=1e-6)


def test_galore_refreshes_its_basis_every_t_steps_and_measures_its_state():
    _, opt, _ = _run(lambda p: CompactAdamW(p, lr=1e-2, rank=4, update_every=3), steps=1)
    first = {k: st["proj"].clone() for k, st in opt.state.items() if "proj" in st}
    assert len(first) == 3  # every matrix has both sides > 4; the biases are not projected
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(256, 512))
    big.grad = torch.randn(256, 512)
    for rank, opt_ in ((None, torch.optim.AdamW([big])), (8, CompactAdamW([big], rank=8))):
        opt_.step()
        if rank is None:
            full = state_bytes(opt_)
        else:
            low = state_bytes(opt_)
    assert full == 2 * 256 * 512 * 4 + 4  # two float32 moments and the step
    assert low == 2 * 8 * 512 * 4 + 256 * 8 * 4 + 4  # moments [8, 512] and the basis [256, 8]
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(8, 16))
    opt = CompactAdamW([p], rank=2, update_every=3)
    seen = []
    for _ in range(7):
        p.grad = torch.randn(8, 16, generator=g)
        opt.step()
        seen.append(opt.state[p]["proj"].clone())
    same = [torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert same == [True, True, False, True, True, False]  # refreshed at steps 3 and 6 (0-based)


# ---------------------------------------------------------------- through the Trainer
EFFICIENT = {
    "fp8": dict(optimizer_state={"dtype": "fp8_e4m3", "expansion": "dynamic"}),
    "galore": dict(optimizer={"name": "adamw", "projection": {"rank": 4, "update_every": 7, "scale": 4}}),
    "both": dict(optimizer={"name": "adamw", "projection": {"rank": 4, "update_every": 7, "scale": 4}},
                 optimizer_state={"dtype": "fp8_e4m3"}),
}


class Stop(Exception):
    pass


@pytest.mark.parametrize("kind", list(EFFICIENT))
def test_resumed_after_a_kill_equals_an_uninterrupted_run(tmp_path, kind):
    x, y = digits()
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, checkpoint_every=5, **EFFICIENT[kind])

    def stop_at_20(step, metrics):
        if step == 20:
            raise Stop

    ref = Trainer(_mlp(), CE(), x, y, cfg, seed=1).fit()
    with pytest.raises(Stop):
        Trainer(_mlp(), CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path, on_metrics=stop_at_20).fit()
    assert latest_checkpoint(tmp_path).name == "step-00000015"
    res = Trainer(_mlp(), CE(), x, y, cfg, seed=1, ckpt_dir=tmp_path).fit(resume=True)
    for a, b in zip(ref.model.parameters(), res.model.parameters()):
        assert torch.equal(a, b)
    assert res.history[1]["train_loss"] < 0.8 * res.history[0]["train_loss"]  # it trains
    if kind == "fp8":  # and, with FP8 moments, like AdamW does (GaLore takes smaller steps: scale 4 here)
        plain = Trainer(_mlp(), CE(), x, y, TrainConfig(epochs=2, batch_size=64, lr=1e-2), seed=1).fit()
        assert abs(res.history[-1]["train_loss"] - plain.history[-1]["train_loss"]) < 0.02
    with pytest.raises(AttarError, match="different training settings"):  # not resumable as plain AdamW
        Trainer(_mlp(), CE(), x, y, cfg.model_copy(update={"optimizer_state": None, "optimizer": "adamw"}), seed=1,
                ckpt_dir=tmp_path).fit(resume=True)


def test_config_names_the_misfit():
    from pydantic import ValidationError

    assert TrainConfig(optimizer="sgd").optimizer_name == "sgd"  # a plain name still works
    with pytest.raises(ValidationError, match="use name: adamw"):
        TrainConfig(optimizer={"name": "sgd", "projection": {"rank": 4}})
    with pytest.raises(ValidationError, match="set optimizer: adamw"):
        TrainConfig(optimizer="sgd", optimizer_state={"dtype": "fp8_e4m3"})
    with pytest.raises(ValidationError, match="fsdp"):
        TrainConfig(optimizer_state={"dtype": "fp8_e4m3"}, fsdp=True)
    with pytest.raises(ValidationError, match="rank"):
        TrainConfig(optimizer={"name": "adamw", "projection": {"update_every": 4}})


def test_plain_config_hash_is_unchanged_by_the_new_fields():
    """Checkpoints written before these settings existed still resume (their defaults are left out of the hash)."""
    x, y = digits()
    cfg = TrainConfig(epochs=1)
    old = cfg.model_dump(exclude={"device", "log_to", "dtype", "steps"})
    for k in ("optimizer_state", "sparsity", "growth"):  # what the config dumped before these fields existed
        del old[k]
    before = hashlib.sha256(json.dumps([old, 0, len(x), 1], sort_keys=True).encode()).hexdigest()[:16]
    assert Trainer(_mlp(), CE(), x, y, cfg)._config_hash() == before
    fp8 = TrainConfig(epochs=1, optimizer_state={"dtype": "fp8_e4m3"})
    assert Trainer(_mlp(), CE(), x, y, fp8)._config_hash() != before
