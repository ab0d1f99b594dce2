"""Each selector's choice on hand-built cases, and its accounting through the trainer."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attar.errors import AttarError
from attar.train.objective import Batch, Objective
from attar.train.config import TrainConfig
from attar.select import build_selector
from attar.select.efficienttrain import low_pass
from attar.select.uds import nuclear_shares
from attar.train.trainer import Trainer
from tiny_task import CE, digits

pytestmark = pytest.mark.usefixtures("one_thread")


class KDish(Objective):
    needs_teacher = True

    def forward(self, batch, logits):
        return {"loss": nn.functional.cross_entropy(logits, batch.y)}


def _setup(sel, n=100, epochs=10, seed=0, objective=None, **extra):
    """Run ``setup`` with a stand-in trainer (what the selectors read from it)."""
    tr = SimpleNamespace(seed=seed, cfg=TrainConfig(epochs=epochs, batch_size=10), steps_per_epoch=1, accumulate=1, name="t",
                         objective=objective or CE(), x=torch.zeros(n, 1), y=torch.zeros(n, dtype=torch.long),
                         model=None, augment=None, **extra)
    sel.setup(tr)
    return sel


def _batch(n, c=4, y=None, teacher=None):
    return Batch(x=torch.zeros(n, 3), y=torch.zeros(n, dtype=torch.long) if y is None else y,
                 idx=torch.arange(n), teacher_logits=teacher)


# ---------------------------------------------------------------------------------------- high_loss
def test_high_loss_row_level_keeps_the_highest_loss_rows():
    sel = build_selector({"name": "high_loss", "keep": 0.25, "level": "row"})
    assert sel.candidates(4) == 16
    logits = torch.zeros(16, 3)
    y = torch.zeros(16, dtype=torch.long)
    logits[[3, 7, 11, 12], 1] = torch.tensor([5.0, 8.0, 6.0, 7.0])  # confidently wrong: the four highest losses
    logits[[0, 1], 0] = 3.0  # confidently right: lowest losses
    pos = sel.select(_batch(16, y=y), logits, 4)
    assert pos.tolist() == [3, 7, 11, 12]


def test_high_loss_batch_level_trains_on_the_hardest_whole_mini_batch():
    sel = build_selector({"name": "high_loss", "keep": 0.3})  # δ = round(1 / 0.3) = 3 candidate mini-batches
    assert sel.delta() == 3 and sel.candidates(4) == 12
    logits = torch.zeros(12, 2)
    y = torch.zeros(12, dtype=torch.long)
    logits[4:8, 1] = 2.0  # second mini-batch: all wrong, highest mean loss
    logits[0, 1] = 6.0  # one very hard row in the first mini-batch, but its mean stays lower
    logits[1:4, 0] = 9.0
    assert sel.select(_batch(12, y=y), logits, 4).tolist() == [4, 5, 6, 7]


def test_high_loss_unlabeled_rows_come_last():
    sel = build_selector({"name": "high_loss", "keep": 0.5, "level": "row"})
    y = torch.tensor([-1, 0, -1, 0])
    logits = torch.tensor([[0.0, 9.0], [0.0, 1.0], [0.0, 9.0], [1.0, 0.0]])
    assert sel.select(_batch(4, y=y), logits, 2).tolist() == [1, 3]


# ---------------------------------------------------------------------------------------- rs2
def test_rs2_covers_every_row_exactly_once_per_round_of_one_over_keep_epochs():
    sel = _setup(build_selector({"name": "rs2", "keep": 0.1}), n=100)
    order = torch.arange(100)
    rounds = []
    for r in range(2):
        rows = [sel.epoch_rows(order, r * 10 + e, torch.Generator()) for e in range(10)]
        assert all(len(x) == 10 for x in rows)
        rounds.append(torch.cat(rows))
        assert sorted(rounds[-1].tolist()) == list(range(100))  # each row exactly once in 10 epochs
    assert not torch.equal(rounds[0], rounds[1])  # a fresh permutation each round
    # without replacement inside a round even when keep does not divide 1: 0.3 -> 3 epochs of 30 distinct rows
    sel3 = _setup(build_selector({"name": "rs2", "keep": 0.3}), n=100)
    three = torch.cat([sel3.epoch_rows(order, e, torch.Generator()) for e in range(3)])
    assert len(three) == 90 and len(set(three.tolist())) == 90
    assert sel3.rows_per_epoch(100) == 30


def test_rs2_through_the_trainer_sees_every_row_once_per_round():
    x, y = digits()
    x, y = x[:400], y[:400]
    seen = []

    class Record(CE):
        def forward(self, batch, logits):
            seen.append(batch.idx.clone())
            return super().forward(batch, logits)

    cfg = TrainConfig(epochs=4, batch_size=20)
    res = Trainer(nn.Linear(64, 10), Record(), x, y, cfg, selector=build_selector({"name": "rs2", "keep": 0.25})).fit()
    assert res.steps == 4 * 5 and res.samples_seen == 400
    assert sorted(torch.cat(seen).tolist()) == list(range(400))


# ---------------------------------------------------------------------------------------- uds
def test_nuclear_shares_add_up_to_the_nuclear_norm_and_are_its_weight_derivative():
    z = torch.randn(12, 5, dtype=torch.float64)
    u = nuclear_shares(z).double()
    torch.testing.assert_close(u.sum(), torch.linalg.matrix_norm(z, "nuc"), rtol=1e-5, atol=1e-5)
    eps = 1e-6
    for i in (0, 7):
        w = torch.ones(12, 1, dtype=torch.float64)
        w[i] += eps
        fd = (torch.linalg.matrix_norm(w.sqrt() * z, "nuc") - torch.linalg.matrix_norm(z, "nuc")) / eps
        assert abs(float(fd) - float(u[i]) / 2) < 1e-4
    # rank-deficient batches (centred logits always are): unspanned directions contribute nothing
    c = z - z.mean(1, keepdim=True)
    torch.testing.assert_close(nuclear_shares(c).double().sum(), torch.linalg.matrix_norm(c, "nuc"), rtol=1e-5, atol=1e-5)


def test_uds_prefers_diverse_and_high_utility_rows():
    sel = _setup(build_selector({"name": "uds", "keep": 0.5, "weight": 0.0}))
    # six rows that all point to class 0, one row pointing to class 2 and one to class 3 (same size):
    # the two rows nobody else covers add most to the batch's nuclear norm
    logits = torch.zeros(8, 4)
    logits[:6, 0] = 4.0
    logits[6, 2] = 4.0
    logits[7, 3] = 4.0
    pos = sel.select(_batch(8), logits, 2)
    assert pos.tolist() == [6, 7]
    # among rows in distinct directions, the larger logits (utility) win
    logits = torch.diag(torch.tensor([1.0, 3.0, 2.0, 0.5]))
    sel2 = _setup(build_selector({"name": "uds", "keep": 0.5, "weight": 0.0}))
    assert sel2.select(_batch(4), logits, 2).tolist() == [1, 2]


def test_uds_buffer_steers_towards_rows_unlike_those_already_selected():
    sel = _setup(build_selector({"name": "uds", "keep": 0.5, "weight": 5.0, "buffer": 8}))
    a = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    sel.select(_batch(2), a, 2)  # buffer now holds the embeddings of classes 0 and 1
    assert sel.count == 2
    cand = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
    # equal utility everywhere: diversity against the buffer decides
    assert sel.select(_batch(4), cand, 2).tolist() == [2, 3]
    # FIFO: the buffer keeps the newest `buffer` rows
    for _ in range(5):
        sel.select(_batch(4), cand, 2)
    assert sel.count == 8 and sel.ptr == (2 + 2 + 5 * 2) % 8


def test_uds_views_scores_with_several_forwards_and_counts_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    sel = _setup(build_selector({"name": "uds", "keep": 0.5, "intra": "views", "views": 3}))
    b = Batch(x=torch.rand(8, 1, 4, 4), y=torch.zeros(8, dtype=torch.long), idx=torch.arange(8))
    out = sel.timed_select(b, model, 4)
    assert len(out.y) == 4
    assert sel.stats["scoring_forward_rows"] == 24 and sel.stats["candidate_rows"] == 8


# ---------------------------------------------------------------------------------------- disagreement
def test_disagreement_keeps_the_largest_divergence_rows():
    sel = build_selector({"name": "disagreement", "keep": 0.5, "temperature": 2.0})
    student = torch.zeros(6, 3)
    teacher = torch.zeros(6, 3)
    teacher[1, 0] = 6.0  # far
    teacher[4, 2] = 3.0  # medium
    teacher[5, 1] = 1.0  # near
    pos = sel.select(_batch(6, teacher=teacher), student, 3)
    assert pos.tolist() == [1, 4, 5]
    # an ensemble [T, B, C] is compared through its averaged probabilities
    ens = torch.stack([teacher, teacher])
    assert sel.select(_batch(6, teacher=ens), student, 2).tolist() == [1, 4]


def test_disagreement_needs_a_teacher_and_a_per_sample_divergence():
    with pytest.raises(AttarError, match="no teacher"):
        _setup(build_selector({"name": "disagreement"}), objective=CE())
    _setup(build_selector({"name": "disagreement"}), objective=KDish())
    with pytest.raises(AttarError, match="batch-wise"):
        build_selector({"name": "disagreement", "divergence": "sinkhorn_batch"})
    with pytest.raises(AttarError, match="Known divergences"):
        build_selector({"name": "disagreement", "divergence": "nope"})


# ---------------------------------------------------------------------------------------- prune
@pytest.mark.parametrize("score", ["random", "el2n", "loss", "forgetting"])
def test_prune_keeps_the_fraction_fixed_across_epochs(score):
    x, y = digits()
    torch.manual_seed(0)
    tr = Trainer(nn.Linear(64, 10), CE(), x, y, TrainConfig(epochs=2, batch_size=64),
                 selector=build_selector({"name": "prune", "keep": 0.3, "score": score, "probe_epochs": 1}))
    sel = tr.selector
    e0, e1 = tr._epoch_order(0), tr._epoch_order(1)
    assert len(e0) == len(e1) == 540  # ceil(0.3 * 1797)
    assert set(e0.tolist()) == set(e1.tolist()) and not torch.equal(e0, e1)  # same subset, reshuffled
    if score == "random":
        assert sel.stats["probe_train_rows"] == 0
    else:
        assert sel.stats["probe_train_rows"] == 1797
        kept, s = sel.kept, sel.row_scores
        for c in range(10):  # balanced (default): within each class, kept rows are the highest-scoring
            m = tr.y == c
            assert s[kept & m].min() >= s[~kept & m].max() - 1e-6
    counts = torch.bincount(tr.y[sel.kept], minlength=10)
    want = 0.3 * torch.bincount(tr.y, minlength=10)
    assert ((counts - want).abs() <= 1).all()  # the same fraction of every class


def test_prune_easy_keeps_the_lowest_scores_and_needs_labels():
    x, y = digits()
    tr = Trainer(nn.Linear(64, 10), CE(), x, y, TrainConfig(epochs=1, batch_size=64),
                 selector=build_selector({"name": "prune", "keep": 0.2, "score": "el2n", "keep_hardest": False,
                                          "probe_epochs": 1, "balanced": False}))
    tr._epoch_order(0)
    s, kept = tr.selector.row_scores, tr.selector.kept
    assert s[kept].max() <= s[~kept].min() + 1e-6 and int(kept.sum()) == math.ceil(0.2 * 1797)
    y2 = y.clone()
    y2[:10] = -1
    with pytest.raises(AttarError, match="score: random"):
        Trainer(nn.Linear(64, 10), KDish(), x, y2, TrainConfig(epochs=1), teachers=[nn.Linear(64, 10)],
                selector=build_selector({"name": "prune", "score": "el2n"}))


def test_balanced_quotas_add_up_and_follow_the_key_within_each_class():
    from attar.select.base import balanced_top, quotas

    assert quotas(torch.tensor([5, 3, 2]), 4).tolist() == [2, 1, 1]
    assert int(quotas(torch.tensor([7, 7, 7]), 10).sum()) == 10
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    key = torch.tensor([0.1, 0.9, 0.5, 0.2, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    # 5 of 10: class 0 gets 2 (its best: rows 1, 2), class 1 gets 3 (rows 4, 5, 6), although class 1's keys are all larger
    assert sorted(balanced_top(key, y, 5).tolist()) == [1, 2, 4, 5, 6]


# ---------------------------------------------------------------------------------------- efficienttrain
def test_low_pass_identity_at_full_bandwidth_and_removes_high_frequencies():
    x = torch.rand(3, 2, 8, 8)
    assert low_pass(x, 1.0) is x
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    img = (0.5 + 0.25 * (2 * checker - 1)).float().expand(1, 1, 8, 8)  # pure Nyquist pattern around 0.5
    torch.testing.assert_close(low_pass(img, 0.5), torch.full_like(img, 0.5), atol=1e-6, rtol=0)
    smooth = torch.linspace(0, 1, 8).expand(1, 1, 8, 8)
    assert (low_pass(smooth, 0.99) - smooth).abs().max() < 0.2  # most of a smooth ramp survives
    torch.testing.assert_close(low_pass(x, 0.3).mean((-1, -2)), x.mean((-1, -2)))  # the DC term is kept


def test_efficienttrain_bandwidth_widens_over_training():
    sel = _setup(build_selector({"name": "efficienttrain", "start_bandwidth": 0.4, "ramp": 0.5, "max_shift": 2}),
                 epochs=4)
    sel.micro_per_epoch = 10
    widths = []
    for epoch in range(4):
        sel.begin_micro(epoch, 0)
        widths.append(sel.bandwidth())
    assert widths[0] == pytest.approx(0.4) and widths[1] == pytest.approx(0.7) and widths[2:] == [1.0, 1.0]
    sel.begin_micro(3, 9)
    x = torch.rand(4, 1, 8, 8)
    out = sel.transform(Batch(x=x, y=torch.zeros(4, dtype=torch.long), idx=torch.arange(4)))
    assert out.x.shape == x.shape  # full bandwidth at the end, shifted by up to 2 px


def test_efficienttrain_augmentation_grows_over_training():
    sel = _setup(build_selector({"name": "efficienttrain", "start_bandwidth": 1.0, "max_shift": 2, "max_flip": 0.5,
                                 "max_noise": 0.3}), epochs=4)
    sel.micro_per_epoch = 10
    x = torch.rand(512, 1, 8, 8)
    b = Batch(x=x, y=torch.zeros(512, dtype=torch.long), idx=torch.arange(512))
    sel.begin_micro(0, 0)
    start, aug0 = sel.strength(), sel.augmentation()
    assert start == 0 and aug0 == {"shift": 0, "flip": 0.0, "noise": 0.0}
    assert sel.transform(b) is b  # no augmentation at the first step (and the full spectrum: start_bandwidth 1)
    strengths = []
    for epoch in range(4):
        sel.begin_micro(epoch, 5)
        strengths.append(sel.strength())
    assert strengths == sorted(strengths) and strengths[0] > start
    sel.begin_micro(3, 9)
    end, aug = sel.strength(), sel.augmentation()
    assert start < end == pytest.approx(39 / 40)
    assert aug["shift"] == 2 and aug["flip"] == pytest.approx(0.5 * end) and aug["noise"] == pytest.approx(0.3 * end)
    assert not torch.equal(sel.transform(b).x, x)
    noisy = _setup(build_selector({"name": "efficienttrain", "start_bandwidth": 1.0, "max_noise": 0.3,
                                   "augment_start": 0.5, "augment_ramp": 0.5}), epochs=4)
    noisy.micro_per_epoch = 10
    noisy.begin_micro(0, 0)
    assert noisy.strength() == 0.5
    torch.manual_seed(0)
    assert (noisy.transform(b).x - x).std() == pytest.approx(0.15, rel=0.05)
    noisy.begin_micro(2, 0)  # half-way: full strength from there on
    assert noisy.strength() == 1.0
    assert (noisy.transform(b).x - x).std() == pytest.approx(0.3, rel=0.05)


# ---------------------------------------------------------------------------------------- accounting
ALL_SPECS = [{"name": "uniform", "keep": 0.5}, {"name": "high_loss", "keep": 0.5}, {"name": "uds", "keep": 0.25},
             {"name": "rs2", "keep": 0.5}, {"name": "efficienttrain", "keep": 0.5, "max_noise": 0.1},
             {"name": "disagreement", "keep": 0.5}, {"name": "prune", "keep": 0.5},
             {"name": "prune", "keep": 0.5, "score": "el2n", "probe_epochs": 1},
             {"name": "stored_teacher", "keep": 0.5, "store": "(a store dumped in the test)"}]


def test_the_accounting_test_covers_every_registered_selector():
    from attar.select import SELECTORS

    assert {s["name"] for s in ALL_SPECS} == set(SELECTORS.names())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_selector_accounts_for_its_cost(spec, tmp_path):
    """Scoring forward passes, selection vs training wall time and samples seen, for every selector."""
    x, y = digits()
    x = x.view(-1, 1, 8, 8)
    if spec["name"] == "stored_teacher":  # a stored teacher pass over these rows
        from attar.distill.cls_store import dump_classifier_teacher

        torch.manual_seed(1)
        dump_classifier_teacher(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, tmp_path / "s", progress=False)
        spec = dict(spec, store=str(tmp_path / "s"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    kd = spec["name"] == "disagreement"
    res = Trainer(model, KDish() if kd else CE(), x, y, TrainConfig(epochs=1, batch_size=64),
                  teachers=[nn.Sequential(nn.Flatten(), nn.Linear(64, 10))] if kd else None,
                  selector=build_selector(spec)).fit()
    st = res.selection
    assert set(st) >= {"scoring_forward_rows", "score_seconds", "select_seconds", "train_seconds", "candidate_rows",
                       "trained_rows"}
    assert st["trained_rows"] == res.samples_seen == res.steps * 64
    assert st["select_seconds"] >= st["score_seconds"] >= 0 and st["train_seconds"] > 0
    assert st["select_seconds"] + st["train_seconds"] == pytest.approx(res.seconds)
    if spec["name"] in ("high_loss", "uds", "disagreement"):
        assert st["scoring_forward_rows"] == st["candidate_rows"] == res.steps * 64 / (spec["keep"])
        assert st["score_seconds"] > 0
    elif spec.get("score") == "el2n":
        assert st["scoring_forward_rows"] == len(y) and st["probe_train_rows"] == len(y)
        assert st["select_seconds"] >= st["probe_seconds"] > 0
    else:
        assert st["scoring_forward_rows"] == 0


def test_scoring_forward_runs_in_eval_mode_without_touching_batchnorm_stats():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    before = model[1].running_mean.clone()
    sel = _setup(build_selector({"name": "high_loss", "keep": 0.5, "level": "row"}))
    sel.timed_select(Batch(x=torch.randn(8, 4) + 3, y=torch.zeros(8, dtype=torch.long), idx=torch.arange(8)), model, 4)
    assert torch.equal(model[1].running_mean, before) and model.training


# ---------------------------------------------------------------------------------------- recipes
RECIPE = """\
name: select
seed: 1
data: {name: digits}
stages:
  - name: teacher
    kind: train
    model: {arch: mlp, hidden: [32]}
    selector: {name: uds, keep: 0.5, signal: error}
    train: {epochs: 2, batch_size: 32, lr: 0.003}
  - name: student
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [8]}
    selector: {name: disagreement, keep: 0.5, divergence: js}
    train: {epochs: 2, batch_size: 32, lr: 0.003}
  - name: pruned
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [8]}
    objective: {name: kd, alpha: 0.2}
    selector: {name: prune, keep: 0.3, score: el2n, probe_epochs: 1}
    train: {epochs: 2, batch_size: 32, lr: 0.003}
