"""Objectives: values against hand computations, label masking, state, hooks, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attar.distill.divergences import divergence
from attar.distill.objectives import (
    OBJECTIVES,
    PSKD,
    build_objective,
    nd_loss,
    objective_fields,
)
from attar.errors import AttarError
from attar.train.objective import Batch

C = 3


def mlp(seed: int, d_in: int = 6, hidden: int = 5, c: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, c))


def conv_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),  # "1": 4 x 8 x 8
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, C),
    )


def conv_teacher(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),  # "4": 6 x 4 x 4
        nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, C),
    )


def run(obj, student, teachers, x, y, idx=None, teacher_grad=False):
    """One trainer-like step: teachers on the batch first (hooks fire), then student, then objective."""
    idx = torch.arange(len(x)) if idx is None else idx
    tl = None
    if teachers:
        with torch.set_grad_enabled(teacher_grad):
            outs = [t(x) for t in teachers]
        tl = outs[0] if len(outs) == 1 else torch.stack(outs)
    logits = student(x)
    return obj(Batch(x=x, y=y, idx=idx, teacher_logits=tl), logits), logits


def batch_for(kind: str, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) if kind == "conv" else torch.randn(n, 6, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------- kd


def test_kd_alpha_one_equals_ce_and_alpha_zero_equals_divergence():
    torch.manual_seed(0)
    s, t = torch.randn(7, C, requires_grad=True), torch.randn(7, C)
    y = torch.randint(0, C, (7,))
    b = Batch(x=torch.zeros(7, 1), y=y, idx=torch.arange(7), teacher_logits=t)
    out = build_objective({"name": "kd", "alpha": 1.0, "temperature": 3.0})(b, s)
    assert torch.allclose(out["loss"], F.cross_entropy(s, y))
    for name, extra in [("kl", {}), ("reverse_kl", {}), ("js", {}), ("gjsd", {"beta": 0.3}), ("tvd", {})]:
        obj = build_objective({"name": "kd", "alpha": 0.0, "temperature": 2.0, "divergence": name, **extra})
        assert torch.allclose(obj(b, s)["loss"], divergence(name, s, t, 2.0, **extra)), name
    # mixed weight is the convex combination
    out = build_objective({"name": "kd", "alpha": 0.25, "temperature": 2.0})(b, s)
    assert torch.allclose(out["loss"], 0.25 * F.cross_entropy(s, y) + 0.75 * divergence("kl", s, t, 2.0))


def test_unlabeled_rows_excluded_from_ce_and_all_unlabeled_is_finite():
    torch.manual_seed(1)
    s, t = torch.randn(6, C, requires_grad=True), torch.randn(6, C)
    y = torch.tensor([0, -1, 2, -1, 1, -1])
    b = Batch(x=torch.zeros(6, 1), y=y, idx=torch.arange(6), teacher_logits=t)
    lab = y >= 0
    out = build_objective({"name": "kd", "alpha": 0.5, "temperature": 1.0})(b, s)
    want = 0.5 * F.cross_entropy(s[lab], y[lab]) + 0.5 * divergence("kl", s, t, 1.0)  # KD on all rows
    assert torch.allclose(out["loss"], want)
    assert torch.allclose(build_objective({"name": "ce"})(b, s)["loss"], F.cross_entropy(s[lab], y[lab]))

    none = Batch(x=torch.zeros(6, 1), y=torch.full((6,), -1), idx=torch.arange(6), teacher_logits=t)
    for spec in ({"name": "ce"}, {"name": "kd", "alpha": 1.0}, {"name": "kd"}, {"name": "dho"}):
        obj = build_objective(spec)
        if spec["name"] == "dho":
            student = mlp(0)
            obj.setup(student, [], C, 6)
            x = torch.randn(6, 6)
            out, _ = run(obj, student, [mlp(1)], x, none.y)
        else:
            out = obj(none, s)
        assert torch.isfinite(out["loss"]), spec
        out["loss"].backward()
    ce_only = build_objective({"name": "ce"})(none, s)["loss"]
    assert ce_only.item() == 0.0


def test_label_free_ignores_labels():
    torch.manual_seed(2)
    s, t = torch.randn(5, C), torch.randn(5, C)
    obj = build_objective({"name": "label_free", "temperature": 2.0})
    a = obj(Batch(torch.zeros(5, 1), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5), t), s)["loss"]
    b = obj(Batch(torch.zeros(5, 1), torch.full((5,), -1), torch.arange(5), t), s)["loss"]
    assert torch.equal(a, b) and torch.allclose(a, divergence("kl", s, t, 2.0))
    assert obj.needs_teacher and "alpha" not in objective_fields("label_free")


# ---------------------------------------------------------------------------------------- ensemble


def test_ensemble_of_identical_teachers_equals_single_teacher_kl():
    torch.manual_seed(3)
    s, t = torch.randn(4, C), torch.randn(4, C)
    y = torch.randint(0, C, (4,))
    ens = build_objective({"name": "ensemble", "temperature": 2.5})
    two = ens(Batch(torch.zeros(4, 1), y, torch.arange(4), torch.stack([t, t])), s)["loss"]
    one = ens(Batch(torch.zeros(4, 1), y, torch.arange(4), t), s)["loss"]
    assert torch.allclose(two, one, atol=1e-6)
    assert torch.allclose(one, divergence("kl", s, t, 2.5))


def test_ensemble_target_is_the_probability_average():
    # Teacher A: p = [0.9, 0.1]; teacher B: p = [0.5, 0.5]  ->  average [0.7, 0.3] (not softmax of mean logits).
    ta, tb = torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.5, 0.5]]))
    tl = torch.stack([ta, tb])
    ens = build_objective({"name": "ensemble"})  # T = 1, alpha = 0
    b = Batch(torch.zeros(1, 1), torch.tensor([-1]), torch.arange(1), tl)
    perfect = torch.log(torch.tensor([[0.7, 0.3]]))
    assert ens(b, perfect)["loss"].abs().item() < 1e-6
    uniform = torch.zeros(1, 2)
    want = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert ens(b, uniform)["loss"].item() == pytest.approx(want, abs=1e-6)
    # softmax of the averaged logits would be different: [0.75, 0.25]
    assert ens(b, torch.log(torch.tensor([[0.75, 0.25]])))["loss"].item() > 1e-3


# -------------------------------------------------------------------------------------------- pskd


def test_pskd_targets_schedule_and_buffer_swap():
    n = 4
    obj = build_objective({"name": "pskd", "alpha_T": 0.8})
    assert isinstance(obj, PSKD) and not obj.needs_teacher
    obj.setup(mlp(0), [], C, n)
    y = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(4)
    z0 = torch.randn(3, C)
    idx0 = torch.tensor([2, 0, 3])  # row 1 is not seen in epoch 0
    out = obj(Batch(torch.zeros(3, 1), y[idx0], idx0, None), z0)
    assert torch.allclose(out["loss"], F.cross_entropy(z0, y[idx0]))  # epoch 0: one-hot target
    assert torch.equal(obj.targets(y[idx0], idx0, C), F.one_hot(y[idx0], C).float())
    assert obj.cur_seen.tolist() == [True, False, True, True]
    assert torch.allclose(obj.cur_probs[idx0], torch.softmax(z0, -1))

    obj.on_epoch_end(0, 4)  # swap: cur -> prev, cur cleared
    assert obj.prev_seen.tolist() == [True, False, True, True] and not obj.cur_seen.any()
    assert int(obj.epoch) == 1 and obj.alpha_t() == pytest.approx(0.8 * 1 / 4)

    z1 = torch.randn(2, C)
    idx1 = torch.tensor([0, 1])
    out = obj(Batch(torch.zeros(2, 1), y[idx1], idx1, None), z1)
    a = 0.2
    prev0 = torch.softmax(z0[1], -1)  # row 0 was z0[1] in epoch 0
    t0 = (1 - a) * F.one_hot(y[0], C).float() + a * prev0
    t1 = F.one_hot(y[1], C).float()  # row 1 unseen last epoch: one-hot
    logp = torch.log_softmax(z1, -1)
    want = -((t0 * logp[0]).sum() + (t1 * logp[1]).sum()) / 2
    assert out["loss"].item() == pytest.approx(want.item(), abs=1e-6)

    # Resume: a fresh objective loaded from the state dict gives the identical loss.
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    fresh = build_objective({"name": "pskd", "alpha_T": 0.8})
    fresh.setup(mlp(0), [], C, n)
    fresh.load_state_dict(state)
    z2 = torch.randn(2, C)
    assert torch.equal(
        fresh(Batch(torch.zeros(2, 1), y[idx1], idx1, None), z2)["loss"],
        obj(Batch(torch.zeros(2, 1), y[idx1], idx1, None), z2)["loss"],
    )
    assert set(state) == {"cur_probs", "prev_probs", "cur_seen", "prev_seen", "epoch", "num_epochs"}


# --------------------------------------------------------------------------------------------- dho


def test_dho_loss_and_fold_identity():
    student, teacher = mlp(0), mlp(1)
    obj = build_objective({"name": "dho", "alpha": 0.3, "beta": 0.4, "temperature": 2.0})
    obj.setup(student, [teacher], C, 10)
    assert obj.head_path == "2" and torch.equal(obj.head2.weight, student[2].weight)
    with torch.no_grad():  # make the heads differ, as training would
        obj.head2.weight.add_(torch.randn_like(obj.head2.weight))
        obj.head2.bias.add_(torch.randn_like(obj.head2.bias))
    x, y = batch_for("mlp")
    out, z1 = run(obj, student, [teacher], x, y)
    z2 = obj.head2(student[1](student[0](x)))
    want = 0.3 * F.cross_entropy(z1, y) + 0.7 * divergence("kl", z2, teacher(x), 2.0)
    assert torch.allclose(out["loss"], want, atol=1e-6)

    folded = obj.finalize(student)
    assert folded is not student
    with torch.no_grad():
        assert torch.allclose(folded(x), 0.4 * z1 + 0.6 * z2, atol=1e-6)
        assert torch.equal(student(x), z1)  # the trained student is left as it was
    assert not student[2]._forward_hooks and not folded[2]._forward_hooks
    assert set(obj.state_dict()) == {"head2.weight", "head2.bias"}


def test_dho_head_path_errors():
    with pytest.raises(AttarError, match="Available module paths: 0, 1, 2"):
        build_objective({"name": "dho", "head": "fc"}).setup(mlp(0), [], C, 4)
    with pytest.raises(AttarError, match="not an nn.Linear"):
        build_objective({"name": "dho", "head": "1"}).setup(mlp(0), [], C, 4)
    with pytest.raises(AttarError, match="no nn.Linear"):
        build_objective({"name": "dho"}).setup(nn.Sequential(nn.Flatten()), [], C, 4)


# ----------------------------------------------------------------------------------------- feature


def test_feature_hooks_projector_and_pooling():
    student, teacher = conv_student(), conv_teacher()
    obj = build_objective({"name": "feature", "student_layer": "1", "teacher_layer": "4", "beta": 2.0})
    obj.setup(student, [teacher], C, 8)
    assert obj.needs_live_teacher and obj.dims == (4, 6)
    assert tuple(obj.projector.weight.shape) == (6, 4)  # 1x1 conv 4 -> 6 channels
    x, y = batch_for("conv")
    out, logits = run(obj, student, [teacher], x, y)
    # Recompute by hand: student map 4x8x8, teacher map 6x4x4 -> project, pool to 4x4, MSE.
    fs = student[1](student[0](x))
    ft = teacher[4](teacher[3](teacher[2](teacher[1](teacher[0](x)))))
    ps = F.conv2d(fs, obj.projector.weight[:, :, None, None], obj.projector.bias)
    feat = F.mse_loss(F.adaptive_avg_pool2d(ps, (4, 4)), ft)
    assert torch.allclose(out["feature"], feat.detach(), atol=1e-6)
    kd = 0.5 * F.cross_entropy(logits, y) + 0.5 * divergence("kl", logits, teacher(x), 4.0)
    assert torch.allclose(out["loss"], kd + 2.0 * feat, atol=1e-5)

    cos = build_objective({"name": "feature", "student_layer": "1", "teacher_layer": "4", "loss": "cosine"})
    cos.setup(student, [teacher], C, 8)
    out, _ = run(cos, student, [teacher], x, y)
    assert 0.0 <= out["feature"].item() <= 2.0


def test_feature_bad_path_lists_modules_and_cache_only_is_refused():
    student, teacher = conv_student(), conv_teacher()
    with pytest.raises(AttarError) as e:
        build_objective({"name": "feature", "student_layer": "layer9", "teacher_layer": "4"}).setup(
            student, [teacher], C, 8)
    assert "'layer9'" in str(e.value) and "Available module paths: 0, 1, 2, 3, 4" in str(e.value)
    with pytest.raises(AttarError, match="teacher_layer"):
        build_objective({"name": "feature", "student_layer": "1", "teacher_layer": "nope"}).setup(
            student, [teacher], C, 8)
    obj = build_objective({"name": "feature", "student_layer": "1", "teacher_layer": "4"})
    obj.setup(student, [teacher], C, 8)
    x, y = batch_for("conv")
    logits = student(x)  # teacher logits from a cache: the teacher's hook never fired
    with pytest.raises(AttarError, match="live"):
        obj(Batch(x, y, torch.arange(8), torch.randn(8, C)), logits)
    # a wrong channel guess is reported with the fix
    bad = build_objective({"name": "feature", "student_layer": "3", "teacher_layer": "5", "student_dim": 16,
                           "teacher_dim": 5})
    bad.setup(student, [teacher], C, 8)
    with pytest.raises(AttarError, match="teacher_dim: 96"):
        run(bad, student, [teacher], x, y)


def test_feature_2d_uses_linear_projector():
    student, teacher = mlp(0, hidden=5), mlp(1, hidden=9)
    obj = build_objective({"name": "feature", "student_layer": "1", "teacher_layer": "1"})
    obj.setup(student, [teacher], C, 8)
    assert tuple(obj.projector.weight.shape) == (9, 5)
    x, y = batch_for("mlp")
    out, _ = run(obj, student, [teacher], x, y)
    fs, ft = student[1](student[0](x)), teacher[1](teacher[0](x))
    assert torch.allclose(out["feature"], F.mse_loss(obj.projector(fs), ft).detach(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- nd


def test_nd_loss_decreases_when_features_align_and_grow_to_teacher_norm():
    c = torch.tensor([[1.0, 0.0, 0.0]])
    ft = torch.tensor([[2.0, 2.0, 1.0]])  # ‖f_t‖ = 3
    r = 3 / math.sqrt(2)  # same norm, rotating toward the class mean
    off = nd_loss(torch.tensor([[0.0, 3.0, 0.0]]), ft, c)
    half = nd_loss(torch.tensor([[r, r, 0.0]]), ft, c)
    on = nd_loss(torch.tensor([[3.0, 0.0, 0.0]]), ft, c)
    assert off > half > on  # direction term: aligning with the class mean lowers the loss
    assert on.item() == pytest.approx(0.0, abs=1e-6)
    norms = [nd_loss(torch.tensor([[r, 0.0, 0.0]]), ft, c).item() for r in (0.5, 1.5, 3.0, 6.0)]
    assert norms[0] > norms[1] > norms[2] == pytest.approx(0.0)  # norm grows toward ‖f_t‖ ...
    assert norms[3] == pytest.approx(0.0)  # ... and is not pushed beyond (hinge: no divergence)


def test_nd_objective_centers_projector_and_freezing():
    student, teacher = mlp(0, hidden=5), mlp(1, hidden=7)
    obj = build_objective({"name": "nd", "beta": 1.0, "center_epochs": 1})
    obj.setup(student, [teacher], C, 16)
    assert tuple(obj.projector.weight.shape) == (7, 5) and tuple(obj.center_sum.shape) == (C, 7)
    x, y = batch_for("mlp", n=12)
    y[:3] = -1  # unlabeled rows use the teacher's argmax class
    out, _ = run(obj, student, [teacher], x, y)
    ft = teacher[1](teacher[0](x))
    cls = torch.where(y >= 0, y, teacher(x).argmax(-1))
    for k in range(C):
        if (cls == k).any():
            assert torch.allclose(obj.centers()[k], ft[cls == k].mean(0), atol=1e-6)
    assert obj.center_count.sum().item() == 12
    assert {"nd", "direction", "norm_ratio", "kd", "ce"} <= set(out)
    obj.on_epoch_end(0, 3)
    before = obj.center_sum.clone()
    run(obj, student, [teacher], x, y)
    assert torch.equal(obj.center_sum, before)  # frozen after center_epochs


# ---------------------------------------------------------------------------------- all objectives

ALL_SPECS = [
    ({"name": "ce"}, "mlp", False),
    ({"name": "kd", "temperature": 2.0}, "mlp", True),
    ({"name": "label_free"}, "mlp", True),
    ({"name": "ensemble"}, "mlp", True),
    ({"name": "pskd"}, "mlp", False),
    ({"name": "dho"}, "mlp", True),
    ({"name": "feature", "student_layer": "1", "teacher_layer": "4"}, "conv", True),
    ({"name": "nd"}, "mlp", True),
    ({"name": "kd", "divergence": "sinkhorn_batch"}, "mlp", True),
]


@pytest.mark.parametrize("spec,kind,teach", ALL_SPECS, ids=lambda v: v["name"] if isinstance(v, dict) else None)
def test_every_objective_backprops_to_student_and_own_params_not_teacher(spec, kind, teach):
    if kind == "conv":
        student, teachers = conv_student(), [conv_teacher()]
    else:
        student = mlp(0, hidden=5)
        teachers = [mlp(1, hidden=7), mlp(2, hidden=7)] if spec["name"] == "ensemble" else [mlp(1, hidden=7)]
    obj = build_objective(spec)
    assert obj.needs_teacher == teach
    obj.setup(student, teachers, C, 16)
    x, y = batch_for(kind)
    y[0] = -1
    for epoch in range(2):  # second pass exercises pskd's soft targets / nd's frozen centers
        student.zero_grad()
        for t in teachers:
            t.zero_grad()
        out, _ = run(obj, student, teachers if teach else [], x, y, teacher_grad=True)
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        obj.on_epoch_end(epoch, 2)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for t in teachers:
        assert all(p.grad is None for p in t.parameters()), "gradient leaked into the teacher"
    own = [p for p in obj.parameters()]
    if spec["name"] in ("dho", "feature", "nd"):
        assert own and all(p.grad is not None for p in own), "objective parameters get no gradient"
    # The objective never owns the student's or the teacher's weights.
    ids = {id(p) for m in [student, *teachers] for p in m.parameters()}
    assert not ids & {id(p) for p in own}
    assert obj.finalize(student) is not None


# ------------------------------------------------------------------------------------------ errors


def test_registry_and_field_errors():
    assert set(OBJECTIVES.names()) >= {"ce", "kd", "label_free", "ensemble", "pskd", "dho", "feature", "nd"}
    with pytest.raises(AttarError, match="Known objectives: ce, dho"):
        build_objective({"name": "distil"})
    with pytest.raises(AttarError, match="mapping with a 'name'"):
        build_objective({"temperature": 2})
    with pytest.raises(AttarError) as e:
        build_objective({"name": "kd", "temprature": 2})
    msg = str(e.value)
    assert "unknown field 'temprature'" in msg and "temperature (float > 0, default 4.0)" in msg
    with pytest.raises(AttarError, match=r"field 'alpha' = 1.5: .*less than or equal to 1"):
        build_objective({"name": "kd", "alpha": 1.5})
    with pytest.raises(AttarError, match="missing required field 'student_layer'"):
        build_objective({"name": "feature", "teacher_layer": "x"})
    with pytest.raises(AttarError, match="not a known divergence; expected one of .*kl"):
        build_objective({"name": "kd", "divergence": "hellinger"})
    with pytest.raises(AttarError, match=r"divergence 'kl' does not accept 'beta'"):
        build_objective({"name": "kd", "divergence_args": {"beta": 0.2}})
    with pytest.raises(AttarError, match="unknown field 'beta'.*"):
        build_objective({"name": "kd", "beta": 0.2})  # beta is not a kl parameter
    obj = build_objective({"name": "kd", "divergence": "gjsd", "beta": 0.2})  # flat divergence param
    assert obj.p.divergence_args == {"beta": 0.2}
    obj = build_objective({"name": "kd", "divergence": "skew_kl", "alpha": 0.3, "divergence_args": {"alpha": 0.1}})
    assert obj.p.alpha == 0.3 and obj.p.divergence_args == {"alpha": 0.1}  # clash: nest it
    with pytest.raises(AttarError, match="needs teacher logits"):
        build_objective({"name": "kd"})(Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long),
                                              torch.arange(2), None), torch.randn(2, C))
    with pytest.raises(AttarError, match="do not match"):
        build_objective({"name": "kd"})(Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long),
                                              torch.arange(2), torch.randn(2, C + 1)), torch.randn(2, C))


def test_objective_fields_for_docs():
    for name in OBJECTIVES.names():
        fields = objective_fields(name)
        assert all({"type", "default", "required", "description"} <= set(d) for d in fields.values())
    assert objective_fields("pskd")["alpha_T"]["default"] == 0.8
    assert objective_fields("feature")["loss"]["type"] == "'mse' | 'cosine'"
    assert objective_fields("feature")["student_layer"]["required"]


# ------------------------------------------------------------------------------------ one way to configure


def test_objectives_are_built_through_the_one_registry_from_their_own_files():
    from attar.distill import dho, feature, kd, pskd
    from attar.train.objective import CE, OBJECTIVES as TRAIN_OBJECTIVES

    assert TRAIN_OBJECTIVES is OBJECTIVES
    where = {"ce": CE, "kd": kd.KD, "label_free": kd.LabelFree, "ensemble": kd.Ensemble, "pskd": pskd.PSKD,
             "dho": dho.DHO, "feature": feature.FeatureKD, "nd": feature.ND}
    for name, cls in where.items():
        assert OBJECTIVES.get(name) is cls and cls.name == name
    # feature and nd share one hooked base; both need the teacher live, DHO (a student-side hook) does not
    assert issubclass(feature.FeatureKD, feature.HookedKD) and issubclass(feature.ND, feature.HookedKD)
    assert feature.FeatureKD.needs_live_teacher and feature.ND.needs_live_teacher
    assert not dho.DHO.needs_live_teacher
    a = OBJECTIVES.build({"name": "kd", "alpha": 0.2, "divergence": "gjsd", "beta": 0.3})
    b = build_objective({"name": "kd", "alpha": 0.2, "divergence_args": {"beta": 0.3}, "divergence": "gjsd"})
    assert type(a) is type(b) is kd.KD and a.p == b.p and a.p.divergence_args == {"beta": 0.3}
    assert OBJECTIVES.fields("kd") == objective_fields("kd")
    assert list(objective_fields("kd"))[:2] == ["alpha", "temperature"]  # the listing leads with the weight


def test_divergence_args_are_checked_at_configuration_naming_the_field():
    with pytest.raises(AttarError) as e:
        build_objective({"name": "kd", "divergence": "sinkhorn", "n_iters": 2.5})
    msg = str(e.value)
    assert "field 'divergence_args'" in msg and "divergence 'sinkhorn': field 'n_iters' = 2.5" in msg
    assert "Accepted fields: alpha" in msg
    with pytest.raises(AttarError, match=r"divergence 'gjsd' does not accept 'epsilon'\. Accepted parameters: beta"):
        build_objective({"name": "label_free", "divergence": "gjsd", "divergence_args": {"epsilon": 1.0}})
    # a flat key that is the objective's own field stays there; label_free has no alpha, so skew_kl's is flat
    lf = build_objective({"name": "label_free", "divergence": "skew_kl", "alpha": 0.3})
    assert lf.p.divergence_args == {"alpha": 0.3}
    with pytest.raises(AttarError, match=r"field 'temperature' = nan"):
        build_objective({"name": "kd", "temperature": float("nan")})


def test_an_objective_subclass_needs_no_params_and_no_registration():
    from attar.train.objective import Objective

    class Plain(Objective):
        def forward(self, batch, logits):
            return {"loss": logits.sum()}

    p = Plain()
    assert p.p.model_dump() == {} and p.name == ""
