"""Wall time and peak RSS of attar merge vs mergekit on the same Hugging Face checkpoints.

    python bench/merge_perf.py --mergekit-python /tmp/mkvenv/bin/python [--size 124M] [--models 3]

Builds a GPT-2-shaped base (``--size``: 124M = GPT-2 small) and ``--models``
fine-tunes (base + seeded noise) in float32 under ``--work`` (default a temp
folder; ~0.5 GB per 124M model), then runs linear, TIES and DARE-TIES with each
tool in a fresh process, measuring wall time and the process's peak RSS
(``os.wait4``). Both tools memory-map safetensors, so page-cache pages they
touch count in both. Prints a Markdown table with attar/mergekit ratios, for
docs/benchmarks.md. mergekit runs in its own venv (see bench/merge_golden.py
for how to make one with CPU torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"124M": (768, 12), "30M": (384, 8), "8M": (192, 4)}

METHODS = {
    "linear": ("linear", None, {"weight": 1.0}),
    "ties": ("ties", "base", {"weight": 1.0, "density": 0.5}),
    "dare_ties": ("dare_ties", "base", {"weight": 1.0, "density": 0.5}),
}

ATTAR = "from attar.merge import run_merge; import sys; run_merge(sys.argv[1], sys.argv[2], progress=False)"
MERGEKIT = (
    "import sys, yaml\n"
    "from mergekit.config import MergeConfiguration\n"
    "from mergekit.merge import run_merge\n"
    "from mergekit.options import MergeOptions\n"
    "cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))\n"
    "run_merge(cfg, sys.argv[2], options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))\n"
)


def build(work: Path, size: str, n_models: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    width, layers = SIZES[size]
    cfg = GPT2Config(n_embd=width, n_layer=layers, n_head=max(1, width // 64))
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(work / "base")
    sd = base.state_dict()
    for i in range(n_models):
        g = torch.Generator().manual_seed(i + 1)
        base.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()})
        base.save_pretrained(work / f"ft_{i}")
        base.load_state_dict(sd)


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB -> MiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="124M")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="attar-merge-bench-"))
    if not (work / "base").exists():
        build(work, args.size, args.models)
    rows = []
    for name in args.methods.split(","):
        method, base, params = METHODS[name]
        cfg = {"merge_method": method, "models": [{"model": f"ft_{i}", "parameters": params} for i in range(args.models)], "dtype": "float32"}
        if base:
            cfg["base_model"] = base
        (work / f"{name}.yaml").write_text(json.dumps(cfg))
        results = {}
        for tool, cmd in (("attar", [sys.executable, "-c", ATTAR]), ("mergekit", [args.mergekit_python, "-c", MERGEKIT])):
            out = work / f"out-{tool}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            results[tool] = timed(cmd + [f"{name}.yaml", str(out)], work)
            shutil.rmtree(out, ignore_errors=True)
        (aw, am), (mw, mm) = results["attar"], results["mergekit"]
        rows.append(f"| {name} | {aw:.1f} | {mw:.1f} | {aw / mw:.2f} | {am:.0f} | {mm:.0f} | {am / mm:.2f} |")
    print(f"GPT-2-shaped {args.size}, {args.models} fine-tunes + base, float32, {os.cpu_count()} CPU cores\n")
    print("| method | attar s | mergekit s | time ratio | attar MiB | mergekit MiB | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
