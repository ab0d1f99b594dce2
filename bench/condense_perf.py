"""Cost of `attar condense` per method: seconds per outer iteration and peak memory, Fashion-MNIST, IPC 10.

Each configuration runs in its own subprocess (so peak memory is that method's alone): the data is
loaded and the context built, then a sampling thread records the resident set size every 5 ms
while the method runs; "peak memory" is the highest RSS minus the RSS just before the method
started (data, model code and Python already counted out). Seconds per outer iteration are the
median over the iterations after the first (warm-up). One torch thread (this shared 2-core
machine is oversubscribed; more threads measured slower).

    .venv/bin/python bench/condense_perf.py            # writes docs/benchmarks.md section condense-perf
    .venv/bin/python bench/condense_perf.py --quick    # smoke test, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
CMD = ".venv/bin/python bench/condense_perf.py"
W32 = {"arch": "convnet", "width": 32, "depth": 3}
W128 = {"arch": "convnet", "width": 128, "depth": 3}

# (label, method, ipc, iterations, params, model) -- the first block uses the evidence budgets.
CONFIGS = [
    ("evidence", "random", 10, 1, {}, W32),
    ("evidence", "herding", 10, 1, {"pool": 1000}, W32),
    ("evidence", "kcenter", 10, 1, {"pool": 1000}, W32),
    ("evidence", "dm", 10, 6, {"batch_real": 64}, W32),
    ("evidence", "datadam", 10, 6, {"batch_real": 64}, W32),
    ("evidence", "dc", 10, 3, {"batch_real": 64, "inner_loop": 10}, W32),
    ("evidence", "dsa", 10, 3, {"batch_real": 64, "inner_loop": 10}, W32),
    ("dc vmap", "dc", 10, 3, {"batch_real": 64, "inner_loop": 10, "grad_batching": "vmap"}, W32),
    ("matching step only, loop", "dc", 10, 5, {"batch_real": 64, "outer_loop": 1, "inner_loop": 0, "grad_batching": "loop"}, W32),
    ("matching step only, vmap", "dc", 10, 5, {"batch_real": 64, "outer_loop": 1, "inner_loop": 0, "grad_batching": "vmap"}, W32),
    ("paper settings", "dm", 10, 3, {"batch_real": 256}, W128),
    ("paper settings, one matching step", "dc", 10, 3, {"batch_real": 256, "outer_loop": 1, "inner_loop": 0}, W128),
    ("ipc scaling", "dm", 1, 6, {"batch_real": 64}, W32),
    ("ipc scaling", "dm", 50, 6, {"batch_real": 64}, W32),
    ("real-batch scaling", "dm", 10, 6, {"batch_real": 128}, W32),
    ("real-batch scaling", "dm", 10, 6, {"batch_real": 256}, W32),
    ("pool scaling", "herding", 10, 1, {"pool": 4000}, W32),
    ("pool scaling", "kcenter", 10, 1, {"pool": 4000}, W32),
]
QUICK = [
    ("quick", "dm", 10, 3, {"batch_real": 8}, {"arch": "convnet", "width": 8, "depth": 3}),
    ("quick", "dc", 10, 2, {"batch_real": 8, "inner_loop": 1, "outer_loop": 2}, {"arch": "convnet", "width": 8, "depth": 3}),
    ("quick", "herding", 10, 1, {"pool": 50}, {"arch": "convnet", "width": 8, "depth": 3}),
]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from attar.condense import CONDENSERS
    from attar.condense.base import CondenseContext
    from attar.data import load_data
    from attar.specs import DataSpec, ModelSpec

    b = load_data(DataSpec(name="fashion-mnist"))
    stamps: list[float] = []
    ctx = CondenseContext(x=b.train.x, y=b.train.y, num_classes=10, ipc=cfg["ipc"], iterations=cfg["iterations"],
                          seed=0, model=ModelSpec(**cfg["model"]), mean=b.mean, std=b.std,
                          on_step=lambda i, m: stamps.append(time.perf_counter()))
    method = CONDENSERS.get(cfg["method"])(cfg["params"])
    # Import-time allocations (torch.optim pulls in dynamo; torch.func) are not the method's: trigger them first.
    import torch.func  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ctx.fresh_model("warm-up")
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    method.run(ctx)
    t1 = time.perf_counter()
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss())
    steps = [b_ - a for a, b_ in zip([t0] + stamps, stamps)]
    per = statistics.median(steps[1:]) if len(steps) > 1 else (t1 - t0)
    return {"seconds_per_iteration": per, "seconds_total": t1 - t0, "iterations": len(steps) or 1,
            "peak_mb": (peak[0] - base) / 2**20, "rss_before_mb": base / 2**20}


def run(configs) -> list[dict]:
    rows = []
    for label, method, ipc, iters, params, model in configs:
        cfg = {"method": method, "ipc": ipc, "iterations": iters, "params": params, "model": model}
        env = dict(os.environ, CI="true")
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"label": label, **cfg, **res})
        print(f"{label:32s} {method:8s} ipc {ipc:3d} w{model['width']:<4d} {params}  "
              f"{res['seconds_per_iteration']:.2f} s/it  peak +{res['peak_mb']:.0f} MB", flush=True)
    return rows


def render(rows: list[dict], seconds: float) -> str:
    import torch

    lines = [
        "## Dataset condensation (`attar condense`): cost per method",
        "",
        f"Regenerate: `{CMD}` ({seconds / 60:.0f} min). Fashion-MNIST (54,000 training rows, 28×28), CPU, one torch "
        f"thread on a 2-core machine with nothing else running (run it alone: beside other benchmarks it measured up to 13× slower), "
        f"torch {torch.__version__}. *s/iteration*: median seconds per outer iteration after the first; for selection methods "
        "the whole run (embedding + greedy selection). *peak*: highest resident memory during the run minus the resident "
        "memory just before it (the data set itself, ~200 MB, is not counted).",
        "",
        "| setting | method | IPC | net | method settings | s / iteration | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ps = ", ".join(f"{k} {v}" for k, v in r["params"].items()) or "—"
        lines.append(f"| {r['label']} | {r['method']} | {r['ipc']} | ConvNet-{r['model']['width']} | {ps} | "
                     f"{r['seconds_per_iteration']:.2f} | {r['peak_mb']:.0f} |")
    lines += [
        "",
        "One outer iteration is: DM/DataDAM, one fresh network, one forward of `batch_real` real images per class and the "
        "synthetic set, one image update; DC/DSA, one fresh network and `outer_loop` (10 at IPC 10) gradient-matching "
        "updates with `inner_loop` network steps between them.",
        "",
        "How cost grows. DM/DataDAM: linear in the real images drawn per iteration (`C × batch_real`) plus the synthetic "
        "set (`C × ipc`), and independent of the data set's size N (rows are drawn from a per-class index table: one `topk` "
        "over N random keys). DC/DSA: per outer iteration `outer_loop × (C × batch_real + C × ipc)` forward/backward "
        "passes with a double backward for the synthetic side, plus `(outer_loop − 1) × inner_loop` network steps on the "
        "synthetic set; the paper's schedule (outer_loop, inner_loop) = (1, 1), (10, 50), (50, 10) for IPC 1, 10, 50 makes "
        "IPC 10 and 50 far dearer than IPC 1. Herding/k-center: one forward over the candidate pool (N, or `pool` per class) "
        "plus `ipc` greedy steps over a `[C, pool, D]` feature tensor (memory `C × pool × D` floats).",
        "",
        "Per-class work is batched over classes (DM/DataDAM: one forward for all classes, class means by reshape; "
        "selection: `[C, n, D]` tensors with masks; DSA: one parameter draw per class applied in one batched "
        "`affine_grid`/`grid_sample`). For DC's per-class gradients `torch.func.vmap(grad)` is available "
        "(`grad_batching: vmap`); compare the two *matching step only* rows (one gradient-matching update, no inner "
        "steps) for its speed on this CPU and the *dc vmap* row for its memory: vmap turns the convolution weight "
        "gradients into grouped convolutions and holds every class's activations at once. `grad_batching: auto` uses "
        "vmap on GPUs and one gradient call per class on CPUs.",
        "",
        "Paper-scale DC at IPC 10 (ConvNet-128, batch_real 256, outer_loop 10, inner_loop 50) is not run here: one outer "
        "iteration costs about 10 × the *one matching step* row plus 450 network steps on the 100 synthetic images, which "
        "is minutes per outer iteration on this CPU, ×1000 iterations.",
        "",
        "Not measured here: MTT (its memory and time are in the next section), GPU timings (no GPU was available to this task).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="run only configurations whose label contains this; merge into the saved results")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    t0 = time.perf_counter()
    saved = ROOT / "bench" / ".runs" / "condense" / "perf.json"
    configs = QUICK if a.quick else [c for c in CONFIGS if not a.only or a.only in c[0]]
    rows = run(configs)
    elapsed = time.perf_counter() - t0
    if a.only and saved.exists():
        old = json.loads(saved.read_text())
        prev = json.loads((saved.with_name("perf-meta.json")).read_text())["seconds"] if saved.with_name("perf-meta.json").exists() else 0
        key = lambda r: (r["label"], r["method"], r["ipc"], json.dumps(r["params"], sort_keys=True), r["model"]["width"])  # noqa: E731
        new = {key(r): r for r in rows}
        merged = [new.pop(key(r), r) for r in old]
        order = {key(dict(label=c[0], method=c[1], ipc=c[2], params=c[4], model=c[5])): i for i, c in enumerate(CONFIGS)}
        rows = sorted(merged + list(new.values()), key=lambda r: order.get(key(r), 999))
        elapsed += prev
    text = render(rows, elapsed)
    print(text)
    if not a.quick:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows, indent=2))
        saved.with_name("perf-meta.json").write_text(json.dumps({"seconds": elapsed}))
        replace_section(DOC, "condense-perf", text, "Benchmarks")


if __name__ == "__main__":
    main()
