"""Evidence for the merge route on real data, written to docs/evidence.md (mean ± std over seeds).

    .venv/bin/python bench/merge_evidence.py                      # every section, 3 seeds
    .venv/bin/python bench/merge_evidence.py --only soups         # one section: soups, soups-indomain, multitask, ttm, eft
    .venv/bin/python bench/merge_evidence.py --quick --no-write   # smoke test (tiny, not for the doc)

Sections (each writes its own marked block of docs/evidence.md as soon as it finishes):

* ``merge-soups``: the pretrained ``mnist-cnn`` fine-tuned to Fashion-MNIST with 7
  hyper-parameter settings; best single ingredient (chosen on validation), uniform
  soup, greedy soup (validation-driven), all scored on the test split.
* ``merge-soups-indomain``: the same with a Fashion-MNIST ConvNet pre-trained by attar
  on half the rows and fine-tuned on all of them (ingredients stay close together).
* ``merge-multitask``: one shared ``mnist-cnn`` backbone fine-tuned on 4 tasks
  (Fashion-MNIST classes 0-4 and 5-9, MNIST digits 0-4 and 5-9), each with its own
  5-way head; FusionBench-style table of merged backbones (λ / density chosen on validation;
  RegMean / RegMean++ Grams on each task's training rows; AdaMerging's λ learned on the
  unlabeled test inputs), forgetting per merge, and FusionBench's ordering checked.
* ``merge-ttm``: T³ / T³_B test-time merging of a corruption-trained generalist and
  a clean-fine-tuned expert ConvNet, on clean and shifted (noise, blur, inversion)
  Fashion-MNIST test images.
* ``merge-eft``: emulated fine-tuning (logit arithmetic) with a large and a small
  ConvNet, for a fine-tuning that corrects a class-prior shift and one that adapts
  to a new input domain (inverted images).

CPU only; about 30 minutes on 2 cores for everything. Data come from attar's
built-in loaders (``fashion-mnist``, ``mnist-5k``); every model is trained by
attar's trainer through :func:`attar.merge.finetune`.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

from attar.data import load_data
from attar.merge import (
    EmulatedFineTune,
    TestTimeMerge,
    accuracy_evaluator,
    finetune,
    fisher_estimator,
    fisher_merge,
    greedy_soup,
    merge_state_dicts,
    state_dicts,
    static_interpolation,
)
from attar.merge.methods import adamerging_merge, input_grams, regmean_merge, regmean_plusplus_merge
from attar.merge.methods._state import weighted_average
from attar.merge.methods.adamerging import entropy, task_batches
from attar.models import build_model
from attar.specs import DataSpec
from attar.train.trainer import predict

DOC = Path(__file__).resolve().parent.parent / "docs" / "evidence.md"
TITLE = "Evidence"
CMD = ".venv/bin/python bench/merge_evidence.py"


# ---------------------------------------------------------------- small helpers


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(-1) == y).float().mean())


def ms(values: list[float], pct: bool = True) -> str:
    """mean ± std (population std over seeds), as percentages."""
    k = 100.0 if pct else 1.0
    if len(values) == 1:
        return f"{k * values[0]:.2f}"
    return f"{k * statistics.fmean(values):.2f} ± {k * statistics.pstdev(values):.2f}"


def effect(diffs: list[float]) -> str:
    """A difference over seeds in points, flagged when it is within the seed-to-seed spread (or under 0.1 point)."""
    m, sd = 100 * statistics.fmean(diffs), 100 * (statistics.pstdev(diffs) if len(diffs) > 1 else 0.0)
    text = f"{m:+.2f} ± {sd:.2f} points"
    if abs(m) <= max(2 * sd, 0.1):
        text += " (no effect at this scale: within the spread over seeds)"
    return text


def diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def env_line(args) -> str:
    return (f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
            f"{len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))}); mean ± std over seeds")


def write(args, key: str, body: str) -> None:
    print(body, flush=True)
    if not args.no_write:
        replace_section(DOC, key, body, TITLE)


def class_subset(x: torch.Tensor, y: torch.Tensor, classes: list[int], limit: int | None = None):
    keep = torch.zeros_like(y, dtype=torch.bool)
    for c in classes:
        keep |= y == c
    x, y = x[keep], y[keep]
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    y = remap[y]
    return (x[:limit], y[:limit]) if limit else (x, y)


# ---------------------------------------------------------------- 1. model soups

SOUP_SETTINGS = [  # name, train config, objective
    ("AdamW lr 1e-3", {"lr": 1e-3}, None),
    ("AdamW lr 3e-4", {"lr": 3e-4}, None),
    ("AdamW lr 2e-3", {"lr": 2e-3}, None),
    ("weight decay 0.05", {"lr": 1e-3, "weight_decay": 0.05}, None),
    ("label smoothing 0.1", {"lr": 1e-3}, {"name": "ce", "label_smoothing": 0.1}),
    ("crop augmentation", {"lr": 1e-3, "augment": ["crop"]}, None),
    ("SGD lr 0.03", {"optimizer": "sgd", "lr": 0.03}, None),
]


def _soups(args, key: str, make_pre: Callable, intro: str, pre_label: str) -> None:
    rows: dict[str, list[float]] = {k: [] for k in ("pre", "best", "uniform", "greedy", "n_greedy", "oracle")}
    per_setting: dict[str, list[float]] = {s[0]: [] for s in SOUP_SETTINGS}
    t0 = time.perf_counter()
    for seed in args.seeds:
        b = load_data(DataSpec(name="fashion-mnist", train_limit=args.soup_rows, seed=seed))
        xv, yv = b.val.x[: args.val_rows], b.val.y[: args.val_rows]
        xt, yt = b.test.x[: args.test_rows], b.test.y[: args.test_rows]
        pre = make_pre(b, seed)
        rows["pre"].append(acc(pre, xt, yt))
        ingredients = []
        for i, (name, cfg, obj) in enumerate(SOUP_SETTINGS):
            m = finetune(pre, b.train.x, b.train.y, {"epochs": args.soup_epochs, "batch_size": 128, **cfg},
                         seed=1000 * seed + i, objective=obj, name=f"soup-{i}")
            ingredients.append(m)
            per_setting[name].append(acc(m, xt, yt))
            print(f"  seed {seed} ingredient {name}: test {per_setting[name][-1]:.4f}", flush=True)
        sds = state_dicts(ingredients)
        ev = accuracy_evaluator(pre, xv, yv)
        val_scores = [ev(sd) for sd in sds]
        best = max(range(len(sds)), key=lambda i: val_scores[i])
        rows["best"].append(per_setting[SOUP_SETTINGS[best][0]][-1])
        rows["oracle"].append(max(per_setting[s[0]][-1] for s in SOUP_SETTINGS))
        uniform = copy.deepcopy(pre)
        uniform.load_state_dict(weighted_average(sds))
        rows["uniform"].append(acc(uniform, xt, yt))
        g = greedy_soup(sds, ev, scores=val_scores)
        greedy = copy.deepcopy(pre)
        greedy.load_state_dict(g.state_dict)
        rows["greedy"].append(acc(greedy, xt, yt))
        rows["n_greedy"].append(len(g.info["ingredients"]))
        print(f"  seed {seed}: best {rows['best'][-1]:.4f} uniform {rows['uniform'][-1]:.4f} "
              f"greedy {rows['greedy'][-1]:.4f} ({rows['n_greedy'][-1]} kept)", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    n = len(SOUP_SETTINGS)
    lines = [
        intro,
        "",
        f"Fine-tuning: {args.soup_rows:,} Fashion-MNIST training rows, {args.soup_epochs} epochs, batch 128, cosine schedule, "
        f"{n} hyper-parameter settings (one ingredient each). The best single ingredient and the greedy soup's choices use "
        f"validation accuracy ({args.val_rows:,} rows carved from train); all numbers are accuracy (%) on {args.test_rows:,} "
        f"Fashion-MNIST test images. {env_line(args)}; {minutes:.0f} min.",
        "",
        "| model | test accuracy (%) |",
        "|---|---|",
        f"| {pre_label} | {ms(rows['pre'])} |",
    ]
    lines += [f"| ingredient: {name} | {ms(v)} |" for name, v in per_setting.items()]
    lines += [
        f"| **best single ingredient** (by validation) | {ms(rows['best'])} |",
        f"| (best ingredient by test, an oracle) | {ms(rows['oracle'])} |",
        f"| **uniform soup** ({n} ingredients) | {ms(rows['uniform'])} |",
        f"| **greedy soup** ({statistics.fmean(rows['n_greedy']):.1f} ingredients kept on average) | {ms(rows['greedy'])} |",
    ]
    lines += [
        "",
        f"Reading: greedy soup − best single ingredient {effect(diff(rows['greedy'], rows['best']))}; uniform soup − best "
        f"single ingredient {effect(diff(rows['uniform'], rows['best']))} (differences per seed, then mean ± std). "
        "Greedy-soup ingredients kept per seed: " + ", ".join(str(int(v)) for v in rows["n_greedy"]) + ".",
        "",
        f"Reproduce: `{CMD} --only {'soups' if key == 'merge-soups' else 'soups-indomain'}`",
    ]
    write(args, key, "\n".join(lines))


def soups(args) -> None:
    """Transfer: the digits model fine-tuned to clothes (large moves away from the pretrained weights)."""
    _soups(
        args, "merge-soups", lambda b, seed: build_model({"pretrained": "mnist-cnn"}, b.input_shape, 10),
        "## Model soups (transfer): one pretrained model, several fine-tunes, averaged\n\n"
        "The pretrained `mnist-cnn` (trained on MNIST digits, 390k parameters) fine-tuned to Fashion-MNIST.",
        "pretrained `mnist-cnn`, not fine-tuned",
    )


def soups_indomain(args) -> None:
    """In-domain: a Fashion-MNIST ConvNet pre-trained by attar on half the rows, fine-tuned on all of them."""

    def make_pre(b, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        init = build_model({"arch": "convnet", "width": 32, "depth": 3}, b.input_shape, 10, b.mean, b.std)
        half = len(b.train.x) // 2
        return finetune(init, b.train.x[:half], b.train.y[:half], {"epochs": 3, "batch_size": 128, "lr": 2e-3}, seed=seed,
                        name="pretrain")

    _soups(
        args, "merge-soups-indomain", make_pre,
        "## Model soups (in-domain): a Fashion-MNIST ConvNet, several fine-tunes, averaged\n\n"
        f"A ConvNet (width 32, depth 3, 24k parameters) pre-trained by attar on half of the {args.soup_rows:,} training rows "
        "(3 epochs, AdamW lr 2e-3), then fine-tuned on all of them.",
        "pre-trained ConvNet, not fine-tuned",
    )


# ---------------------------------------------------------------- 2. multi-task merging

TASKS = [  # name, data set, classes, training rows per task
    ("Fashion 0-4", "fashion-mnist", [0, 1, 2, 3, 4]),
    ("Fashion 5-9", "fashion-mnist", [5, 6, 7, 8, 9]),
    ("MNIST 0-4", "mnist-5k", [0, 1, 2, 3, 4]),
    ("MNIST 5-9", "mnist-5k", [5, 6, 7, 8, 9]),
]
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
HEAD = "net.classifier."


def _task_model(pre: nn.Module, n_classes: int, seed: int) -> nn.Module:
    m = copy.deepcopy(pre)
    torch.manual_seed(seed)
    m.net.classifier = nn.Linear(m.net.classifier.in_features, n_classes)
    m.num_classes = n_classes
    return m


class MultiHead(nn.Module):
    """The shared backbone (a task model with its head removed) plus every task's own head: called on
    ``(x, t)`` it returns task t's logits. AdaMerging's entropy then sees each task through its own head,
    as in FusionBench (the heads are identical in the base and every model, so their task vectors are 0)."""

    def __init__(self, task_model: nn.Module, heads: list[dict]):
        super().__init__()
        self.backbone = copy.deepcopy(task_model)
        self.backbone.net.classifier = nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(h[HEAD + "weight"].shape[1], h[HEAD + "weight"].shape[0]) for h in heads)

    def forward(self, batch: tuple) -> torch.Tensor:
        x, t = batch
        return self.heads[t](self.backbone(x))


def _tagged(x: torch.Tensor, t: int, seed: int):
    """Task t's unlabeled rows as endless shuffled batches (attar's own AdaMerging stream), tagged with t."""
    for b in task_batches(x, 16, seed, t):
        yield b, t


def _multihead_sd(bb: dict, heads: list[dict]) -> dict:
    out = {"backbone." + k: v for k, v in bb.items()}
    for i, h in enumerate(heads):
        out.update({f"heads.{i}.{k[len(HEAD):]}": v for k, v in h.items()})
    return out


def _forgetting(res: dict, m: str, names: list[str]) -> str:
    drops = [statistics.fmean(res["individual"][t][s] - res[m][t][s] for t in names) for s in range(len(res[m]["avg"]))]
    worst = max(names, key=lambda t: statistics.fmean(diff(res["individual"][t], res[m][t])))
    return f"{ms(drops)} ({worst} {100 * statistics.fmean(diff(res['individual'][worst], res[m][worst])):.2f})"


def _objective_vs_accuracy(final: dict, ta_ent: list[float], ta_acc: list[float], mode: str) -> str:
    lower_ent = statistics.fmean(final["ent"]) < statistics.fmean(ta_ent)
    d = statistics.fmean(final["acc"]) - statistics.fmean(ta_acc)
    return (f"{mode.capitalize()}-wise AdaMerging ends with {'lower' if lower_ent else 'higher'} entropy than task "
            f"arithmetic and {'higher' if d > 0 else 'lower'} accuracy ({100 * d:+.2f} points)"
            + (": here lower entropy does not mean higher accuracy." if lower_ent and d < 0 else "."))


def _ordering(res: dict, label: dict) -> list[str]:
    """FusionBench's ordering (data-aware > TIES > task arithmetic > uniform), checked on the means; each step's
    per-seed difference is flagged when its mean does not exceed the std over seeds."""
    data_aware = ["regmean", "regmean_plusplus", "adamerging_task", "adamerging_layer", "fisher"]
    best = max(data_aware, key=lambda m: statistics.fmean(res[m]["avg"]))
    chain = [best, "ties", "task_arithmetic", "uniform"]
    short = {m: label[m].split(" (")[0] for m in chain}
    steps, holds = [], True
    for hi, lo in zip(chain, chain[1:]):
        d = diff(res[hi]["avg"], res[lo]["avg"])
        m, sd = 100 * statistics.fmean(d), 100 * (statistics.pstdev(d) if len(d) > 1 else 0.0)
        ok = m > 0
        holds &= ok
        verdict = ("holds" if ok else "does NOT hold") + (", beyond the seed std" if abs(m) > sd else ", within the seed std")
        steps.append(f"{short[hi]} − {short[lo]} {m:+.2f} ± {sd:.2f} points ({verdict})")
    versus = "; ".join(f"{label[m].split(' (')[0]} {effect(diff(res[m]['avg'], res['ties']['avg']))}" for m in data_aware)
    fb = {"task_arithmetic": 68.0, "ties": 72.2, "regmean": 82.4, "regmean_plusplus": 84.4, "adamerging_layer": 82.6,
          "individual": 90.3}
    ours = {k: 100 * statistics.fmean(res[k]["avg"]) for k in fb}
    return [
        f"Ordering (computed from the table; data-aware = the best of RegMean, RegMean++, AdaMerging, Fisher on the mean, "
        f"here {short[best]}): data-aware > TIES > task arithmetic > uniform **{'holds' if holds else 'does not hold'}** "
        f"on the means. Steps (paired per-seed differences, mean ± std): " + "; ".join(steps) + ". "
        f"Each data-aware method − TIES: {versus}.",
        "",
        "FusionBench (8 tasks, CLIP-ViT-B/32, average %) vs this table: "
        + "; ".join(f"{label[k].split(' (')[0]} {fb[k]:.1f} vs {ours[k]:.2f}" for k in fb)
        + ". FusionBench's gaps: TIES − task arithmetic +4.2, RegMean++ − TIES +12.2, individual − RegMean++ +5.9 points; "
        f"here: {ours['ties'] - ours['task_arithmetic']:+.2f}, {ours['regmean_plusplus'] - ours['ties']:+.2f}, "
        f"{ours['individual'] - ours['regmean_plusplus']:+.2f}.",
    ]


def multitask(args) -> None:
    names = [t[0] for t in TASKS]
    methods = ["individual", "pretrained", "uniform", "task_arithmetic", "ties", "dare", "fisher",
               "regmean", "regmean_plusplus", "adamerging_task", "adamerging_layer"]
    ada_info: dict[str, list] = {"adamerging_task": [], "adamerging_layer": []}
    probe: dict[str, dict[int, dict[str, list[float]]]] = {"task": {}, "layer": {}}
    ent: dict[str, list[float]] = {"task_arithmetic": []}
    res: dict[str, dict[str, list[float]]] = {m: {t: [] for t in names + ["avg"]} for m in methods}
    chosen: dict[str, list[float]] = {"task_arithmetic": [], "ties": [], "dare": []}
    rm_layers: set[str] = set()
    t0 = time.perf_counter()
    for seed in args.seeds:
        pre = build_model({"pretrained": "mnist-cnn"}, (1, 28, 28), 10)
        bundles = {
            "fashion-mnist": load_data(DataSpec(name="fashion-mnist", train_limit=2 * args.mt_rows, seed=seed)),
            "mnist-5k": load_data(DataSpec(name="mnist-5k", seed=seed)),
        }
        tasks, fts, templates = [], [], []
        for i, (name, ds, classes) in enumerate(TASKS):
            b = bundles[ds]
            tr = class_subset(b.train.x, b.train.y, classes, args.mt_rows)
            va = class_subset(b.val.x, b.val.y, classes, args.val_rows // 2)
            te = class_subset(b.test.x, b.test.y, classes, args.test_rows // 2)
            tmpl = _task_model(pre, len(classes), 100 * seed + i)
            ft = finetune(tmpl, *tr, {"epochs": args.mt_epochs, "batch_size": 64, "lr": 1e-3}, seed=100 * seed + i, name=name)
            tasks.append((tr, va, te))
            fts.append(ft)
            templates.append(tmpl)
            print(f"  seed {seed} task {name}: {len(tr[0])} train rows, fine-tuned test {acc(ft, *te):.4f}", flush=True)
        ft_sds = state_dicts(fts)
        backbone = [k for k in ft_sds[0] if not k.startswith(HEAD)]
        pre_bb = {k: v for k, v in pre.state_dict().items() if k in backbone}
        bbs = [{k: sd[k] for k in backbone} for sd in ft_sds]
        heads = [{k: v for k, v in sd.items() if k.startswith(HEAD)} for sd in ft_sds]
        val_ev = [accuracy_evaluator(templates[i], *tasks[i][1]) for i in range(len(TASKS))]
        test_ev = [accuracy_evaluator(templates[i], *tasks[i][2]) for i in range(len(TASKS))]

        def score(bb: dict, evs) -> list[float]:
            return [evs[i]({**bb, **heads[i]}) for i in range(len(TASKS))]

        def record(method: str, per_task: list[float]) -> None:
            for t, v in zip(names, per_task):
                res[method][t].append(v)
            res[method]["avg"].append(statistics.fmean(per_task))

        record("individual", [test_ev[i](ft_sds[i]) for i in range(len(TASKS))])
        record("pretrained", score(pre_bb, test_ev))
        record("uniform", score(weighted_average(bbs), test_ev))

        def searched(method: str, make: Callable[[float], dict]) -> dict:
            best_l, best_v, best_bb = None, -1.0, None
            for lam in LAMBDAS:
                bb = make(lam)
                v = statistics.fmean(score(bb, val_ev))
                if v > best_v:
                    best_l, best_v, best_bb = lam, v, bb
            chosen[method].append(best_l)
            record(method, score(best_bb, test_ev))
            return best_bb

        def test_entropy(bb: dict) -> float:
            """AdaMerging's objective on the whole test inputs: Σ over tasks of the mean prediction entropy."""
            st, total = _multihead_sd(bb, heads), 0.0
            with torch.no_grad():
                for i in range(len(TASKS)):
                    x = tasks[i][2][0]
                    total += sum(len(c) * float(entropy(functional_call(mh, st, ((c, i),)))) for c in x.split(1000)) / len(x)
            return total

        ta_bb = searched("task_arithmetic", lambda lam: merge_state_dicts("task_arithmetic", bbs, pre_bb, parameters={"lambda": lam}))
        searched("ties", lambda lam: merge_state_dicts(
            "ties", bbs, pre_bb, parameters={"lambda": lam, "density": args.ties_density, "normalize": False}))
        searched("dare", lambda lam: merge_state_dicts(
            "dare_linear", bbs, pre_bb, parameters={"lambda": lam, "density": args.dare_density}, seed=seed))
        fishers = []
        for i, ft in enumerate(fts):
            est = fisher_estimator(tasks[i][0][0], max_examples=args.fisher_examples, batch_size=8,
                                   include=lambda n: not n.startswith(HEAD))
            fishers.append(est(ft))
        record("fisher", score(fisher_merge(bbs, fishers).state_dict, test_ev))
        # RegMean: Grams of each fine-tuned model's linear-layer inputs on its own training rows (FusionBench:
        # 256 rows, reduce_non_diagonal_ratio 0.95); only backbone keys are merged, so the heads' Grams go unused.
        grams = [input_grams(ft, tasks[i][0][0], max_examples=args.regmean_examples, batch_size=32)
                 for i, ft in enumerate(fts)]
        rm = regmean_merge(bbs, grams, alpha=args.regmean_alpha)
        rm_layers.update(rm.info["regmean"])
        record("regmean", score(rm.state_dict, test_ev))
        rpp = regmean_plusplus_merge(fts, [tasks[i][0][0] for i in range(len(TASKS))], alpha=args.regmean_alpha,
                                     examples=args.regmean_examples, batch_size=32)
        record("regmean_plusplus", score({k: rpp.state_dict[k] for k in backbone}, test_ev))
        # AdaMerging: λ learned by entropy minimisation on each task's UNLABELED test inputs, through its own head.
        # The shorter runs (same seed, so the first steps of the same trajectory) diagnose the step count; they
        # are reported, never used to pick a row (that would read test labels).
        mh = MultiHead(templates[0], heads)
        mh_base = _multihead_sd(pre_bb, heads)
        mh_sds = [_multihead_sd(bb, heads) for bb in bbs]
        ent["task_arithmetic"].append(test_entropy(ta_bb))
        for mode in ("task", "layer"):
            for steps in [*args.ada_probe_steps, args.ada_steps]:
                streams = [_tagged(tasks[i][2][0], i, seed) for i in range(len(TASKS))]
                ada = adamerging_merge(mh, mh_base, mh_sds, streams, mode=mode, init=0.3, lr=args.ada_lr,
                                       steps=steps, batch_size=16, seed=seed)
                bb = {k: ada.state_dict["backbone." + k] for k in backbone}
                per_task = score(bb, test_ev)
                probe[mode].setdefault(steps, {"acc": [], "ent": []})
                probe[mode][steps]["acc"].append(statistics.fmean(per_task))
                probe[mode][steps]["ent"].append(test_entropy(bb))
            lam = torch.tensor(ada.info["lambdas"])
            ada_info["adamerging_" + mode].append((lam.mean(-1) if mode == "layer" else lam).tolist())
            record("adamerging_" + mode, per_task)
        print(f"  seed {seed}: " + "  ".join(f"{m} {res[m]['avg'][-1]:.4f}" for m in methods), flush=True)
    minutes = (time.perf_counter() - t0) / 60
    label = {
        "individual": "individual fine-tuned (one model per task)",
        "pretrained": "pretrained backbone + each task's head",
        "uniform": "uniform average of the fine-tuned backbones",
        "task_arithmetic": "task arithmetic (λ on validation)",
        "ties": f"TIES (density {args.ties_density}, sum, λ on validation)",
        "dare": f"DARE (density {args.dare_density}, rescaled, task arithmetic, λ on validation)",
        "fisher": f"Fisher merging (diagonal Fisher, {args.fisher_examples} training rows per task)",
        "regmean": f"RegMean (α {args.regmean_alpha}, Grams on {args.regmean_examples} own training rows; closed form for "
                   f"the backbone's linear layer{'s' if len(rm_layers) != 1 else ''} {', '.join(sorted(rm_layers))}, "
                   "its 3 convolutions averaged)",
        "regmean_plusplus": "RegMean++ (as RegMean, Grams taken on the merged-so-far model: here the averaged convolutions)",
        "adamerging_task": f"AdaMerging task-wise (entropy on unlabeled test inputs, {args.ada_steps} Adam steps, lr {args.ada_lr:g})",
        "adamerging_layer": f"AdaMerging layer-wise (entropy on unlabeled test inputs, {args.ada_steps} Adam steps, lr {args.ada_lr:g})",
    }
    lines = [
        "## Multi-task merging: one backbone, four tasks, one merged model",
        "",
        f"The pretrained `mnist-cnn` backbone fine-tuned (all layers, AdamW lr 1e-3, {args.mt_epochs} epochs) on four 5-way tasks "
        f"made from the real data sets, each with its own new head; up to {args.mt_rows:,} training rows per task. The merged "
        "backbone is scored with each task's own fine-tuned head (FusionBench's protocol, with heads kept per task). "
        f"λ is chosen from {{0.1, …, 1.0}} by average validation accuracy; accuracy (%) on the test split "
        f"(up to {args.test_rows // 2:,} rows per task). {env_line(args)}; {minutes:.0f} min.",
        "",
        "| method | " + " | ".join(names) + " | average | forgetting (points) |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for m in methods:
        lines.append(f"| {label[m]} | " + " | ".join(ms(res[m][t]) for t in names) + f" | **{ms(res[m]['avg'])}** | "
                     + ("—" if m == "individual" else _forgetting(res, m, names)) + " |")
    merged = ["uniform", "task_arithmetic", "ties", "dare", "fisher", "regmean", "regmean_plusplus",
              "adamerging_task", "adamerging_layer"]
    best = max(merged, key=lambda m: statistics.fmean(res[m]["avg"]))
    lines += [
        "",
        "Forgetting: each task's drop from its own fine-tune (the individual row), averaged over the 4 tasks, then mean ± "
        "std over seeds; in brackets the task with the largest mean drop and its drop.",
        "",
        "λ chosen: " + "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in chosen.items()) + " (per seed). "
        "AdaMerging's learned λ (init 0.3, per task; layer-wise: mean over the parameter tensors), per seed: "
        + "; ".join(f"{k.split('_')[1]}-wise " + " / ".join("[" + ", ".join(f"{v:.2f}" for v in lam) + "]" for lam in vs)
                    for k, vs in ada_info.items()) + ".",
        "",
        "Coverage: attar's RegMean merges `nn.Linear` weights in closed form; the `mnist-cnn` backbone has one linear "
        "layer (`net.hidden.0`, 1152→256) after three convolutions, which RegMean averages (as FusionBench does for "
        "non-linear modules). RegMean++ applies: with one backbone linear layer it differs from RegMean only in taking "
        "that layer's Grams behind the already-averaged convolutions rather than each model's own. AdaMerging learns "
        "task arithmetic's coefficients on the 4 tasks' test inputs without their labels (the paper's and FusionBench's "
        "transductive setting), each task through its own head, batch 16 per task per step, λ initialised at 0.3.",
        "",
        "AdaMerging's objective against accuracy (summed mean entropy of the 4 tasks' test predictions, nats; accuracy "
        f"%): task arithmetic at its validation λ: entropy {ms(ent['task_arithmetic'], pct=False)}, accuracy "
        f"{ms(res['task_arithmetic']['avg'])}; AdaMerging "
        + "; ".join(f"{mode}-wise " + ", ".join(f"after {st} steps: entropy {ms(v['ent'], pct=False)}, accuracy {ms(v['acc'])}"
                                                 for st, v in sorted(probe[mode].items())) for mode in probe)
        + ". The shorter runs are the same trajectories' first steps, shown as a diagnostic only (choosing the step "
        "count by them would read test labels); the rows above use FusionBench's step count. "
        + " ".join(_objective_vs_accuracy(probe[mode][args.ada_steps], ent["task_arithmetic"], res["task_arithmetic"]["avg"], mode)
                   for mode in probe),
        "",
        *_ordering(res, label),
        "",
        f"Reading: the best merged backbone is {label[best].split(' (')[0]} ({ms(res[best]['avg'])} average), "
        f"{effect(diff(res[best]['avg'], res['individual']['avg']))} from the individual fine-tuned models and "
        f"{effect(diff(res[best]['avg'], res['uniform']['avg']))} from the uniform average. Versus task arithmetic: "
        + "; ".join(f"{label[m].split(' (')[0]} {effect(diff(res[m]['avg'], res['task_arithmetic']['avg']))}"
                    for m in ("ties", "dare", "fisher", "regmean", "regmean_plusplus", "adamerging_task",
                              "adamerging_layer")) + ".",
        "",
        f"Reproduce: `{CMD} --only multitask`",
    ]
    write(args, "merge-multitask", "\n".join(lines))


# ---------------------------------------------------------------- 3. test-time merging (T³)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Per-image Gaussian blur (5x5 kernel), sigma a scalar or one value per image."""
    n, c = x.shape[:2]
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(n)
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [n*c, 1, 5, 5]
    out = F.conv2d(F.pad(x.reshape(1, n * c, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), k2, groups=n * c)
    return out.reshape(x.shape)


SHIFTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "clean": lambda x, g: x,
    "noise σ=0.3": lambda x, g: (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "blur σ=1.5": lambda x, g: gaussian_blur(x, 1.5),
    "inversion": lambda x, g: 1.0 - x,
}


def corrupt_augment(p: float = 0.5) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Training-time corruptions for the generalist: each row, with probability p, gets noise, blur or inversion."""

    def aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = len(x)
        pick = torch.where(torch.rand(n, generator=g) < p, torch.randint(0, 3, (n,), generator=g), torch.full((n,), -1))
        sigma_n = 0.1 + 0.4 * torch.rand(n, generator=g)
        sigma_b = 0.5 + 1.5 * torch.rand(n, generator=g)
        noise = torch.randn(x.shape, generator=g)
        out = x.clone()
        m = pick == 0
        out[m] = (x[m] + sigma_n[m, None, None, None] * noise[m]).clamp(0, 1)
        m = pick == 1
        if m.any():
            out[m] = gaussian_blur(x[m], sigma_b[m])
        m = pick == 2
        out[m] = 1.0 - x[m]
        return out

    return aug


def _mixed(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image gets one of the four conditions at random: a stream whose shift changes from image to image."""
    pick = torch.randint(0, 4, (len(x),), generator=g)
    out = x.clone()
    for i, fn in enumerate([SHIFTS["clean"], SHIFTS["noise σ=0.3"], SHIFTS["blur σ=1.5"], SHIFTS["inversion"]]):
        m = pick == i
        out[m] = fn(x[m], g)
    return out


def _batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> tuple[float, float]:
    """Accuracy of a TestTimeMerge fed ``bs`` rows at a time, and its mean λ."""
    preds, lams = [], []
    for i in range(0, len(x), bs):
        preds.append(model(x[i : i + bs]).argmax(-1))
        lams.append(model.last_lambda.float().reshape(-1).mean() * len(preds[-1]))
    return float((torch.cat(preds) == y).float().mean()), float(sum(lams)) / len(x)


def _mean4(per_cond: dict[str, list[float]]) -> list[float]:
    """Per seed, the mean over the four conditions (not the mixed stream)."""
    return [statistics.fmean(v) for v in zip(*(per_cond[c] for c in SHIFTS))]


SCALES = [1, 2, 5, 10, 20, 50]
STATIC = [i / 10 for i in range(11)]


def ttm(args) -> None:
    methods = ["generalist", "expert", "static", "static_val", "t3", "t3b", "t3_val", "t3b_val"]
    conds = list(SHIFTS) + ["mixed"]
    res = {m: {s: [] for s in conds} for m in methods}
    lams = {m: {s: [] for s in conds} for m in ("t3", "t3b", "t3_val")}
    picked: dict[str, list[float]] = {"static": [], "scale": []}
    t0 = time.perf_counter()
    spec = {"arch": "convnet", "width": args.ttm_width, "depth": 3}
    fns = dict(SHIFTS, mixed=_mixed)
    for seed in args.seeds:
        b = load_data(DataSpec(name="fashion-mnist", train_limit=args.ttm_rows, seed=seed))
        torch.manual_seed(seed)
        init = build_model(spec, b.input_shape, 10, b.mean, b.std)
        gen = finetune(init, b.train.x, b.train.y, {"epochs": args.ttm_gen_epochs, "batch_size": 128, "lr": 2e-3},
                       augment=corrupt_augment(), seed=seed, name="generalist")
        exp = finetune(gen, b.train.x, b.train.y, {"epochs": args.ttm_exp_epochs, "batch_size": 128, "lr": 1e-3},
                       seed=seed + 1, name="expert")

        def interp(lam: float) -> nn.Module:
            m = copy.deepcopy(exp)
            m.load_state_dict(static_interpolation(exp.state_dict(), gen.state_dict(), lam))
            return m

        # Validation: the four conditions applied to validation images (carved from train); the mean accuracy
        # over them picks the static λ and the T³ scale, so both get the same tuning budget.
        xv, yv = b.val.x[: args.val_rows], b.val.y[: args.val_rows]
        val_sets = [fn(xv, torch.Generator().manual_seed(100 + seed)) for fn in SHIFTS.values()]
        best_static = max(STATIC, key=lambda lam: statistics.fmean(acc(interp(lam), x, yv) for x in val_sets))
        best_scale = max(SCALES, key=lambda sc: statistics.fmean(
            _batched(TestTimeMerge(gen, exp, scale=sc).eval(), x, yv, args.ttm_batch)[0] for x in val_sets))
        picked["static"].append(best_static)
        picked["scale"].append(best_scale)
        fixed = {"generalist": gen, "expert": exp, "static": interp(0.5), "static_val": interp(best_static)}
        merging = {
            "t3": TestTimeMerge(gen, exp, mode="sample").eval(),
            "t3b": TestTimeMerge(gen, exp, mode="batch").eval(),
            "t3_val": TestTimeMerge(gen, exp, mode="sample", scale=best_scale).eval(),
            "t3b_val": TestTimeMerge(gen, exp, mode="batch", scale=best_scale).eval(),
        }
        xt, yt = b.test.x[: args.test_rows], b.test.y[: args.test_rows]
        for cond, fn in fns.items():
            x = fn(xt, torch.Generator().manual_seed(seed))
            for name, m in fixed.items():
                res[name][cond].append(acc(m, x, yt))
            for name, m in merging.items():
                a, lam = _batched(m, x, yt, args.ttm_batch)
                res[name][cond].append(a)
                if name in lams:
                    lams[name][cond].append(lam)
        print(f"  seed {seed} (static λ {best_static}, T³ scale {best_scale}): " + "; ".join(
            f"{c}: " + " ".join(f"{m} {res[m][c][-1]:.3f}" for m in methods) for c in conds), flush=True)
    minutes = (time.perf_counter() - t0) / 60
    label = {
        "generalist": "generalist (trained with corruptions)",
        "expert": "expert (generalist fine-tuned on clean images)",
        "static": "static interpolation, λ = 0.5",
        "static_val": "static interpolation, λ chosen on validation",
        "t3": "**T³** (per-image λ, scale 1)",
        "t3b": f"**T³_B** (one λ per batch of {args.ttm_batch}, scale 1)",
        "t3_val": "**T³**, scale chosen on validation",
        "t3b_val": "**T³_B**, scale chosen on validation",
    }
    lines = [
        "## Test-time merging (T³): generalist and expert, interpolated per input",
        "",
        f"ConvNet (width {args.ttm_width}, depth 3) on Fashion-MNIST ({args.ttm_rows:,} training rows). The *generalist* is trained "
        f"{args.ttm_gen_epochs} epochs with half of each batch corrupted (Gaussian noise σ∈[0.1, 0.5], Gaussian blur σ∈[0.5, 2], "
        f"or inversion); the *expert* is the generalist fine-tuned {args.ttm_exp_epochs} epochs on clean images only. "
        "T³ gives the generalist the weight λ = min(1, scale · JSD(p_generalist ‖ p_expert) / ln 2) per test image and evaluates "
        "the interpolated weights with one vectorised `functional_call` per image, no back-propagation; T³_B uses the batch's "
        "mean λ. *mixed* gives every test image one of the four conditions at random (the shift changes within a batch). "
        f"Static λ (from {{0, 0.1, …, 1}}) and T³'s scale (from {{{', '.join(map(str, SCALES))}}}) are tuned the same way: mean "
        f"accuracy over the four conditions on {args.val_rows:,} validation images. Accuracy (%) on {args.test_rows:,} test "
        f"images per condition. {env_line(args)}; {minutes:.0f} min.",
        "",
        "| method | " + " | ".join(conds) + " | mean of the 4 conditions |",
        "|---|" + "---|" * (len(conds) + 1),
    ]
    for m in methods:
        per = [res[m][c] for c in conds]
        mean4 = [statistics.fmean(v) for v in zip(*per[:4])]
        lines.append(f"| {label[m]} | " + " | ".join(ms(v) for v in per) + f" | {ms(mean4)} |")
    lines += [
        "",
        "Chosen on validation, per seed: static λ " + ", ".join(f"{v:g}" for v in picked["static"])
        + "; T³ scale " + ", ".join(f"{v:g}" for v in picked["scale"]) + ".",
        "Mean λ (the generalist's weight) used by T³ at scale 1: " + "; ".join(
            f"{c} {statistics.fmean(lams['t3'][c]):.3f}" for c in conds)
        + ". At the tuned scale: " + "; ".join(f"{c} {statistics.fmean(lams['t3_val'][c]):.3f}" for c in conds) + ".",
        "",
        "Reading (differences per seed, then mean ± std): T³ at scale 1 − expert, mean of the 4 conditions: "
        f"{effect(diff(_mean4(res['t3']), _mean4(res['expert'])))}; tuned T³ − tuned static interpolation, mean of the 4 "
        f"conditions: {effect(diff(_mean4(res['t3_val']), _mean4(res['static_val'])))}, on *mixed*: "
        f"{effect(diff(res['t3_val']['mixed'], res['static_val']['mixed']))}; tuned T³ (per image) − tuned T³_B (per batch) "
        f"on *mixed*: {effect(diff(res['t3_val']['mixed'], res['t3b_val']['mixed']))}; tuned T³ − expert on clean: "
        f"{effect(diff(res['t3_val']['clean'], res['expert']['clean']))}.",
        "",
        f"Reproduce: `{CMD} --only ttm`",
    ]
    write(args, "merge-ttm", "\n".join(lines))


# ---------------------------------------------------------------- 4. emulated fine-tuning (logit arithmetic)


def eft(args) -> None:
    scen = ["prior", "domain"]
    methods = ["small_base", "small_ft", "large_base", "eft", "large_ft"]
    res = {s: {m: [] for m in methods} for s in scen}
    t0 = time.perf_counter()
    large_spec = {"arch": "convnet", "width": 32, "depth": 3}
    small_spec = {"arch": "mlp", "hidden": [32]}
    for seed in args.seeds:
        b = load_data(DataSpec(name="fashion-mnist", train_limit=args.eft_rows, seed=seed))
        x, y = b.train.x, b.train.y
        g = torch.Generator().manual_seed(seed)
        xt, yt = b.test.x[: args.test_rows], b.test.y[: args.test_rows]
        # "Pre-training" data for the prior scenario: classes 5-9 kept at 5% (a skewed label prior).
        keep = (y < 5) | (torch.rand(len(y), generator=g) < 0.05)
        half = len(x) // 2
        for s in scen:
            if s == "prior":
                pre_x, pre_y = x[:half][keep[:half]], y[:half][keep[:half]]
                ft_x, ft_y = x[half:][: args.eft_ft_rows], y[half:][: args.eft_ft_rows]
                test_x = xt
            else:
                pre_x, pre_y = x[:half], y[:half]
                ft_x, ft_y = 1.0 - x[half:][: args.eft_ft_rows], y[half:][: args.eft_ft_rows]
                test_x = 1.0 - xt
            models = {}
            for size, spec in (("small", small_spec), ("large", large_spec)):
                torch.manual_seed(seed)
                init = build_model(spec, b.input_shape, 10, b.mean, b.std)
                base = finetune(init, pre_x, pre_y, {"epochs": args.eft_epochs, "batch_size": 128, "lr": 2e-3}, seed=seed)
                ft = finetune(base, ft_x, ft_y, {"epochs": args.eft_epochs, "batch_size": 64, "lr": 1e-3}, seed=seed + 1)
                models[f"{size}_base"], models[f"{size}_ft"] = base, ft
            models["eft"] = EmulatedFineTune(models["large_base"], models["small_ft"], models["small_base"])
            for m in methods:
                res[s][m].append(acc(models[m], test_x, yt))
            print(f"  seed {seed} {s}: " + " ".join(f"{m} {res[s][m][-1]:.3f}" for m in methods), flush=True)
    minutes = (time.perf_counter() - t0) / 60
    label = {
        "small_base": "small base (MLP, 32 hidden)",
        "small_ft": "small fine-tuned",
        "large_base": "large base (ConvNet width 32)",
        "eft": "**EFT**: large base + (small fine-tuned − small base)",
        "large_ft": "large fine-tuned (what EFT emulates)",
    }
    lines = [
        "## Logit fusion: emulated fine-tuning (EFT) with a small and a large model",
        "",
        "EFT combines log-probabilities, log p_large-base + (log p_small-ft − log p_small-base), renormalised: the small "
        "model's fine-tuning *change* is applied to the large model without fine-tuning it. Two fine-tunings on Fashion-MNIST: "
        f"**prior**: the bases see half of {args.eft_rows:,} training rows with classes 5-9 cut to 5% (a skewed label prior), "
        f"the fine-tune {args.eft_ft_rows:,} balanced rows; **domain**: the bases see clean images, the fine-tune "
        f"{args.eft_ft_rows:,} inverted images (tested on inverted images). {args.eft_epochs} epochs each. "
        f"Accuracy (%) on {args.test_rows:,} test images. {env_line(args)}; {minutes:.0f} min.",
        "",
        "| model | prior (balanced test) | domain (inverted test) |",
        "|---|---|---|",
    ]
    for m in methods:
        lines.append(f"| {label[m]} | {ms(res['prior'][m])} | {ms(res['domain'][m])} |")
    lines.append("")
    for sc, name in (("prior", "Prior"), ("domain", "Domain")):
        r = res[sc]
        closed = [(e - lb) / (lf - lb) if abs(lf - lb) > 1e-9 else float("nan")
                  for e, lb, lf in zip(r["eft"], r["large_base"], r["large_ft"])]
        lines.append(
            f"Reading, {name.lower()}: EFT − large base {effect(diff(r['eft'], r['large_base']))}; EFT − small fine-tuned "
            f"{effect(diff(r['eft'], r['small_ft']))}; EFT closes {100 * statistics.fmean(closed):.0f}% of the gap between "
            "the large base and the large fine-tuned model (mean over seeds)."
        )
    lines += ["", f"Reproduce: `{CMD} --only eft`"]
    write(args, "merge-eft", "\n".join(lines))


SECTIONS = {"soups": soups, "soups-indomain": soups_indomain, "multitask": multitask, "ttm": ttm, "eft": eft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/evidence.md alone")
    ap.add_argument("--val-rows", type=int, default=2000)
    ap.add_argument("--test-rows", type=int, default=10000)
    ap.add_argument("--soup-rows", type=int, default=6000)
    ap.add_argument("--soup-epochs", type=int, default=2)
    ap.add_argument("--mt-rows", type=int, default=2500)
    ap.add_argument("--mt-epochs", type=int, default=2)
    ap.add_argument("--ties-density", type=float, default=0.2)
    ap.add_argument("--dare-density", type=float, default=0.3)
    ap.add_argument("--fisher-examples", type=int, default=256)
    ap.add_argument("--regmean-examples", type=int, default=256, help="rows per task for RegMean's Grams (FusionBench: 256)")
    ap.add_argument("--regmean-alpha", type=float, default=0.95, help="RegMean's reduce_non_diagonal_ratio (FusionBench CLIP: 0.95)")
    ap.add_argument("--ada-steps", type=int, default=1000, help="AdaMerging Adam steps (FusionBench: 1000)")
    ap.add_argument("--ada-probe-steps", default="100,300", help="shorter AdaMerging runs reported as a diagnostic")
    ap.add_argument("--ada-lr", type=float, default=1e-3, help="AdaMerging learning rate (FusionBench: 1e-3)")
    ap.add_argument("--ttm-rows", type=int, default=10000)
    ap.add_argument("--ttm-width", type=int, default=16)
    ap.add_argument("--ttm-gen-epochs", type=int, default=4)
    ap.add_argument("--ttm-exp-epochs", type=int, default=3)
    ap.add_argument("--ttm-batch", type=int, default=128)
    ap.add_argument("--eft-rows", type=int, default=12000)
    ap.add_argument("--eft-ft-rows", type=int, default=2000)
    ap.add_argument("--eft-epochs", type=int, default=3)
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.ada_probe_steps = [int(s) for s in args.ada_probe_steps.split(",") if s]
    if args.quick:
        args.seeds = args.seeds[:1]
        args.no_write = True
        for k, v in dict(val_rows=300, test_rows=600, soup_rows=600, soup_epochs=1, mt_rows=300, mt_epochs=1,
                         fisher_examples=16, regmean_examples=32, ada_steps=20, ada_probe_steps=[5], ttm_rows=800, ttm_gen_epochs=1, ttm_exp_epochs=1, eft_rows=1200,
                         eft_ft_rows=300, eft_epochs=1).items():
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