"""


def test_recipe_stages_with_selectors_report_their_cost(tmp_path):
    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    recipe, text = load_recipe(p)
    pipe = Pipeline(recipe, text, home=tmp_path / "home", log=lambda *a, **k: None)
    pipe.run()
    rows = {r["stage"]: r for r in pipe.rows}
    assert "scoring_forward_rows" in rows["teacher"]["selection"] and "probe_train_rows" in rows["pruned"]["selection"]
    from attar.data import load_data
    from attar.specs import DataSpec

    n = len(load_data(DataSpec(name="digits")).train.y)
    assert rows["pruned"]["samples"] == 2 * (math.ceil(0.3 * n) // 32) * 32  # the kept 30 % per epoch
    bad = RECIPE.replace("divergence: js", "divergence: sinkhorn_batch")
    p.write_text(bad)
    recipe, text = load_recipe(p)
    with pytest.raises(AttarError, match=r"stages\[1\].selector.*batch-wise"):
        Pipeline(recipe, text, home=tmp_path / "home2", log=lambda *a, **k: None).preflight()


def test_chunked_scoring_forward_equals_one_forward():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    sel = build_selector({"name": "uds", "keep": 0.5})
    b = Batch(x=torch.randn(10, 4), y=torch.zeros(10, dtype=torch.long), idx=torch.arange(10))
    whole = sel.score(b, model)
    sel.score_chunk = 3
    torch.testing.assert_close(sel.score(b, model), whole)
    assert sel.stats["scoring_forward_rows"] == 20


# ---------------------------------------------------------------------------------------- bad specs fail early
TABLE = """\
name: bad
seed: 0
data: {DATA}
stages:
  - name: teacher
    kind: train
    model: {arch: mlp, hidden: [8]}
    train: {epochs: 1, batch_size: 32}
  - name: s
    kind: KIND
    TEACHER
    model: {arch: mlp, hidden: [8]}
    selector: SELECTOR
    train: {epochs: 1, batch_size: 32}
