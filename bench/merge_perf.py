"""Wall time and peak RSS of attar merge vs mergekit on the same Hugging Face checkpoints.

    .venv/bin/python bench/merge_perf.py --make-venv /tmp/mkvenv --size 124M [--models 3] [--repeats 3] [--write]

``--make-venv DIR`` creates mergekit's virtual environment if DIR does not
exist yet: CPU ``torch==2.13.0`` is installed *first* (so pip never pulls a
CUDA build), then ``mergekit==0.1.5``; ``--mergekit-python`` points at an
existing one instead. ``--write`` puts the table in docs/benchmarks.md
(section ``merge-perf``).

Builds a GPT-2-shaped base (``--size``: 124M = GPT-2 small) and ``--models``
fine-tunes (base + seeded noise) in float32 under ``--work`` (default a temp
folder; ~0.5 GB per 124M model), then runs linear, TIES, DARE-TIES and task arithmetic with
each tool in a fresh process, beside the I/O limit (read the inputs once, write the output once), measuring wall time and the process's peak RSS
(``os.wait4``). Both tools memory-map safetensors, so page-cache pages they
touch count in both. Prints a Markdown table with attar/mergekit ratios, for
docs/benchmarks.md. mergekit runs in its own venv (see bench/merge_golden.py
for how to make one with CPU torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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
    "task_arithmetic": ("task_arithmetic", "base", {"weight": 0.3}),
}

# The I/O limit of a merge: read every input file once and write the output's bytes once (fsync'd, as attar's
# atomic writer does), in a fresh Python process without torch. A merge cannot beat this; the goal is >= 50% of it.
IO_LIMIT = (
    "import os, sys\n"
    "out, size, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]\n"
    "buf = bytearray(64 << 20)\n"
    "view = memoryview(buf)\n"
    "for f in files:\n"
    "    with open(f, 'rb', buffering=0) as h:\n"
    "        while h.readinto(buf):\n"
    "            pass\n"
    "os.makedirs(out, exist_ok=True)\n"
    "with open(os.path.join(out, 'model.safetensors'), 'wb', buffering=0) as h:\n"
    "    left = size\n"
    "    while left:\n"
    "        left -= h.write(view[:min(left, len(buf))])\n"
    "    os.fsync(h.fileno())\n"
)

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


def _count_params(folder: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return n


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB -> MiB on Linux


def make_venv(path: Path) -> Path:
    """mergekit's own venv: CPU torch first, then mergekit (its pins never touch attar's venv)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _doc import peer_venv

    return peer_venv(path, "mergekit==0.1.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", default=None)
    ap.add_argument("--make-venv", type=Path, default=None, help="create (if missing) and use this venv for mergekit")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md (section merge-perf)")
    ap.add_argument("--size", choices=sorted(SIZES), default="124M")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    if args.make_venv is not None:
        args.mergekit_python = str(make_venv(args.make_venv))
    if not args.mergekit_python:
        ap.error("give --mergekit-python PY or --make-venv DIR")
    work = args.work or Path(tempfile.mkdtemp(prefix="attar-merge-bench-"))
    if not (work / "base").exists():  # in its own process: a forked child's peak RSS starts at its parent's
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import merge_perf; from pathlib import Path; "
                        f"merge_perf.build(Path({str(work)!r}), {args.size!r}, {args.models})"], check=True)
    rows = []
    for name in args.methods.split(","):
        method, base, params = METHODS[name]
        cfg = {"merge_method": method, "models": [{"model": f"ft_{i}", "parameters": params} for i in range(args.models)], "dtype": "float32"}
        if base:
            cfg["base_model"] = base
        (work / f"{name}.yaml").write_text(json.dumps(cfg))
        inputs = [str(f) for m in ([base] if base else []) + [f"ft_{i}" for i in range(args.models)]
                  for f in sorted((work / m).glob("*.safetensors"))]
        out_bytes = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
        tools = {"limit": [sys.executable, "-c", IO_LIMIT], "startup": [sys.executable, "-c", "import torch"],
                 "attar": [sys.executable, "-c", ATTAR],
                 "mergekit": [args.mergekit_python, "-c", MERGEKIT]}
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        for _ in range(args.repeats):  # interleaved, so background load hits every tool alike
            for tool, cmd in tools.items():
                out = work / f"out-{tool}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                tail = ([str(out), str(out_bytes), *inputs] if tool == "limit" else [] if tool == "startup"
                        else [f"{name}.yaml", str(out)])
                results[tool].append(timed(cmd + tail, work))
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {name} {tool}: {results[tool][-1][0]:.1f} s, {results[tool][-1][1]:.0f} MiB", flush=True)
        lw, sw, aw, mw = (statistics.median(w for w, _ in results[t]) for t in ("limit", "startup", "attar", "mergekit"))
        am, mm = (max(r for _, r in results[t]) for t in ("attar", "mergekit"))
        rows.append(f"| {name} | {lw:.2f} | {sw:.2f} | {aw:.2f} | {mw:.2f} | {lw / aw:.0%} ({lw / max(aw - sw, 1e-9):.0%}) "
                    f"| {lw / mw:.0%} ({lw / max(mw - sw, 1e-9):.0%}) | {aw / mw:.2f} | {am:.0f} | {mm:.0f} | {am / mm:.2f} |")
    import torch

    n_params = _count_params(work / "base")
    head = (f"GPT-2-shaped model with {n_params / 1e6:.0f}M parameters (`--size {args.size}`), base + {args.models} fine-tunes "
            f"(base + seeded noise), float32 safetensors, output float32. Each tool runs in a fresh process; wall time is the "
            f"median of {args.repeats} run(s), peak RSS the largest (`ru_maxrss`, memory-mapped pages touched count for both). "
            f"{platform.machine()}, {os.cpu_count()} CPU cores, nothing else running, torch {torch.__version__}, mergekit 0.1.5 in its own venv. "
            f"The I/O limit is a fresh Python process (no torch import) that reads every input file once and writes "
            f"(and fsyncs) the output's bytes once; 'share of limit' is limit time / tool time (goal: attar >= 50%), and in "
            f"brackets with the start-up of a Python process that imports torch (measured in the same run) taken off the "
            f"tool's time. The models are built in a separate process first, so peak RSS is each tool's own.")
    table = "\n".join([
        "| method | I/O limit (s) | torch start-up (s) | attar (s) | mergekit (s) | attar share of limit | mergekit share "
        "of limit | time ratio attar / mergekit | attar peak RSS (MiB) | mergekit peak RSS (MiB) | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(head + "\n\n" + table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _doc import replace_section

        body = "\n".join([
            "## Merging: attar merge vs mergekit on a ≥100M-parameter model", "", head, "", table, "",
            "Methods: `linear` (3 models, equal weights), `ties` and `dare_ties` (base + 3 models, weight 1, density 0.5), "
            "`task_arithmetic` (base + 3 models, weight 0.3).", "",
            f"Reproduce: `.venv/bin/python bench/merge_perf.py --make-venv /tmp/mkvenv --size {args.size} --models {args.models} "
            f"--repeats {args.repeats} --write`",
        ])
        replace_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "merge-perf", body, "Benchmarks")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
