"""Classifier teacher stores (attar.distill.cls_store): one stored teacher pass read by distillation, data selection
and condensed-set relabelling; dump resumable; stores made on other rows / for another model kind refused by name."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from attar.data.teacher_store import TeacherStore
from attar.distill.cls_store import StoredClassifierTeacher, dump_classifier_teacher, relabel_condensed
from attar.distill.objectives import build_objective
from attar.errors import AttarError
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer
from tests.tiny_task import digits

C = 10


def teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, C))
    with torch.no_grad():
        m[2].weight.mul_(4)  # peaky, so the top-k and the tail differ
    return m


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x[:300], y[:300]


def dump(t, x, out, **kw):
    kw.setdefault("progress", False)
    return dump_classifier_teacher(t, x, out, classes=[str(i) for i in range(C)], **kw)


def test_full_k_f32_store_reads_back_the_teachers_log_probs(data, tmp_path):
    x, _ = data
    t = teacher()
    st = dump(t, x, tmp_path / "s", values="f32", shard_rows=128)
    assert st.settings.kind == "classifier" and st.settings.width == 1 and st.settings.k == C
    assert len(st.manifest.shards) == 3 and st.manifest.positions == 300
    r = StoredClassifierTeacher(tmp_path / "s")
    live = torch.log_softmax(t(x).detach(), -1)
    idx = torch.tensor([0, 299, 5, 128])
    assert torch.allclose(r.log_probs(idx), live[idx], atol=1e-6)
    # tau * l is the teacher's logits up to a per-row shift, so every temperature's softmax matches
    assert torch.allclose(torch.softmax(r.logits(idx) / 4, -1), torch.softmax(t(x[idx]).detach() / 4, -1), atol=1e-6)


def test_quantised_topk_store_keeps_each_log_prob_within_step_and_spreads_the_tail(data, tmp_path):
    x, _ = data
    t = teacher(1)
    dump(t, x, tmp_path / "s", k=3, temperature=2.0)
    r = StoredClassifierTeacher(tmp_path / "s")
    live = torch.log_softmax(t(x).detach() / 2, -1)
    lp = r.log_probs(torch.arange(300))
    top, ind = live.topk(3, -1)
    assert (lp.gather(1, ind) - top).abs().max() <= 1 / 16 + 1e-3  # the module doc's bound (step + tail rounding)
    p = lp.exp()
    assert torch.allclose(p.sum(1), torch.ones(300), atol=1e-3)
    other = p.scatter(1, ind, float("nan"))
    rest = other[~other.isnan()].view(300, C - 3)
    assert torch.allclose(rest, rest[:, :1].expand_as(rest), rtol=1e-5)  # the tail spread evenly
    assert torch.allclose(rest.sum(1), 1 - top.exp().sum(1), atol=2e-3)


def test_dump_resumes_after_a_kill_and_writes_the_same_shards(data, tmp_path):
    x, _ = data
    t = teacher()

    def kill(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dump(t, x, tmp_path / "a", shard_rows=100, on_shard=kill)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert not m["complete"] and [s["file"] for s in m["shards"]] == ["shard-00000.zst", "shard-00001.zst"]
    with pytest.raises(AttarError, match="did not finish"):
        TeacherStore.open(tmp_path / "a")
    written = []
    dump(t, x, tmp_path / "a", shard_rows=100, on_shard=written.append)
    assert written == [2]  # only the missing shard
    dump(t, x, tmp_path / "b", shard_rows=100)
    for i in range(3):
        f = f"shard-{i:05d}.zst"
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def _kd(x, y, teachers=(), cache=None, steps=6):
    torch.manual_seed(3)
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, C))
    cfg = TrainConfig(steps=steps, batch_size=32, lr=0.05, optimizer="sgd", schedule="constant", device="cpu",
                      weight_decay=0.0)
    obj = build_objective({"name": "kd", "temperature": 4.0, "alpha": 0.3})
    res = Trainer(student, obj, x, y, cfg, seed=5, teachers=list(teachers), teacher_cache=cache, progress=False).fit()
    return torch.cat([p.detach().flatten() for p in res.model.parameters()])


def test_kd_from_a_full_store_equals_kd_from_the_live_teacher_and_topk_is_close(data, tmp_path):
    x, y = data
    t = teacher()
    torch.manual_seed(3)
    w0 = torch.cat([p.detach().flatten() for p in nn.Sequential(nn.Linear(64, 16), nn.ReLU(),
                                                                 nn.Linear(16, C)).parameters()])
    live = _kd(x, y, teachers=[t])
    dump(t, x, tmp_path / "full", values="f32")
    stored = _kd(x, y, cache=StoredClassifierTeacher(tmp_path / "full"))
    assert (stored - live).abs().max() < 1e-5
    assert (live - w0).abs().max() > 1e-2  # it did train
    off = []  # distance to live KD, relative to the update, for a store keeping the top-k at the KD temperature
    for k in (2, 5, 9):
        dump(t, x, tmp_path / f"k{k}", k=k, temperature=4.0)
        approx = _kd(x, y, cache=StoredClassifierTeacher(tmp_path / f"k{k}"))
        off.append(float((approx - live).norm() / (live - w0).norm()))
    assert 0 < off[2] < 0.05 and off[2] < off[1] < off[0]  # measured: 0.42, 0.22, 0.011 (T=4 is a flat target)


def test_a_store_made_on_other_rows_or_for_an_lm_is_refused_by_name(data, tmp_path):
    x, _ = data
    dump(teacher(), x, tmp_path / "s", k=3)
    r = StoredClassifierTeacher(tmp_path / "s")
    with pytest.raises(AttarError, match="made on 300 rows .* has 299"):
        r.check(x=x[:299])
    with pytest.raises(AttarError, match="other rows"):
        r.check(x=x.flip(0))
    with pytest.raises(AttarError, match="holds 10 classes per row, the data has 3"):
        r.check(num_classes=3)
    with pytest.raises(AttarError, match="another class list"):
        r.check(classes=[str(9 - i) for i in range(C)])
    with pytest.raises(AttarError, match="temperature 1 and the objective softens at 4"):
        r.check(temperature=4.0)
    r.check(x=x, num_classes=C, temperature=1.0)  # the right rows pass
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["settings"]["kind"] = "lm"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AttarError, match="holds a lm's outputs"):
        StoredClassifierTeacher(tmp_path / "s")


def test_stored_teacher_selector_scores_equal_the_live_teachers_and_keep_the_unsure_rows(data, tmp_path):
    from attar.select import build_selector
    from attar.select.stored import stored_scores

    x, y = data
    t = teacher()
    dump(t, x, tmp_path / "s", values="f32")
    r = StoredClassifierTeacher(tmp_path / "s")
    lp = torch.log_softmax(t(x).detach().double(), -1)
    entropy = -(lp.exp() * lp).sum(1)
    p2 = lp.exp().topk(2, -1).values
    assert torch.allclose(stored_scores(r, "entropy").double(), entropy, atol=1e-5)
    assert torch.allclose(stored_scores(r, "margin").double(), p2[:, 0] - p2[:, 1], atol=1e-6)

    sel = build_selector({"name": "stored_teacher", "store": str(tmp_path / "s"), "keep": 0.2, "balanced": False})
    cfg = TrainConfig(epochs=1, batch_size=20, optimizer="sgd", device="cpu")
    tr = Trainer(nn.Linear(64, C), build_objective({"name": "ce"}), x, y, cfg, selector=sel, progress=False)
    rows = sel.epoch_rows(torch.randperm(300), 0, torch.Generator())
    assert len(rows) == 60 and tr.steps_per_epoch == 3
    assert set(rows.tolist()) == set(entropy.topk(60).indices.tolist())
    with pytest.raises(AttarError, match="cannot use the store .* made on 300 rows"):
        Trainer(nn.Linear(64, C), build_objective({"name": "ce"}), x[:200], y[:200], cfg,
                selector=build_selector({"name": "stored_teacher", "store": str(tmp_path / "s")}), progress=False)


def test_relabel_gives_a_condensed_set_the_stores_soft_labels(data, tmp_path):
    from attar.data.artifact import SyntheticSet, load_synthetic, save_synthetic

    x, y = data
    art = save_synthetic(tmp_path / "syn", SyntheticSet(x[:20].clone(), y[:20].clone(),
                                                        meta={"classes": [str(i) for i in range(C)], "ipc": 2}))
    t = teacher()
    with pytest.raises(AttarError, match="Dump the teacher on the condensed set itself"):
        relabel_condensed(art, dump(t, x, tmp_path / "real"))
    relabel_condensed(art, dump(t, x[:20], tmp_path / "on-syn", values="f32"))
    s = load_synthetic(art)
    assert torch.equal(s.y, y[:20]) and s.meta["ipc"] == 2 and s.meta["soft_label_store"]["k"] == C
    assert torch.allclose(torch.softmax(s.soft / 4, -1), torch.softmax(t(x[:20]).detach() / 4, -1), atol=1e-6)


def test_recipe_distills_from_a_store_and_refuses_one_made_on_other_rows(tmp_path):
    from attar.data import load_data
    from attar.models import build_model, save_model
    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe
    from attar.specs import DataSpec, ModelSpec

    spec = DataSpec(name="digits", train_limit=200)
    b = load_data(spec)
    torch.manual_seed(0)
    mspec = ModelSpec(arch="mlp", hidden=[32])
    t = build_model(mspec, b.input_shape, len(b.classes), mean=b.mean, std=b.std)
    save_model(tmp_path / "teacher", t, mspec, b.input_shape, len(b.classes), b.mean, b.std)
    dump_classifier_teacher(t, b.train.x, tmp_path / "store", classes=b.classes, progress=False)

    def recipe(limit):
        r = tmp_path / f"r{limit}.yaml"
        r.write_text(f"""name: stored
