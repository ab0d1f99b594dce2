"""Evidence for `attar condense`: Fashion-MNIST at 1 and 10 images per class, every row through the public API.

For each IPC: ``random`` (the protocol's random-subset row), ``herding`` (in the feature space of the
full-data reference net), ``dm``, ``datadam``, ``dc`` and ``dsa`` are condensed with :func:`attar.condense.condense`
and scored with :func:`attar.condense.evaluate_condensed` (fresh ConvNets trained by the Trainer,
DSA augmentation, test accuracy mean ± sample std). DM is also scored with soft labels from the
full-data reference net (a separate row: it carries a teacher's knowledge). The result tables go to
``docs/evidence.md`` (section ``condense-evidence``) and the raw numbers to
``bench/.runs/condense/results.json``.

    .venv/bin/python bench/condense_evidence.py            # ~1.5 h on this 2-core machine (1 torch thread)
    .venv/bin/python bench/condense_evidence.py --quick    # smoke test, a few minutes; never touches docs/
    .venv/bin/python bench/condense_evidence.py --from-json
    .venv/bin/python bench/condense_evidence.py --only mtt --ipc 1   # just these rows (cached for the next full run)

Every step is cached (artifacts and evaluation.json), so an interrupted run continues where it stopped.
Budgets are far below the papers' (see BUDGET and the doc text); the published numbers are shown
beside ours for orientation, not as a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

DOC = ROOT / "docs" / "evidence.md"
HOME = ROOT / "bench" / ".runs" / "condense"
CMD = ".venv/bin/python bench/condense_evidence.py"

MODEL = {"arch": "convnet", "width": 32, "depth": 3}  # papers: width 128
BUDGET = {
    "nets": 5,
    "test_limit": 2000,          # stratified subset of the 10k test split
    "eval_epochs": {1: 300, 10: 300, 50: 300},
    "full_epochs": 3,
    "methods": {
        "herding": {"iterations": None, "params": {"pool": 1000}},  # features: the full-data reference net
        "dm": {"iterations": {1: 400, 10: 400, 50: 200}, "params": {"batch_real": 64}},
        "datadam": {"iterations": {1: 400, 10: 400, 50: 200}, "params": {"batch_real": 64}},
        # DC/DSA at IPC 50: the paper's (outer_loop 50, inner_loop 10) x 1000 iterations is days here; cut to
        # outer_loop 10 x 5 iterations, so these rows show little more than the real-image initialisation
        "dc": {"iterations": {1: 300, 10: 15, 50: 5},
               "params": {"batch_real": 64, "inner_loop": {1: 1, 10: 10, 50: 10}, "outer_loop": {1: None, 10: None, 50: 10}}},
        "dsa": {"iterations": {1: 300, 10: 15, 50: 5},
                "params": {"batch_real": 64, "inner_loop": {1: 1, 10: 10, 50: 10}, "outer_loop": {1: None, 10: None, 50: 10}}},
        # MTT (papers: 100 experts x 50 epochs, 5000 iterations, syn_steps 50 / 30, max_start_epoch 2 / 20): cut to one
        # expert of 3 epochs on the full training split (no expert DSA), 150 / 40 iterations, syn_steps 20 / 10
        "mtt": {"iterations": {1: 150, 10: 40, 50: 20},
                "params": {"num_experts": 1, "expert_train_epochs": 3, "expert_dsa": False, "expert_epochs": 2,
                           "max_start_epoch": 2, "syn_steps": {1: 20, 10: 10, 50: 10}, "lr_img": 1000.0, "syn_lr": 0.01,
                           "lr_lr": {1: 1e-7, 10: 1e-5, 50: 1e-5}, "constant_memory": True}},
    },
    # cross-architecture transfer: IPC-10 sets made through the ConvNet, evaluated on other architectures
    "transfer": {"ipc": 10, "methods": ["dm", "dc"], "nets": 5,
                 "models": {"MLP 784-128-10": {"arch": "mlp", "hidden": [128]},
                            "ResNet-8 (width 16, batch norm)": {"arch": "resnet", "depth": 8, "width": 16}}},
}
QUICK = {
    "nets": 2,
    "test_limit": 500,
    "eval_epochs": {1: 20, 10: 10},
    "full_epochs": 1,
    "methods": {
        "herding": {"iterations": None, "params": {"pool": 100}},
        "dm": {"iterations": 5, "params": {"batch_real": 16}},
        "datadam": {"iterations": 5, "params": {"batch_real": 16}},
        "dc": {"iterations": {1: 3, 10: 1}, "params": {"batch_real": 16, "inner_loop": {1: 1, 10: 2}, "outer_loop": 2}},
        "dsa": {"iterations": {1: 3, 10: 1}, "params": {"batch_real": 16, "inner_loop": {1: 1, 10: 2}, "outer_loop": 2}},
        "mtt": {"iterations": 2, "params": {"num_experts": 1, "expert_train_epochs": 3, "expert_dsa": False,
                                            "max_start_epoch": 1, "syn_steps": 3, "constant_memory": True}},
    },
}

# Published ConvNet (width 128, instance norm) test accuracies on Fashion-MNIST, mean ± std, %.
PUBLISHED = {
    "random": ({1: "51.4 ± 3.8", 10: "73.8 ± 0.7", 50: "82.5 ± 0.7"}, "DC paper (Zhao et al., ICLR 2021) Table 1"),
    "herding": ({1: "67.0 ± 1.9", 10: "71.1 ± 0.7", 50: "71.9 ± 0.8"}, "DC paper Table 1"),
    "dc": ({1: "70.5 ± 0.6", 10: "82.3 ± 0.4", 50: "83.6 ± 0.4"}, "DC paper Table 1 / reference repo README"),
    "dsa": ({1: "70.6 ± 0.6", 10: "84.6 ± 0.3", 50: "88.7 ± 0.2"}, "DSA paper (Zhao & Bilen, ICML 2021) Table 1"),
    "dm": ({}, "not reported on Fashion-MNIST by the DM paper as far as we know; no number given"),
    "datadam": ({}, "not reported on Fashion-MNIST by the DataDAM paper as far as we know; no number given"),
    "mtt": ({}, "not reported on Fashion-MNIST by the MTT paper (CIFAR, Tiny ImageNet); no number given"),
    "full": ({0: "93.5 ± 0.1"}, "DC paper Table 1, whole data set"),
}


def pick(v, ipc):
    return v[ipc] if isinstance(v, dict) else v


def run(quick: bool, ipcs: list[int], only: list[str] | None = None) -> dict:
    from attar.condense import condense, evaluate_condensed, load_synthetic, render_grid
    from attar.condense.evaluate import full_data_accuracy
    from attar.data import load_data
    from attar.specs import DataSpec, ModelSpec

    torch.set_num_threads(1)  # measured 5-15x faster than 2 threads on this shared, oversubscribed 2-core machine
    b = QUICK if quick else BUDGET
    home = HOME / ("quick" if quick else "full")
    home.mkdir(parents=True, exist_ok=True)
    cache = home / "cache"
    data = DataSpec(name="fashion-mnist")
    model = ModelSpec(**MODEL)
    results = {"budget": b, "model": MODEL, "host": platform.node(), "torch": torch.__version__, "rows": {}}
    t0 = time.perf_counter()
    bundle = load_data(data)
    from attar.condense.base import ClassIndex, gen

    test_x, test_y = bundle.test.x, bundle.test.y
    per = b["test_limit"] // len(bundle.classes)
    rows = ClassIndex(test_y, len(bundle.classes)).draw(per, gen(0, "test-limit")).flatten()
    print("full-data reference ...", flush=True)
    full = full_data_accuracy(data, bundle, model, b["full_epochs"], 1, "dsa", 0, test_x[rows], test_y[rows], cache, print)
    results["full"] = full
    teacher = full["models"][0]
    print(f"  full data: {full['mean']:.4f}  ({teacher})", flush=True)
    for ipc in ipcs:
        for method, cfg in b["methods"].items():
            if ipc not in cfg.get("ipcs", [ipc]) or (only and method not in only):
                continue
            out = home / f"{method}-ipc{ipc}"
            params = {k: pick(v, ipc) for k, v in cfg["params"].items()}
            if method == "herding":
                params["features"] = teacher
            if method == "mtt":
                params["expert_dir"] = str(home / "experts")  # one store shared by every IPC
            if not (out / "manifest.json").exists():
                print(f"condense {method} ipc {ipc} ...", flush=True)
                times: list[float] = []
                condense(data, method, ipc, out, pick(cfg["iterations"], ipc), seed=0, model=model, params=params,
                         soft_labels=teacher if method == "dm" else None, progress=False,
                         on_step=lambda i, m: times.append(time.perf_counter()))
            s = load_synthetic(out)
            ev_path = out / "evaluation.json"
            ev = json.loads(ev_path.read_text()) if ev_path.exists() else None
            want = {"nets": b["nets"], "epochs": b["eval_epochs"][ipc], "test_rows": len(rows)}
            if ev is None or any(ev["protocol"].get(k) != v for k, v in want.items()):
                print(f"evaluate {method} ipc {ipc} ...", flush=True)
                ev = evaluate_condensed(out, nets=b["nets"], model=model, epochs=b["eval_epochs"][ipc], augment="dsa",
                                        full_data=False, test_limit=b["test_limit"], cache_dir=cache, log=print)
            ev["condense_seconds"] = s.meta["seconds"]
            ev["condense_iterations"] = s.meta["iterations"]
            ev["condense_params"] = s.meta["params"]
            results["rows"][f"{method}-ipc{ipc}"] = ev
            render_grid(out, home / f"{method}-ipc{ipc}.png")
            print(f"  {method} ipc {ipc}: {100 * ev['condensed']['mean']:.2f} ± {100 * ev['condensed']['std']:.2f}  "
                  f"(random {100 * ev['random_subset']['mean']:.2f})  [{time.perf_counter() - t0:.0f}s]", flush=True)
    if only:  # a partial run: its rows are cached for the next full run; results.json and the docs are left alone
        return results
    tr = b.get("transfer")
    if tr and tr["ipc"] in ipcs:
        results["transfer"] = {}
        for label, spec in tr["models"].items():
            mspec = ModelSpec(**spec)
            for method in tr["methods"]:
                out = home / f"{method}-ipc{tr['ipc']}"
                if not (out / "manifest.json").exists():
                    continue
                cached = home / f"transfer-{method}-{spec['arch']}.json"
                if cached.exists():
                    ev = json.loads(cached.read_text())
                else:
                    print(f"transfer {method} ipc {tr['ipc']} -> {label} ...", flush=True)
                    ev = evaluate_condensed(out, nets=tr["nets"], model=mspec, epochs=b["eval_epochs"][tr["ipc"]],
                                            augment="dsa", full_data=False, test_limit=b["test_limit"], cache_dir=cache,
                                            record=False, log=print)
                    cached.write_text(json.dumps(ev, default=str))
                results["transfer"][f"{label}|{method}"] = ev
                print(f"  {label} {method}: {100 * ev['condensed']['mean']:.2f} (random {100 * ev['random_subset']['mean']:.2f})",
                      flush=True)
    results["seconds"] = round(time.perf_counter() - t0)
    (home / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def pm(v) -> str:
    return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"


def render(r: dict) -> str:
    b = r["budget"]
    ipcs = sorted({int(k.split("ipc")[1]) for k in r["rows"]})
    total = sum(ev.get("condense_seconds", 0) + ev.get("seconds", 0) for ev in r["rows"].values())
    lines = [
        "## Dataset condensation (`attar condense`), Fashion-MNIST",
        "",
        f"Regenerate: `{CMD}` (about {total / 60:.0f} min of condensing and evaluating on this shared 2-core CPU, one "
        "torch thread, plus the full-data reference). Every number is test accuracy "
        f"(%) of freshly initialised ConvNets (width {MODEL['width']}, depth 3, instance norm) trained by attar's Trainer on "
        f"the condensed set: mean ± sample std over {b['nets']} nets, on a fixed stratified {b['test_limit']}-row subset of "
        "the official test split. Training: SGD (Nesterov) lr 0.01, momentum 0.9, weight decay 5e-4, ×0.1 at half time, "
        f"batch 256, per-sample DSA augmentation, {', '.join(f'{e} epochs at IPC {i}' for i, e in b['eval_epochs'].items())}.",
        "",
        "| IPC | training set | attar (ours) | Δ vs random subset | published (ConvNet-128) |",
        "|---|---|---|---|---|",
    ]
    for ipc in ipcs:
        rand = next(v["random_subset"] for k, v in r["rows"].items() if k.endswith(f"ipc{ipc}"))
        pub = PUBLISHED["random"][0].get(ipc, "—")
        lines.append(f"| {ipc} | random real subset | {pm(rand)} | — | {pub} |")
        for method in ("herding", "dm", "datadam", "dc", "dsa", "mtt"):
            ev = r["rows"].get(f"{method}-ipc{ipc}")
            if not ev:
                continue
            d = 100 * (ev["condensed"]["mean"] - rand["mean"])
            lines.append(f"| {ipc} | {method} | {pm(ev['condensed'])} | {d:+.1f} | {PUBLISHED[method][0].get(ipc, '—')} |")
    full = r["full"]
    lines.append(f"| all | full training data ({full['rows']} rows, {full['epochs']} epochs, 1 net) | {100 * full['mean']:.1f} | — | "
                 f"{PUBLISHED['full'][0][0]} |")
    if r.get("transfer"):
        tr = b["transfer"]
        lines += ["", f"Across architectures (IPC {tr['ipc']}; the sets were condensed through the ConvNet; {tr['nets']} "
                  "fresh nets of each architecture, same protocol; the random row is a random real subset of the same "
                  "size trained on that architecture):", "",
                  "| evaluated on | " + " | ".join(["random real subset"] + tr["methods"]) + " |",
                  "|---|" + "---|" * (len(tr["methods"]) + 1)]
        for label in tr["models"]:
            evs = {m: r["transfer"].get(f"{label}|{m}") for m in tr["methods"]}
            first = next((e for e in evs.values() if e), None)
            if not first:
                continue
            cells = [pm(first["random_subset"])] + [pm(e["condensed"]) if e else "—" for e in evs.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        conv = {m: r["rows"].get(f"{m}-ipc{tr['ipc']}") for m in tr["methods"]}
        lines.append("| ConvNet-32 (as above) | " + " | ".join(
            [pm(next(e for e in conv.values() if e)["random_subset"])] + [pm(e["condensed"]) if e else "—" for e in conv.values()]) + " |")
    lines += ["", "Soft labels (a separate table: the soft labels are the full-data reference net's logits, so these rows "
              "carry that teacher's knowledge and are not comparable with hard-label rows):", "",
              "| IPC | set | hard labels | soft labels (KL, T = 1) |", "|---|---|---|---|"]
    for ipc in ipcs:
        ev = r["rows"].get(f"dm-ipc{ipc}")
        if ev and "condensed_soft" in ev:
            lines.append(f"| {ipc} | dm | {pm(ev['condensed'])} | {pm(ev['condensed_soft'])} |")
    lines += ["", "Reading the table:", ""]
    short = []
    for ipc in ipcs:
        for method in ("dc", "dsa"):
            ev, pub = r["rows"].get(f"{method}-ipc{ipc}"), PUBLISHED[method][0].get(ipc)
            if ev and pub:
                d = 100 * ev["condensed"]["mean"] - float(pub.split()[0])
                if d < 0:
                    short.append(f"{method} at IPC {ipc} by {-d:.1f} points")
    beats, loses = [], []
    for k, ev in r["rows"].items():
        d = ev["condensed"]["mean"] - ev["random_subset"]["mean"]
        noise = max(ev["condensed"]["std"], ev["random_subset"]["std"])
        (beats if d > noise else loses).append(k)
    full_pct = 100 * r["full"]["mean"]
    lines += [
        f"- Beat the random real subset of the same size by more than the larger of the two stds: {len(beats)} of "
        f"{len(r['rows'])} rows" + (f" (not: {', '.join(loses)})" if loses else "") + ". The full-data reference "
        f"({full_pct:.1f}% after only {r['full']['epochs']} epochs of a width-{MODEL['width']} net) is the ceiling of "
        "this setup, not 93.5%.",
        "- Below the published numbers: " + (", ".join(short) or "none") + ". What differs: ConvNet width 32 instead "
        "of 128; DC/DSA ran 300 (IPC 1) and 15 (IPC 10) outer iterations instead of 1000, with 64 instead of 256 real "
        f"images per class and inner_loop 10 instead of 50 at IPC 10; DM (and DataDAM) ran 400 iterations instead of 20000; evaluation used {b['nets']} nets for 300 epochs on 2000 test rows; at IPC 50 DM and DataDAM ran 200 iterations, MTT 20, and DC/DSA only 5 outer iterations of outer_loop 10 (the paper: 1000 of outer_loop 50), a small fraction of the papers' IPC-50 schedules (DC/DSA: outer_loop 50 × inner_loop 10 × 1000 iterations, hours per method here); at that budget none of the four learned methods beats a random real subset of 500 images, so the IPC-50 rows show that attar runs them, not the papers' IPC-50 effect. "
        "Nothing was tuned; the papers' learning rates were used as they are. At IPC 1, where our budget is closest "
        "to the papers', DC and DSA are within 1 point of the published 70.5 / 70.6.",
        "- Herding here selects in the feature space of the full-data reference net (a trained ConvNet); that is "
        "likely why it is far above the DC paper's herding row at IPC 10.",
    ]
    if any(k.startswith("mtt-") for k in r["rows"]):
        m = b["methods"]["mtt"]
        lines += [
            f"- MTT ran on a cut budget: {m['params']['num_experts']} expert trained {m['params']['expert_train_epochs']} "
            "epochs (no expert DSA) instead of the paper's 100 experts × 50 epochs; "
            f"{' / '.join(str(v) for v in m['iterations'].values())} iterations (IPC {' / '.join(map(str, m['iterations']))}) "
            f"instead of 5000, syn_steps {' / '.join(str(v) for v in m['params']['syn_steps'].values())} instead of 50 / 30 (/ 30), "
            f"max_start_epoch {m['params']['max_start_epoch']}, constant_memory on. The store is built once and shared by "
            "every IPC; the IPC-1 row's condensation seconds include building it. MTT is not reported on Fashion-MNIST by "
            "its paper, so there is no published number to compare with.",
        ]
    lines += [
        f"- Soft labels come from the same {full_pct:.1f}% reference net and are learned with KL at T = 1; compare "
        "them only with each other and with the hard-label row of the same set.",
    ]
    if r.get("transfer"):
        tr = b["transfer"]
        notes = []
        for label in tr["models"]:
            for m in tr["methods"]:
                ev = r["transfer"].get(f"{label}|{m}")
                if ev:
                    d = ev["condensed"]["mean"] - ev["random_subset"]["mean"]
                    noise = max(ev["condensed"]["std"], ev["random_subset"]["std"])
                    verdict = "better" if d > noise else ("worse" if d < -noise else "no gain beyond noise")
                    notes.append(f"{m} on {label.split(' (')[0]} {100 * d:+.1f} ({verdict})")
        lines.insert(lines.index("Reading the table:") + 2,
                     "- Across architectures, against a random real subset trained on the same architecture: "
                     + "; ".join(notes) + ". The sets were matched through an instance-norm ConvNet; an MLP still "
                     "gains from them, a batch-norm ResNet does not at this budget.")
    lines += ["", "Condensation budgets (ours vs the papers):", "",
              "| method | IPC | iterations | settings | seconds |", "|---|---|---|---|---|"]
    for k, ev in r["rows"].items():
        method, ipc = k.split("-ipc")
        p = ev.get("condense_params", {})
        keys = [x for x in ("batch_real", "inner_loop", "outer_loop", "pool", "lr_img", "num_experts", "expert_train_epochs",
                            "syn_steps", "expert_epochs", "max_start_epoch") if x in p and p[x] is not None]
        lines.append(f"| {method} | {ipc} | {ev.get('condense_iterations') or '—'} | "
                     f"{', '.join(f'{x} {p[x]}' for x in keys)} | {ev.get('condense_seconds', 0):.0f} |")
    lines += [
        "",
        "Papers: DC/DSA 1000 outer iterations with batch_real 256 and inner_loop 50 at IPC 10 (outer_loop 10); "
        "DM 20000 iterations with 256 real images per class; evaluation on 5-20 ConvNet-128s for 300-1000 epochs "
        "on the full test split.",
        "",
        "Sources of the published column: " + "; ".join(f"{m}: {src}" for m, (_, src) in PUBLISHED.items()) + ". "
        "The DC and DSA IPC numbers for Fashion-MNIST were checked against the DC reference repository README "
        "(70.5 / 82.3 / 83.6) and the DSA abstract (94.9% of the whole-data accuracy at IPC 50, i.e. 88.7 / 93.5); "
        "the random/herding baselines and DSA's IPC 1/10 entries are quoted from the papers' tables from memory and were "
        "not re-verified here.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--only", nargs="+", help="condense and evaluate only these methods (cached for the next full run); "
                                              "writes neither results.json nor the docs")
    a = ap.parse_args()
    if a.quick:  # the smoke test has budgets for IPC 1 and 10 only
        a.ipc = [i for i in a.ipc if i in QUICK["eval_epochs"]] or sorted(QUICK["eval_epochs"])
    if a.from_json:
        r = json.loads((HOME / "full" / "results.json").read_text())
    elif a.only:
        run(a.quick, a.ipc, a.only)
        return
    else:
        r = run(a.quick, a.ipc)
    text = render(r)
    print(text)
    if not a.quick and not a.no_doc:
        replace_section(DOC, "condense-evidence", text, "Evidence")


if __name__ == "__main__":
    main()