"""


@pytest.fixture
def table_csv(tmp_path):
    import pandas as pd

    g = torch.Generator().manual_seed(0)
    df = pd.DataFrame({"a": torch.randn(200, generator=g).numpy(), "b": torch.randn(200, generator=g).numpy(),
                       "label": ["x", "y"] * 100})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return str(path)


def _recipe(selector, kind="train", data="{name: digits}"):
    teacher = "teacher: teacher" if kind == "distill" else ""
    return TABLE.replace("DATA", data.strip("{}")).replace("KIND", kind).replace("TEACHER", teacher) \
        .replace("SELECTOR", selector)


BAD = [
    ("{name: nope}", "train", None,
     r"stages\[1\]\.selector\): Unknown selector 'nope'\. Known selectors: disagreement, efficienttrain, "
     r"high_loss, prune, rs2, stored_teacher, uds, uniform"),
    ("{name: rs2, keep: 0}", "train", None, r"stages\[1\]\.selector.*field 'keep' = 0: Input should be greater than 0"
                                            r".*Accepted fields: keep"),
    ("{name: uds, keep: 1.5}", "train", None, r"field 'keep' = 1.5: Input should be less than or equal to 1"
                                              r".*Accepted fields: keep .*; weight"),
    ("{name: high_loss, delta: 3}", "train", None, r"unknown field 'delta'.*Accepted fields: keep .*; level"),
    ("{name: high_loss, level: rows}", "train", None, r"field 'level' = 'rows': Input should be 'batch' or 'row'"),
    ("{name: disagreement}", "train", None, r"stages\[1\]\.selector\): name: selector 'disagreement' compares the student "
                                            r"with its teacher.*no teacher.*needs no teacher: efficienttrain, high_loss"),
    ("{name: disagreement, divergence: nope}", "distill", None, r"divergence.*Known divergences"),
    ("{name: efficienttrain}", "train", "TABLE", r"selector 'efficienttrain' filters images.*\(2,\)"),
    ("{name: uds, intra: views}", "train", "TABLE", r"intra: selector 'uds' with intra: views.*choices: contribution"),
    ("{name: prune, score: el2n}", "distill", "{name: digits, labeled_per_class: 5}",
     r"score: selector 'prune' with score 'el2n' needs a label on every training row"),
]


@pytest.mark.parametrize("selector,kind,data,match", BAD, ids=[b[0] for b in BAD])
def test_bad_selector_specs_fail_in_preflight_naming_the_field(tmp_path, table_csv, selector, kind, data, match):
    from attar.pipeline import Pipeline
    from attar.recipe import parse_recipe

    data = {None: "{name: digits}", "TABLE": "{csv: %s}" % table_csv}.get(data, data)
    text = _recipe(selector, kind, data)
    recipe = parse_recipe(text)
    pipe = Pipeline(recipe, text, home=tmp_path / "home", log=lambda *a, **k: None)
    with pytest.raises(AttarError, match=match):
        pipe.preflight()
    with pytest.raises(AttarError, match=match):
        pipe.run()  # the run checks first: nothing is trained, no run folder is made
    assert not (tmp_path / "home").exists() or not any(p.is_dir() for p in (tmp_path / "home").iterdir())


@pytest.mark.parametrize("selector,kind,data", [("{name: disagreement, keep: 0.3}", "distill", None),
                                                ("{name: prune, score: el2n}", "train", "{name: digits, labeled_per_class: 5}"),
                                                ("{name: efficienttrain, max_flip: 0.5}", "train", None),
                                                ("{name: uds, intra: contribution}", "train", "TABLE")])
def test_good_selector_specs_pass_preflight(tmp_path, table_csv, selector, kind, data):
    from attar.pipeline import Pipeline
    from attar.recipe import parse_recipe

    data = {None: "{name: digits}", "TABLE": "{csv: %s}" % table_csv}.get(data, data)
    text = _recipe(selector, kind, data)
    Pipeline(parse_recipe(text), text, home=tmp_path / "home", log=lambda *a, **k: None).preflight()


def test_a_selector_without_a_name_fails_at_recipe_load():
    from attar.recipe import parse_recipe

    with pytest.raises(AttarError, match="selector"):
        parse_recipe(_recipe("{keep: 0.5}"))


# ---------------------------------------------------------------------------------------- hashing
def test_the_selector_is_part_of_the_checkpoint_config_hash(tmp_path):
    from attar.select import selector_spec_hash

    x, y = digits()
    cfg = TrainConfig(epochs=1, batch_size=64)

    def tr(spec, ckpt=None):
        return Trainer(nn.Linear(64, 10), CE(), x, y, cfg, selector=build_selector(spec), ckpt_dir=ckpt)

    hashes = {tr(s)._config_hash() for s in (None, {"name": "rs2", "keep": 0.5}, {"name": "rs2", "keep": 0.3},
                                             {"name": "uniform", "keep": 0.5}, {"name": "uds"})}
    assert len(hashes) == 5
    assert tr({"name": "uds"})._config_hash() == tr({"name": "uds", "keep": 0.5, "buffer": 1024})._config_hash()
    assert selector_spec_hash({"name": "uds"}) == selector_spec_hash({"name": "uds", "keep": 0.5})
    assert selector_spec_hash({"name": "uds"}) != selector_spec_hash({"name": "uds", "keep": 0.25})
    assert selector_spec_hash(None) is None
    tr({"name": "rs2", "keep": 0.5}, tmp_path / "ck").fit()
    with pytest.raises(AttarError, match="different training settings"):
        tr({"name": "rs2", "keep": 0.3}, tmp_path / "ck").fit(resume=True)
