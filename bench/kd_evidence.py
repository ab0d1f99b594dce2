"""Evidence for every distillation method: mean ± std over seeds against its baseline, on real data.

Regenerates ``docs/evidence.md`` (the tables between its ``kd-evidence`` markers) and the raw
per-seed results ``docs/evidence.json``. Every number comes from the path users take: a recipe
(YAML text) per student and seed, run by ``attar.pipeline.Pipeline``; test accuracy is read
from the pipeline's rows. Teachers are trained once per data set (seed 0) and referred to from
the student recipes as ``teacher: {artifact: <run>/<stage>/model}``; their outputs are cached by
the pipeline (no augmentation here), so every method and seed shares one teacher pass.

    .venv/bin/python bench/kd_evidence.py                      # everything (about an hour on 1 CPU core)
    .venv/bin/python bench/kd_evidence.py --only fm-scarce-kd  # one row: its method and baseline, all seeds
    .venv/bin/python bench/kd_evidence.py --dataset mnist      # one data set
    .venv/bin/python bench/kd_evidence.py --list               # the rows and their ids
    .venv/bin/python bench/kd_evidence.py --from-json          # rewrite the tables from docs/evidence.json
    .venv/bin/python bench/kd_evidence.py --quick --only fm-scarce-kd   # smoke test (tiny budgets, ~1 min)

Runs go to ``bench/.runs`` (``bench/.runs/quick`` with ``--quick``, whose results never touch docs/).
Teachers are reused from ``bench/.runs/teachers.json`` when their recipe is unchanged
(``--retrain-teachers`` to train them again); ``--resume`` skips (arm, seed) results already in
the JSON with the same configuration.

Verdict rule (per row): Δ = mean(method) − mean(baseline); "better" if Δ > max(std_method,
std_baseline), "worse" if Δ < −max(std_method, std_baseline), otherwise "no gain" (the difference is
within seed-to-seed noise). std is the sample standard deviation over seeds (ddof = 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

DOC = ROOT / "docs" / "evidence.md"
JSON_PATH = ROOT / "docs" / "evidence.json"
HOME = ROOT / "bench" / ".runs"
CMD = ".venv/bin/python bench/kd_evidence.py"
DIVERGENCES = ["reverse_kl", "js", "gjsd", "skew_kl", "skew_reverse_kl", "tvd", "sinkhorn", "sinkhorn_batch"]
DATASETS = {"fm": "Fashion-MNIST", "mnist": "MNIST-5k"}

# ------------------------------------------------------------------------------------------------
# Budgets. The published numbers use FULL; QUICK only smoke-tests the script.
# ------------------------------------------------------------------------------------------------

FULL = {
    # Fashion-MNIST
    "fm_teacher_epochs": 2, "fm_ens_epochs": 1, "fm_teacher_limit": None,
    "fm_scarce_limit": 10000, "fm_lpc": 100, "fm_kd_epochs": 5, "fm_scratch_epochs": 100,
    "fm_live_limit": 4000, "fm_live_epochs": 4,
    "fm_full_limit": None, "fm_full_epochs": 2,  # >= 2: PS-KD is exactly CE in its first epoch
    # MNIST-5k
    "mn_ens_epochs": 10, "mn_lpc": 10, "mn_kd_epochs": 6, "mn_scratch_epochs": 300,
    "mn_full_epochs": 10,
}
QUICK = {
    "fm_teacher_epochs": 1, "fm_ens_epochs": 1, "fm_teacher_limit": 1500,
    "fm_scarce_limit": 1500, "fm_lpc": 20, "fm_kd_epochs": 1, "fm_scratch_epochs": 3,
    "fm_live_limit": 1000, "fm_live_epochs": 1,
    "fm_full_limit": 1500, "fm_full_epochs": 1,
    "mn_ens_epochs": 1, "mn_lpc": 10, "mn_kd_epochs": 1, "mn_scratch_epochs": 3,
    "mn_full_epochs": 1,
}

KD = {"name": "kd", "divergence": "kl", "temperature": 1.0, "alpha": 0.5}  # the quickstart's KD
CONV8 = {"arch": "convnet", "width": 8, "depth": 2}
MLP = {"arch": "mlp", "hidden": [64]}


def _data(name: str, limit: int | None = None, lpc: int | None = None) -> dict:
    d: dict[str, Any] = {"name": name}
    if limit:
        d["train_limit"] = limit
    if lpc:
        d["labeled_per_class"] = lpc
    return d


# ------------------------------------------------------------------------------------------------
# Teachers (one recipe per data set, seed 0) and student arms
# ------------------------------------------------------------------------------------------------


def teacher_recipes(B: dict) -> dict[str, dict]:
    fm_data = _data("fashion-mnist", B["fm_teacher_limit"])
    fm = {
        "name": "kd-evidence-teachers-fm", "seed": 0, "data": fm_data,
        "stages": [
            {"name": "teacher", "kind": "train", "model": {"arch": "convnet", "width": 48, "depth": 3},
             "train": {"epochs": B["fm_teacher_epochs"], "batch_size": 128, "lr": 0.003}},
            {"name": "ens_a", "kind": "train", "seed": 1, "model": {"arch": "convnet", "width": 32, "depth": 3},
             "train": {"epochs": B["fm_ens_epochs"], "batch_size": 128, "lr": 0.003}},
            {"name": "ens_b", "kind": "train", "seed": 2, "model": {"arch": "convnet", "width": 32, "depth": 3},
             "train": {"epochs": B["fm_ens_epochs"], "batch_size": 128, "lr": 0.003}},
        ],
    }
    mn = {
        "name": "kd-evidence-teachers-mnist", "seed": 0, "data": _data("mnist-5k"),
        "stages": [
            {"name": "teacher", "kind": "evaluate", "model": {"pretrained": "mnist-cnn"}},
            {"name": "ens_a", "kind": "train", "seed": 1, "model": {"arch": "convnet", "width": 16, "depth": 3},
             "train": {"epochs": B["mn_ens_epochs"], "batch_size": 64, "lr": 0.003}},
            {"name": "ens_b", "kind": "train", "seed": 2, "model": {"arch": "convnet", "width": 16, "depth": 3},
             "train": {"epochs": B["mn_ens_epochs"], "batch_size": 64, "lr": 0.003}},
        ],
    }
    return {"fm": fm, "mnist": mn}


def arms(B: dict) -> dict[str, dict]:
    """Every trained student configuration, by id. Rows compare two arms."""
    A: dict[str, dict] = {}

    def add(aid, ds, data, train, objective=None, teachers=None, model=CONV8):
        A[aid] = {"dataset": ds, "data": data, "model": model, "train": train,
                  "objective": objective, "teachers": teachers}

    for ds in ("fm", "mnist"):
        if ds == "fm":
            scarce = _data("fashion-mnist", B["fm_scarce_limit"], B["fm_lpc"])
            kd_tr = {"epochs": B["fm_kd_epochs"], "batch_size": 128, "labeled_batch_size": 32, "lr": 0.003}
            ce_tr = {"epochs": B["fm_scratch_epochs"], "batch_size": 128, "lr": 0.003, "eval_every": 25}
            full = _data("fashion-mnist", B["fm_full_limit"])
            full_tr = {"epochs": B["fm_full_epochs"], "batch_size": 256, "lr": 0.003}
            live = _data("fashion-mnist", B["fm_live_limit"], B["fm_lpc"])
            live_tr = {"epochs": B["fm_live_epochs"], "batch_size": 128, "labeled_batch_size": 32, "lr": 0.003}
            feat = {"student_layer": "net.features.6", "teacher_layer": "net.features.6"}
        else:
            scarce = _data("mnist-5k", None, B["mn_lpc"])
            kd_tr = {"epochs": B["mn_kd_epochs"], "batch_size": 128, "labeled_batch_size": 32, "lr": 0.003}
            ce_tr = {"epochs": B["mn_scratch_epochs"], "batch_size": 50, "lr": 0.003, "eval_every": 20}
            full = _data("mnist-5k")
            full_tr = {"epochs": B["mn_full_epochs"], "batch_size": 128, "lr": 0.003}
            live, live_tr = scarce, kd_tr  # small enough to run the teacher live at the KD budget
            feat = {"student_layer": "net.features.6", "teacher_layer": "net.features.4"}
        p = f"{ds}-scarce"
        add(f"{p}-ce", ds, scarce, ce_tr, {"name": "ce"})
        add(f"{p}-kd", ds, scarce, kd_tr, KD, ["T"])
        add(f"{p}-label_free", ds, scarce, kd_tr, {"name": "label_free", "temperature": 1.0}, ["T"])
        add(f"{p}-dho", ds, scarce, kd_tr, {"name": "dho", "alpha": 0.5, "temperature": 1.0, "beta": 0.5}, ["T"])
        for d in DIVERGENCES:
            add(f"{p}-{d}", ds, scarce, kd_tr, {**KD, "divergence": d}, ["T"])
        ens = {"name": "ensemble", "alpha": 0.5, "temperature": 1.0}
        add(f"{p}-ens3", ds, scarce, kd_tr, ens, ["T", "E1", "E2"])
        add(f"{p}-ens1", ds, scarce, kd_tr, ens, ["T"])
        add(f"{p}-pskd", ds, scarce, ce_tr, {"name": "pskd", "alpha_T": 0.8})
        lp = f"{ds}-live" if ds == "fm" else p
        if ds == "fm":
            add(f"{lp}-kd", ds, live, live_tr, KD, ["T"])
        add(f"{lp}-feature", ds, live, live_tr, {**KD, "name": "feature", **feat, "loss": "mse", "beta": 1.0}, ["T"])
        add(f"{lp}-nd", ds, live, live_tr, {**KD, "name": "nd", "beta": 1.0}, ["T"])
        f = f"{ds}-full"
        add(f"{f}-ce", ds, full, full_tr, {"name": "ce"})
        add(f"{f}-kd", ds, full, full_tr, KD, ["T"])
        add(f"{f}-label_free", ds, full, full_tr, {"name": "label_free", "temperature": 1.0}, ["T"])
        add(f"{f}-pskd", ds, full, full_tr, {"name": "pskd", "alpha_T": 0.8})
        if ds == "mnist":
            add(f"{p}-mlp-ce", ds, scarce, ce_tr, {"name": "ce"}, model=MLP)
            add(f"{p}-mlp-kd", ds, scarce, kd_tr, KD, ["T"], model=MLP)
            add(f"{f}-mlp-ce", ds, full, full_tr, {"name": "ce"}, model=MLP)
            add(f"{f}-mlp-kd", ds, full, full_tr, KD, ["T"], model=MLP)
    for a in A.values():  # a teacher-free objective is a `train` stage, the others `distill`
        a["kind"] = "distill" if a["teachers"] else "train"
    return A


def rows() -> list[dict]:
    """Table rows: (method arm, baseline arm), in display order."""
    R: list[dict] = []

    def row(rid, regime, method, baseline, m, b, note=""):
        R.append({"id": rid, "dataset": rid.split("-")[0], "regime": regime, "method": method,
                  "baseline": baseline, "m": m, "b": b, "note": note})

    for ds in ("fm", "mnist"):
        p = f"{ds}-scarce"
        row(f"{p}-kd", "scarce", "KD (KL, T=1, α=0.5)", "scratch (CE, to plateau)", f"{p}-kd", f"{p}-ce")
        row(f"{p}-label_free", "scarce", "label-free KD (KL, T=1, no labels)", "scratch (CE, to plateau)",
            f"{p}-label_free", f"{p}-ce")
        row(f"{p}-dho", "scarce", "DHO (α=0.5, T=1, β=0.5)", "scratch (CE, to plateau)", f"{p}-dho", f"{p}-ce")
        row(f"{p}-dho-vs-kd", "scarce", "DHO (α=0.5, T=1, β=0.5)", "KD (KL)", f"{p}-dho", f"{p}-kd")
        for d in DIVERGENCES:
            row(f"{p}-{d}", "scarce", f"KD with {d}", "KD (KL)", f"{p}-{d}", f"{p}-kd")
        row(f"{p}-ensemble", "scarce", "ensemble of 3 teachers (MEAL V2 target, α=0.5)",
            "same objective, single teacher", f"{p}-ens3", f"{p}-ens1")
        row(f"{p}-pskd", "scarce", "PS-KD (α_T=0.8), labeled rows only", "CE, same budget", f"{p}-pskd", f"{p}-ce")
        lp = f"{ds}-live" if ds == "fm" else p
        kd_base = f"{lp}-kd"
        lr = "live" if ds == "fm" else "scarce"
        row(f"{lp}-feature", lr, "feature KD (hint MSE, β=1) + KD", "logit-only KD (KL)", f"{lp}-feature", kd_base)
        row(f"{lp}-nd", lr, "ND loss (β=1) + KD", "logit-only KD (KL)", f"{lp}-nd", kd_base)
        if ds == "mnist":
            row(f"{p}-mlp-kd", "scarce", "MLP student: KD (KL, T=1, α=0.5)", "MLP scratch (CE, to plateau)",
                f"{p}-mlp-kd", f"{p}-mlp-ce")
        f = f"{ds}-full"
        row(f"{f}-kd", "full", "KD (KL, T=1, α=0.5)", "scratch (CE)", f"{f}-kd", f"{f}-ce")
        row(f"{f}-label_free", "full", "label-free KD (KL, T=1)", "scratch (CE)", f"{f}-label_free", f"{f}-ce")
        row(f"{f}-pskd", "full", "PS-KD (α_T=0.8)", "CE", f"{f}-pskd", f"{f}-ce")
        if ds == "mnist":
            row(f"{f}-mlp-kd", "full", "MLP student: KD (KL, T=1, α=0.5)", "MLP scratch (CE)",
                f"{f}-mlp-kd", f"{f}-mlp-ce")
    return R


# ------------------------------------------------------------------------------------------------
# Running through the pipeline
# ------------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _quiet_log(prefix: str):
    def log(*args, **kw):
        msg = " ".join(str(a) for a in args)
        if "teacher outputs" in msg:
            print(f"    {prefix}{msg.strip()}", flush=True)
    return log


def _pipeline(recipe: dict, home: Path, tag: str):
    from attar.pipeline import Pipeline
    from attar.recipe import parse_recipe

    text = yaml.safe_dump(recipe, sort_keys=False, width=200)
    pipe = Pipeline(parse_recipe(text, f"<{tag}>"), text, home=home, log=_quiet_log(""))
    run_dir = pipe.run()
    return pipe, run_dir, text


def _ensemble_accuracy(data: dict, specs: list[dict]) -> dict:
    """Test accuracy of each teacher and of the averaged probabilities (context for the ensemble row)."""
    import torch

    from attar.data import load_data
    from attar.models import build_model, load_model
    from attar.specs import DataSpec
    from attar.train.trainer import predict

    b = load_data(DataSpec(**data))
    probs = []
    for s in specs:
        m = load_model(s["artifact"])[0] if "artifact" in s else build_model(s, b.input_shape, len(b.classes))
        probs.append(torch.softmax(predict(m, b.test.x), -1))
    acc = [float((p.argmax(-1) == b.test.y).float().mean()) for p in probs]
    ens = float((torch.stack(probs).mean(0).argmax(-1) == b.test.y).float().mean())
    return {"members": acc, "ensemble": ens}


def ensure_teachers(ds: str, B: dict, home: Path, retrain: bool, results: dict) -> dict[str, dict]:
    """Train (or reuse) the teachers of data set ``ds``; return {"T", "E1", "E2": model spec}."""
    recipe = teacher_recipes(B)[ds]
    key = _sha(recipe)
    index_path = home / "teachers.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    ent = index.get(key)
    ok = ent and all((Path(ent["run_dir"]) / st["name"] / "model" / "manifest.json").exists()
                     for st in recipe["stages"] if st["kind"] == "train")
    if retrain or not ok:
        print(f"[teachers {ds}] training: " + ", ".join(f"{s['name']} {s.get('model')}" for s in recipe["stages"]), flush=True)
        t0 = time.time()
        pipe, run_dir, text = _pipeline(recipe, home / "teachers", f"teachers {ds}")
        ent = {"run_dir": str(run_dir), "rows": pipe.rows, "wall_s": round(time.time() - t0, 1), "recipe": text}
        index[key] = ent
        home.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps(index, indent=1))
    else:
        print(f"[teachers {ds}] reusing {ent['run_dir']}", flush=True)
    run_dir = Path(ent["run_dir"])
    specs = {}
    for name, st in zip(("T", "E1", "E2"), recipe["stages"]):
        specs[name] = {"artifact": str(run_dir / st["name"] / "model")} if st["kind"] == "train" else dict(st["model"])
    tinfo = results.setdefault("teachers", {}).setdefault(ds, {})
    if tinfo.get("key") != key or "ensemble_accuracy" not in tinfo:
        tinfo.update({"key": key, "run_dir": ent["run_dir"], "train_wall_s": ent.get("wall_s"), "recipe": ent["recipe"],
                      "rows": [{k: r[k] for k in ("stage", "kind", "accuracy", "nll", "ece", "params", "train_s")
                                if k in r} for r in ent["rows"]]})
        t0 = time.time()
        tinfo["ensemble_accuracy"] = _ensemble_accuracy(recipe["data"], [specs["T"], specs["E1"], specs["E2"]])
        tinfo["ensemble_eval_s"] = round(time.time() - t0, 1)
    return specs


def run_arm(aid: str, arm: dict, seed: int, teachers: dict, home: Path) -> dict:
    stage: dict[str, Any] = {"name": "student", "kind": arm["kind"], "model": arm["model"]}
    if arm["teachers"]:
        refs = [teachers[t] for t in arm["teachers"]]
        stage["teacher"] = refs[0] if len(refs) == 1 and arm["objective"]["name"] != "ensemble" else refs
    stage["objective"] = arm["objective"]
    stage["train"] = arm["train"]
    recipe = {"name": f"kd-evidence-{aid}", "seed": seed, "data": arm["data"], "stages": [stage]}
    t0 = time.time()
    pipe, run_dir, text = _pipeline(recipe, home, f"{aid} seed {seed}")
    r = pipe.rows[-1]
    return {"accuracy": r["accuracy"], "nll": r["nll"], "ece": r["ece"], "params": r["params"],
            "train_s": r.get("train_s"), "steps": r.get("steps"), "teacher": r.get("teacher"),
            "wall_s": round(time.time() - t0, 1), "run_dir": str(run_dir), "recipe": text}


# ------------------------------------------------------------------------------------------------
# Statistics and the Markdown tables
# ------------------------------------------------------------------------------------------------


def _accs(results: dict, aid: str, seeds: list[int] | None = None) -> list[float]:
    got = results.get("arms", {}).get(aid, {}).get("seeds", {})
    return [v["accuracy"] for k, v in sorted(got.items(), key=lambda kv: int(kv[0]))
            if "accuracy" in v and (seeds is None or int(k) in seeds)]


def _ms(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def verdict(m: list[float], b: list[float]) -> tuple[float, str]:
    (mm, ms), (bm, bs) = _ms(m), _ms(b)
    d = mm - bm
    if len(m) < 2 or len(b) < 2:
        return d, "n/a (fewer than 2 seeds)"
    tol = max(ms, bs)
    return d, "better" if d > tol else ("worse" if d < -tol else "no gain")


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if math.isfinite(std) else f"{100 * mean:.2f}"


def _budget_text(arm: dict) -> str:
    t = arm["train"]
    parts = [f"{t['epochs']} epochs", f"batch {t['batch_size']}" + (f" + {t['labeled_batch_size']} labeled" if t.get("labeled_batch_size") else ""),
             f"lr {t['lr']}"]
    return ", ".join(parts)


def _data_text(d: dict) -> str:
    s = d["name"]
    if d.get("train_limit"):
        s += f", train_limit {d['train_limit']}"
    if d.get("labeled_per_class"):
        s += f", {d['labeled_per_class']} labels/class (rest unlabeled)"
    return s


REGIMES = {
    "scarce": "scarce labels + unlabeled pool",
    "live": "feature-level methods (teacher run live on every batch; smaller pool)",
    "full": "all labels, short budget",
}


def markdown(results: dict, A: dict, R: list[dict], only_ds: list[str]) -> str:
    out = []
    meta = results.get("meta", {})
    if meta:
        out.append(f"Raw per-seed results: `docs/evidence.json` (machine: {meta.get('machine', '?')}; "
                   f"torch {meta.get('torch', '?')}; seeds {meta.get('seeds', '?')}; "
                   f"total compute of the recorded runs {meta.get('total_run_s', 0) / 60:.0f} min).")
        out.append("")
    for ds in only_ds:
        t = results.get("teachers", {}).get(ds)
        out.append(f"### {DATASETS[ds]}")
        out.append("")
        if t:
            names = {"teacher": "T", "ens_a": "E1", "ens_b": "E2"}
            stages = {st["name"]: st for st in yaml.safe_load(t["recipe"])["stages"]}
            parts = []
            for r in t["rows"]:
                st = stages.get(r["stage"], {})
                what = _model_text(st.get("model", {}))
                if st.get("kind") == "train":
                    what += f", trained {st['train']['epochs']} epoch(s), seed {st.get('seed', 0)}"
                parts.append(f"{names.get(r['stage'], r['stage'])} = {what} ({r['params']:,} params): {100 * r['accuracy']:.2f}%")
            ea = t.get("ensemble_accuracy", {})
            out.append("Teachers (test accuracy): " + "; ".join(parts)
                       + (f"; ensemble T+E1+E2 (averaged probabilities) {100 * ea['ensemble']:.2f}%." if ea else "."))
            out.append("")
        for regime in ("scarce", "live", "full"):
            rr = [r for r in R if r["dataset"] == ds and r["regime"] == regime]
            if not rr or not any(_accs(results, r["m"]) for r in rr):
                continue
            a0 = A[rr[0]["m"]]
            ce = A.get(rr[0]["b"]) if rr[0]["b"].endswith("-ce") else None
            out.append(f"**{DATASETS[ds]}, {REGIMES[regime]}.** Data: {_data_text(a0['data'])}. "
                       f"Student: {_model_text(a0['model'])} unless stated. Distillation budget: {_budget_text(a0)}"
                       + (f"; scratch/CE budget: {_budget_text(ce)}" if ce and ce["train"] != a0["train"] else "")
                       + ". Teacher T unless stated.")
            out.append("")
            out.append("| row | method | test acc % (mean ± std) | baseline | baseline acc % | Δ (pp) | verdict | regenerate |")
            out.append("|---|---|---|---|---|---|---|---|")
            for r in rr:
                m, b = _accs(results, r["m"]), _accs(results, r["b"])
                errs = [v.get("error") for arm in (r["m"], r["b"])
                        for v in results.get("arms", {}).get(arm, {}).get("seeds", {}).values() if v.get("error")]
                if not m or not b:
                    why = ("failed: " + errs[0].splitlines()[0][:160]) if errs else "not run"
                    out.append(f"| `{r['id']}` | {r['method']} | — | {r['baseline']} | — | — | {why} | `{CMD} --only {r['id']}` |")
                    continue
                d, v = verdict(m, b)
                n = f" (n={len(m)}/{len(b)})" if len(m) != len(b) else ""
                out.append(f"| `{r['id']}` | {r['method']} | {_pct(*_ms(m))} | {r['baseline']} | {_pct(*_ms(b))} | "
                           f"{100 * d:+.2f} | **{v}**{n} | `{CMD} --only {r['id']}` |")
            out.append("")
    return "\n".join(out)


def _model_text(m: dict) -> str:
    if m.get("arch") == "convnet":
        return f"ConvNet width {m['width']} depth {m['depth']}"
    if m.get("arch") == "mlp":
        return "MLP 784-" + "-".join(map(str, m["hidden"])) + "-10"
    if m.get("pretrained"):
        return f"pretrained {m['pretrained']}"
    return json.dumps(m)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="row id (repeatable; see --list)")
    ap.add_argument("--dataset", choices=sorted(DATASETS), action="append", default=[])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated recipe seeds (default 0,1,2)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, results under bench/.runs/quick only")
    ap.add_argument("--from-json", action="store_true", help="only rewrite the Markdown tables from the JSON")
    ap.add_argument("--resume", action="store_true", help="skip (arm, seed) results already in the JSON")
    ap.add_argument("--retrain-teachers", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the row ids and exit")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads were up to 30x slower)")
    args = ap.parse_args()

    B = QUICK if args.quick else FULL
    A, R = arms(B), rows()
    if args.list:
        for r in R:
            print(f"{r['id']:32s} {r['method']}  vs  {r['baseline']}")
        return
    home = HOME / "quick" if args.quick else HOME
    json_path = home / "evidence.json" if args.quick else JSON_PATH
    doc_path = home / "evidence.md" if args.quick else DOC
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    datasets = args.dataset or list(DATASETS)
    known = {r["id"] for r in R}
    bad = [o for o in args.only if o not in known]
    if bad:
        sys.exit(f"unknown row id(s) {bad}; see --list")
    sel = [r for r in R if (not args.only or r["id"] in args.only) and r["dataset"] in datasets]

    if not args.from_json:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        need: list[str] = []
        for r in sel:
            for a in (r["b"], r["m"]):
                if a not in need:
                    need.append(a)
        t_start = time.time()
        meta = results.setdefault("meta", {})
        meta.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
                     "torch": torch.__version__, "python": platform.python_version(), "seeds": args.seeds,
                     "budgets": B, "quick": args.quick})
        teachers: dict[str, dict] = {}
        for ds in sorted({A[a]["dataset"] for a in need}, key=list(DATASETS).index):
            teachers[ds] = ensure_teachers(ds, B, home, args.retrain_teachers, results)
            _save(results, json_path)
        jobs = [(a, s) for s in seeds for a in need]  # seed-major: a first complete picture early
        print(f"{len(sel)} rows, {len(need)} arms x {len(seeds)} seeds = {len(jobs)} runs", flush=True)
        for i, (aid, seed) in enumerate(jobs, 1):
            arm = A[aid]
            h = _sha({k: arm[k] for k in ("data", "model", "train", "objective", "teachers", "kind")}
                     | {"teacher_key": results["teachers"][arm["dataset"]]["key"]})
            slot = results.setdefault("arms", {}).setdefault(aid, {})
            if slot.get("hash") != h:
                slot.clear()
                slot.update({"hash": h, "config": arm, "seeds": {}})
            if args.resume and "accuracy" in slot["seeds"].get(str(seed), {}):
                print(f"[{i}/{len(jobs)}] {aid} seed {seed}: kept from JSON", flush=True)
                continue
            print(f"[{i}/{len(jobs)}] {aid} seed {seed} ...", flush=True)
            t0 = time.time()
            try:
                res = run_arm(aid, arm, seed, teachers[arm["dataset"]], home)
                print(f"[{i}/{len(jobs)}] {aid} seed {seed}: acc {100 * res['accuracy']:.2f}%  "
                      f"({res['wall_s']:.0f} s, total {(time.time() - t_start) / 60:.1f} min)", flush=True)
            except Exception as e:  # record and go on: one broken method must not hide the others
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}", "wall_s": round(time.time() - t0, 1)}
                print(f"[{i}/{len(jobs)}] {aid} seed {seed}: FAILED {res['error'][:200]}", flush=True)
            slot["seeds"][str(seed)] = res
            _save(results, json_path)
        meta["last_invocation"] = {"argv": sys.argv[1:], "wall_s": round(time.time() - t_start, 1)}
        tot = sum(t.get("train_wall_s") or 0 for t in results.get("teachers", {}).values())
        tot += sum(v.get("wall_s", 0) for a in results.get("arms", {}).values() for v in a["seeds"].values())
        meta["total_run_s"] = round(tot, 1)
        _save(results, json_path)

    if not results:
        sys.exit(f"no results in {json_path}")
    body = markdown(results, A, R, list(DATASETS))
    replace_section(doc_path, "kd-evidence", body, "Evidence: what each distillation method does at this scale")
    print(f"wrote {doc_path} (tables) and {json_path}")
    print(body)


if __name__ == "__main__":
    main()