stages:
  - name: student
    kind: distill
    model: {{arch: mlp, hidden: [16]}}
    teacher: {{store: {tmp_path / 'store'}}}
    data: {{name: digits, train_limit: {limit}}}
    objective: {{name: kd, temperature: 4}}
    train: {{epochs: 1, batch_size: 50, device: cpu}}
""")
        return Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None)

    run = recipe(200).run()
    hist = json.loads((run / "student" / "history.json").read_text())
    assert hist and all(math.isfinite(h["train_loss"]) for h in hist if "train_loss" in h)
    assert "stored (top-10 of 10 log-probs" in (run / "report.md").read_text()  # the store, not a live teacher
    with pytest.raises(AttarError, match=r"stage 'student' \(teacher: \{store: .*\}\).*made on 200 rows.*has 211"):
        recipe(211).preflight()
    with pytest.raises(AttarError, match="reads the teacher's features"):
        r = tmp_path / "feat.yaml"
        r.write_text((tmp_path / "r200.yaml").read_text().replace("{name: kd, temperature: 4}",
                                                                  "{name: feature, student_layer: '1', teacher_layer: '1'}"))
        Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None).preflight()
    assert np.isfinite(StoredClassifierTeacher(tmp_path / "store").logits([0]).numpy()).all()


def test_cli_dumps_a_classifier_store_from_a_run_stage_folder_shows_it_and_relabels(tmp_path):
    from typer.testing import CliRunner

    from attar.cli import app
    from attar.data import load_data
    from attar.data.artifact import SyntheticSet, load_synthetic, save_synthetic
    from attar.models import build_model, save_model
    from attar.specs import DataSpec, ModelSpec

    b = load_data(DataSpec(name="digits", train_limit=120))
    torch.manual_seed(0)
    mspec = ModelSpec(arch="mlp", hidden=[16])
    t = build_model(mspec, b.input_shape, len(b.classes), mean=b.mean, std=b.std)
    save_model(tmp_path / "run" / "teacher" / "model", t, mspec, b.input_shape, len(b.classes), b.mean, b.std)
    runner = CliRunner()
    res = runner.invoke(app, ["teacher", "dump", "--model", str(tmp_path / "run" / "teacher"), "--data",
                              "{name: digits, train_limit: 120}", "--out", str(tmp_path / "s"), "--k", "4", "-q"])
    assert res.exit_code == 0, res.output
    assert "120 examples" in res.output and "top-4 of 10 classes" in res.output
    r = StoredClassifierTeacher(tmp_path / "s")
    r.check(x=b.train.x, classes=b.classes)
    assert r.store.settings.teacher == str(tmp_path / "run" / "teacher" / "model")
    res = runner.invoke(app, ["teacher", "show", str(tmp_path / "s")])
    assert res.exit_code == 0 and "classifier teacher" in res.output and "120 examples" in res.output
    res = runner.invoke(app, ["teacher", "dump", "--model", str(tmp_path / "run" / "teacher"), "--data", "digits",
                              "--out", str(tmp_path / "s"), "--k", "20", "-q"])
    assert res.exit_code != 0 and "k must be in [1, 10]" in res.output
    # a condensed set: dump on the artifact itself, then relabel it
    syn = save_synthetic(tmp_path / "syn", SyntheticSet(b.train.x[:10].clone(), b.train.y[:10].clone(),
                                                        meta={"data_spec": {"name": "digits", "train_limit": 120},
                                                              "classes": b.classes}))
    res = runner.invoke(app, ["teacher", "dump", "--model", str(tmp_path / "run" / "teacher"), "--data",
                              f"{{artifact: {syn}}}", "--out", str(tmp_path / "syn-store"), "--values", "f32", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["teacher", "relabel", str(syn), "--store", str(tmp_path / "syn-store")])
    assert res.exit_code == 0, res.output
    s = load_synthetic(syn)
    assert torch.allclose(torch.softmax(s.soft, -1), torch.softmax(t(b.train.x[:10]).detach(), -1), atol=1e-6)
    assert s.meta["soft_label_teacher"] == str(tmp_path / "run" / "teacher" / "model")
