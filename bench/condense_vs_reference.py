"""One outer iteration of DM and DC: attar against the authors' reference code, same data, IPC, network and batch.

    .venv/bin/python bench/condense_vs_reference.py                    # full: writes docs/benchmarks.md section
    .venv/bin/python bench/condense_vs_reference.py --quick            # smoke test (tiny net, few iterations), prints only
    .venv/bin/python bench/condense_vs_reference.py --methods dm,dm-nodsa   # rerun some rows (merged into the saved ones)
    .venv/bin/python bench/condense_vs_reference.py --sweep            # where attar's time goes: seconds by rows per call
    .venv/bin/python bench/condense_vs_reference.py --reference DIR    # DIR: a clone of
                                                                       # https://github.com/VICO-UoE/DatasetCondensation

The reference (Zhao & Bilen: ``main_DM.py`` = DM, ``main.py`` = DC/DSA, ``utils.py``, ``networks.py``) runs as
its own script, in its own process: ``python -c RUNNER`` with ``PYTHONPATH`` = a stand-in ``torchvision`` folder
and the reference folder (nothing of attar on its path or imported). Its files are never edited. Its DSA path
(row ``dm``) does not run under today's torch as written, so there RUNNER loads ``utils.py``/``networks.py`` from
their source with two substitutions in memory: ``t[:] = t[0]`` -> ``t[:] = t[0].clone()`` (ten Siamese lines;
upstream issue #20) and ``out.view(out.size(0), -1)`` -> ``.reshape`` (a 1-channel crop comes out with
channels-last strides, so the conv output does too). Rows ``dm-nodsa`` and ``dc`` run it unmodified. Without
``--reference`` the bench exports the snapshot kept on this machine (``git archive`` of
``/work/.mirror/VICO-UoE+DatasetCondensation/repo``) into ``bench/.venvs/dc-reference/src``; no line of it
enters attar.

The stand-in ``torchvision`` (written to ``bench/.venvs/dc-reference/shim``; there is no CPU torchvision here and
attar never depends on it) has only what the reference's import lines use: ``datasets.FashionMNIST`` (serves
the Fashion-MNIST rows attar loads, saved by this bench as uint8 tensors: attar's 54,000 training rows and
its test split), ``transforms.Compose/ToTensor/Normalize`` (as torchvision: uint8 -> [0, 1] float with a
channel axis, then ``(x - mean) / std``) and ``utils.save_image`` (a no-op: the reference's picture of the
images is not part of an iteration's work).

What is timed. The RUNNER wraps ``utils.get_network`` with a clock before the script starts (the script
imports it from ``utils``): both scripts call it exactly once per outer iteration, first thing in the
iteration (evaluation is off: ``--num_eval 0``, so no other call). The time between consecutive calls is
one whole outer iteration of the authors' own loop (``main_DM.py`` "Train synthetic data": for every class
a real batch of ``batch_real``, DSA, embeddings of real and synthetic images, the mean-embedding loss, then
one SGD step on the images; ``main.py``: ``outer_loop`` gradient-matching updates over all classes with
``inner_loop`` network epochs on the synthetic set between them, from ``get_loops(ipc)``); the last one
ends when the script returns (after it, only a ``torch.save`` of the 100 images). attar runs
``CONDENSERS["dm" | "dc"].run`` on a :class:`~attar.condense.base.CondenseContext` (as
``bench/condense_perf.py``) and is timed by its ``on_step`` callback, called at the end of each outer
iteration. Both sides: one torch thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), the same
interpreter and torch, Fashion-MNIST 28x28x1, IPC 10, ConvNet width 128 / depth 3 / instancenorm / relu /
avgpooling (the reference's defaults, ``--model ConvNet``; attar ``{arch: convnet, width: 128, depth: 3}``),
``batch_real`` 256, ``batch_train`` 256, lr_img 1.0 (DM) / 0.1 (DC), lr_net 0.01, init real (DM) / noise (DC)
as the reference's defaults. DSA: on for DM in both (the reference's DM default,
``color_crop_cutout_flip_scale_rotate``, one transform per class per iteration, mode 'S' = attar's
``single``); off for DC in both (``--method DC``; attar ``dc`` has ``dsa: false``).

Seconds per outer iteration are the median over the timed iterations after the first (the first is a
warm-up) when there are three or more, else the mean of all timed ones.

``--mmap-threshold BYTES`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` (and a trim threshold twice that) for both
processes: above the threshold every tensor is a fresh mapping faulted in page by page, which dominates
CPU time for 100 MB+ activations; rows run so are labelled, to tell the work from the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
CMD = ".venv/bin/python bench/condense_vs_reference.py"
MIRROR = Path("/work/.mirror/VICO-UoE+DatasetCondensation/repo")
HOME = ROOT / "bench" / ".venvs" / "dc-reference"
SAVED = ROOT / "bench" / ".runs" / "condense" / "vs-reference.json"

# Full settings: the authors' defaults for Fashion-MNIST IPC 10. `ref_model` names the reference's network.
FULL = {
    "dm": {"ipc": 10, "batch_real": 256, "width": 128, "ref_model": "ConvNet", "iterations": 5},
    "dm-nodsa": {"ipc": 10, "batch_real": 256, "width": 128, "ref_model": "ConvNet", "iterations": 5},
    "dc": {"ipc": 10, "batch_real": 256, "width": 128, "ref_model": "ConvNet", "iterations": 2},
}
# Smoke test: ConvNetW32 (a reference model name), IPC 1 (get_loops: outer 1, inner 1), small real batches.
QUICK = {
    "dm": {"ipc": 1, "batch_real": 16, "width": 32, "ref_model": "ConvNetW32", "iterations": 3},
    "dm-nodsa": {"ipc": 1, "batch_real": 16, "width": 32, "ref_model": "ConvNetW32", "iterations": 3},
    "dc": {"ipc": 1, "batch_real": 16, "width": 32, "ref_model": "ConvNetW32", "iterations": 3},
}

# ------------------------------------------------------------------ the stand-in torchvision (reference side only)
SHIM = {
    "__init__.py": '"""Stand-in torchvision for the DC/DM reference bench: only the names the reference imports."""\n'
                   "from . import datasets, transforms, utils  # noqa: F401\n",
    "transforms.py": textwrap.dedent('''\
        """Compose / ToTensor / Normalize with torchvision's semantics for uint8 [H, W] images."""
        import torch


        class Compose:
            def __init__(self, transforms):
                self.transforms = transforms

            def __call__(self, x):
                for t in self.transforms:
                    x = t(x)
                return x


        class ToTensor:
            def __call__(self, x):
                x = torch.as_tensor(x)
                if x.dim() == 2:
                    x = x.unsqueeze(0)
                return x.float().div(255) if x.dtype == torch.uint8 else x.float()


        class Normalize:
            def __init__(self, mean, std):
                self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
                self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

            def __call__(self, x):
                return (x - self.mean) / self.std
        '''),
    "datasets.py": textwrap.dedent('''\
        """FashionMNIST serving the rows the bench saved (``attar_fashion_mnist.pt`` in ``root``); no download."""
        import os

        import torch


        class FashionMNIST:
            classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]

            def __init__(self, root, train=True, download=False, transform=None):
                d = torch.load(os.path.join(root, "attar_fashion_mnist.pt"))
                split = "train" if train else "test"
                self.data, self.targets = d[split + "_x"], d[split + "_y"]
                self.transform = transform

            def __len__(self):
                return len(self.targets)

            def __getitem__(self, i):
                x = self.data[i]
                return (self.transform(x) if self.transform else x), int(self.targets[i])
        '''),
    "utils.py": '"""save_image: a no-op (the reference saves a picture at evaluation points; not timed work)."""\n\n\n'
                "def save_image(*args, **kwargs):\n    return None\n",
}

# Runs in the reference's process (cwd: a scratch folder; PYTHONPATH: shim, reference). argv: script, out, threads, args.
RUNNER = textwrap.dedent('''\
    import importlib.util, json, re, runpy, sys, time, types
    import torch
    script, out, threads, patch, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:]
    torch.set_num_threads(threads)
    patched = 0
    if patch:  # modern-torch fixes for the DSA path, applied to the source in memory (files untouched)
        for name, pattern, repl in [
            # a 1-channel crop comes out channels-last, so the conv output is too and `.view` refuses it
            ("networks", r"out\\.view\\(out\\.size\\(0\\), -1\\)", "out.reshape(out.size(0), -1)"),
            # `t[:] = t[0]` writes a tensor onto itself: an error since torch 1.x (upstream issue #20)
            ("utils", r"^(\\s+)(\\w+)\\[:\\] = \\2\\[0\\]$", r"\\1\\2[:] = \\2[0].clone()"),
        ]:
            origin = importlib.util.find_spec(name).origin
            code, n = re.subn(pattern, repl, open(origin).read(), flags=re.M)
            patched += n
            mod = types.ModuleType(name)
            mod.__file__ = origin
            sys.modules[name] = mod
            exec(compile(code, origin, "exec"), mod.__dict__)
    import utils  # the reference's utils.py
    stamps = []
    _get_network = utils.get_network
    def get_network(*a, **k):
        stamps.append(time.perf_counter())
        return _get_network(*a, **k)
    utils.get_network = get_network
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")
    stamps.append(time.perf_counter())
    json.dump({"stamps": stamps, "threads": torch.get_num_threads(), "torch": torch.__version__, "patched": patched},
              open(out, "w"))
''')


def prepare_reference(reference: str | None) -> tuple[Path, str]:
    """The reference's folder and its commit: ``--reference DIR`` as given, else an export of the local snapshot."""
    if reference:
        src = Path(reference).resolve()
        if not (src / "main_DM.py").exists() or not (src / "utils.py").exists():
            raise SystemExit(f"--reference {src}: not a DatasetCondensation checkout (no main_DM.py / utils.py); "
                             "clone https://github.com/VICO-UoE/DatasetCondensation and pass its folder.")
        p = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
        return src, (p.stdout.strip() if p.returncode == 0 else "unknown commit")
    if not MIRROR.exists():
        raise SystemExit("no reference code: pass --reference DIR, a clone of https://github.com/VICO-UoE/DatasetCondensation")
    commit = subprocess.run(["git", "-C", str(MIRROR), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    src = HOME / "src"
    stamp = src / ".commit"
    if not stamp.exists() or stamp.read_text() != commit:
        src.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
        stamp.write_text(commit)
    return src, commit


def prepare_shim_and_data() -> tuple[Path, Path]:
    """Write the stand-in torchvision and attar's Fashion-MNIST rows (uint8) for the reference to read."""
    shim = HOME / "shim" / "torchvision"
    shim.mkdir(parents=True, exist_ok=True)
    for name, text in SHIM.items():
        if not (shim / name).exists() or (shim / name).read_text() != text:
            (shim / name).write_text(text)
    data = HOME / "data"
    f = data / "attar_fashion_mnist.pt"
    if not f.exists():
        import torch

        from attar.data import load_data
        from attar.specs import DataSpec

        b = load_data(DataSpec(name="fashion-mnist"))
        u8 = lambda x: x.mul(255).round().to(torch.uint8).squeeze(1).contiguous()  # noqa: E731  ([0,1] from uint8: exact)
        data.mkdir(parents=True, exist_ok=True)
        torch.save({"train_x": u8(b.train.x), "train_y": b.train.y.clone(), "test_x": u8(b.test.x),
                    "test_y": b.test.y.clone()}, f)
    return shim.parent, data


MMAP = 0  # --mmap-threshold: glibc's MALLOC_MMAP_THRESHOLD_ for both sides (0: the default, dynamic, at most 32 MB)


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CI="true")
    if MMAP:
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP), MALLOC_TRIM_THRESHOLD_=str(2 * MMAP))
    return env


def _label(r: dict) -> str:
    return r["method"] + (f", glibc mmap threshold {r['mmap'] / 2**30:.0f} GiB" if r.get("mmap") else "")


def per_iteration(steps: list[float]) -> float:
    return statistics.median(steps[1:]) if len(steps) >= 3 else statistics.mean(steps)


def run_reference(method: str, s: dict, src: Path, shim: Path, data: Path, threads: int) -> dict:
    script = src / ("main.py" if method == "dc" else "main_DM.py")
    args = ["--dataset", "FashionMNIST", "--model", s["ref_model"], "--ipc", str(s["ipc"]), "--num_exp", "1",
            "--num_eval", "0", "--Iteration", str(s["iterations"] - 1), "--batch_real", str(s["batch_real"]),
            "--batch_train", "256", "--data_path", str(data)]
    if method == "dc":
        args += ["--method", "DC"]
    if method == "dm-nodsa":
        args += ["--dsa_strategy", "none"]
    patch = "1" if method == "dm" else "0"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stamps.json"
        env = dict(_env(threads), PYTHONPATH=os.pathsep.join([str(shim), str(src)]))
        p = subprocess.run([sys.executable, "-c", RUNNER, str(script), str(out), str(threads), patch,
                            *args, "--save_path", str(Path(tmp) / "result")], cwd=tmp, env=env,
                           capture_output=True, text=True)
        if p.returncode != 0 or not out.exists():
            print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"reference {script.name} failed")
        r = json.loads(out.read_text())
    st = r["stamps"]
    steps = [b - a for a, b in zip(st, st[1:])]
    if len(steps) != s["iterations"]:
        raise SystemExit(f"reference {script.name}: expected {s['iterations']} get_network calls, got {len(steps)}")
    return {"steps": steps, "seconds_per_iteration": per_iteration(steps), "threads": r["threads"],
            "patched_lines": r["patched"]}


def attar_child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    from attar.condense import CONDENSERS
    from attar.condense.base import CondenseContext
    from attar.data import load_data
    from attar.specs import DataSpec, ModelSpec

    b = load_data(DataSpec(name="fashion-mnist"))
    stamps: list[float] = []
    dm = cfg["method"].startswith("dm")
    ctx = CondenseContext(x=b.train.x, y=b.train.y, num_classes=10, ipc=cfg["ipc"], iterations=cfg["iterations"],
                          seed=0, model=ModelSpec(arch="convnet", width=cfg["width"], depth=3), mean=b.mean, std=b.std,
                          init="real" if dm else "noise", on_step=lambda i, m: stamps.append(time.perf_counter()))
    params = {"batch_real": cfg["batch_real"], "lr_img": 1.0 if dm else 0.1}
    if not dm:
        params.update(batch_train=256, lr_net=0.01)
    if cfg["method"] == "dm-nodsa":
        params["dsa"] = False
    method = CONDENSERS.get("dm" if dm else "dc")(params)
    t0 = time.perf_counter()
    method.run(ctx)
    steps = [b_ - a for a, b_ in zip([t0] + stamps, stamps)]
    return {"steps": steps, "seconds_per_iteration": per_iteration(steps), "threads": torch.get_num_threads(),
            "params": method.p.model_dump()}


def run_attar(method: str, s: dict, threads: int) -> dict:
    cfg = {"method": method, "threads": threads, **{k: s[k] for k in ("ipc", "batch_real", "width", "iterations")}}
    p = subprocess.run([sys.executable, __file__, "--attar-child", json.dumps(cfg)], capture_output=True, text=True,
                       env=_env(threads))
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"attar {method} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def sweep_child(threads: int, reps: int = 3) -> dict:
    """Seconds of DM's and DC's big passes at ConvNet-128 by rows per call (median of ``reps``): where the time goes."""
    import resource

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from attar.condense.base import CondenseContext, embed_fn
    from attar.condense.chunking import backward_rows, forward_rows, mean_loss_grads
    from attar.data import load_data
    from attar.specs import DataSpec, ModelSpec

    b = load_data(DataSpec(name="fashion-mnist"))
    ctx = CondenseContext(x=b.train.x, y=b.train.y, num_classes=10, ipc=10, iterations=1, seed=0,
                          model=ModelSpec(arch="convnet", width=128, depth=3), mean=b.mean, std=b.std)
    g = torch.Generator().manual_seed(0)
    xr, xs = ctx.real_batch(256, g)[0], ctx.real_batch(10, g)[0]
    net = ctx.fresh_model("sweep", 0).train()
    emb, ps = embed_fn(net), list(net.parameters())
    ce = lambda a, y: F.cross_entropy(net(a), y)  # noqa: E731
    y256, y100 = torch.zeros(256, dtype=torch.long), torch.arange(10).repeat_interleave(10)

    def dm_real(rows):
        with torch.no_grad():
            forward_rows(emb, xr, rows)

    def dm_syn(rows):
        x = xs.clone().requires_grad_(True)
        forward_rows(emb, x, rows).square().sum().backward()

    def dc_real(rows):
        mean_loss_grads(ce, xr[:256], y256, ps, rows)

    def dc_inner(rows):
        backward_rows(ce, xs, y100, rows)

    cases = [("DM real embeddings, 2,560 rows, no grad", dm_real, [None, 256, 64, 32]),
             ("DM synthetic embeddings, 100 rows, forward + backward", dm_syn, [None, 32]),
             ("DC one class's real gradient, 256 rows", dc_real, [None, 32]),
             ("DC one inner network step, 100 rows", dc_inner, [None, 32])]
    out = []
    for name, fn, sizes in cases:
        for rows in sizes:
            ts = []
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(reps):
                t = time.perf_counter()
                fn(rows)
                ts.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_t, user_t = r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime
            out.append({"pass": name, "rows": rows, "seconds": statistics.median(ts),
                        "system_share": sys_t / max(1e-9, sys_t + user_t)})
    return {"rows": out, "threads": torch.get_num_threads()}


def render(rows: list[dict], meta: dict, sweep: dict | None = None, sweep_mmap: dict | None = None) -> str:
    lines = [
        "## Condensation vs the authors' code: one outer iteration of DM and DC",
        "",
        f"Regenerate: `{CMD}` ({meta['seconds'] / 60:.0f} min in all"
        + ("; the rows labelled *glibc mmap threshold* with `--mmap-threshold 4294967296` added"
           if any(r.get("mmap") for r in rows) else "")
        + ("; the dc rows here with `--methods dc --iterations 1`"
           if any(r["method"] == "dc" and len(r["reference"]["steps"]) == 1 for r in rows) else "")
        + ("; the tables of passes with `--sweep` and `--sweep --mmap-threshold 4294967296`" if sweep else "")
        + "; `--reference DIR` to use a clone of "
        "https://github.com/VICO-UoE/DatasetCondensation, else the snapshot on this machine is exported to "
        f"`bench/.venvs/dc-reference/`). Reference commit `{meta['commit'][:12]}`, run as its own scripts in its own process "
        "with a stand-in `torchvision` that only hands it the Fashion-MNIST rows attar loads (see the script's "
        f"docstring). Same interpreter, torch {meta['torch']}, CPU, {meta['threads']} torch thread(s) on both sides. "
        + (f"**{meta['note']}** " if meta.get("note") else "")
        + "Fashion-MNIST 28×28×1, IPC 10, ConvNet width 128 / depth 3 / instancenorm / ReLU / avgpool (the "
        "reference's defaults), `batch_real` 256. Rows: *dm*, DSA on in both (the reference DM's default; its DSA "
        "path needs two modern-torch fixes, applied to its source in memory, files untouched: `t[:] = t[0].clone()` for "
        "the ten Siamese `t[:] = t[0]` lines, upstream issue #20, and `.reshape` for the ConvNet's `out.view(n, -1)`, "
        "which a 1-channel crop's channels-last strides break); *dm-nodsa*, DSA off in both (`--dsa_strategy none`, "
        "the reference unmodified); *dc*, DSA off in both (`--method DC`, unmodified), `outer_loop` 10 / `inner_loop` "
        "50 from the reference's `get_loops(10)` on both sides.",
        "",
        "| method | timed iterations | reference s / iteration | attar s / iteration | attar / reference (goal ≤ 0.5) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ref, att = r["reference"], r["attar"]
        lines.append(f"| {_label(r)} | {len(ref['steps'])} / {len(att['steps'])} | "
                     f"{ref['seconds_per_iteration']:.2f} ({', '.join(f'{v:.1f}' for v in ref['steps'])}) | "
                     f"{att['seconds_per_iteration']:.2f} ({', '.join(f'{v:.1f}' for v in att['steps'])}) | "
                     f"{att['seconds_per_iteration'] / ref['seconds_per_iteration']:.2f} |")
    lines += [
        "",
        "*s / iteration*: median over the timed iterations after the first (a warm-up) when there are three or more, "
        "else their mean; every iteration's seconds in brackets. The reference is timed between its own calls of "
        "`get_network`, which both scripts make once at the start of each outer iteration (evaluation off with "
        "`--num_eval 0`); attar by `CondenseContext.on_step` at the end of each outer iteration.",
    ]
    if sweep:
        lines += [
            "",
            f"Where the time goes (`{CMD} --sweep`, {sweep['threads']} thread, median of 3, same machine): seconds "
            "of the big passes of one iteration by rows per call, glibc's default allocator settings. A ConvNet-128 "
            "activation of 256 rows (one reference class) is 134 MB, of 2,660 rows (attar's one DM batch before this "
            "change) 1.4 GB: above glibc's mmap threshold (dynamic, at most 32 MB), so each is a fresh mapping, "
            "faulted in and zeroed page by page and unmapped when freed, so much of the time is the kernel's (*system "
            "share*: system CPU time over all CPU time of that pass). 32 rows (16.8 MB) stay under it. attar now "
            "chunks so on CPU for networks without BatchNorm (`attar.condense.chunking`: the same values, tested; a "
            "BatchNorm net in training mode couples its rows through batch statistics and is not chunked; GPUs get "
            "the whole batch)." + (f" Last column: the same with `--mmap-threshold {sweep_mmap['mmap']}` (run at another time: compare "
                                   "within a column)." if sweep_mmap else ""),
            "",
            "| pass | rows per call | seconds | system share | " + ("seconds, mmap threshold raised |" if sweep_mmap else ""),
            "|---|---|---|---|" + ("---|" if sweep_mmap else ""),
        ]
        other = {(r["pass"], r["rows"]): r["seconds"] for r in (sweep_mmap or {}).get("rows", [])}
        for r in sweep["rows"]:
            o = other.get((r["pass"], r["rows"]))
            share = f"{100 * r['system_share']:.0f}%" if "system_share" in r else "—"
            lines.append(f"| {r['pass']} | {r['rows'] or 'all'} | {r['seconds']:.2f} | {share} |"
                         + (f" {o:.2f} |" if o is not None else (" — |" if sweep_mmap else "")))
    by = {(r["method"], bool(r.get("mmap"))): r for r in rows}
    pairs = [m for m in ("dm", "dm-nodsa", "dc") if (m, False) in by and (m, True) in by]
    if pairs:
        ratio = lambda r: r["attar"]["seconds_per_iteration"] / r["reference"]["seconds_per_iteration"]  # noqa: E731
        lines += [
            "",
            "What the ratio says. " + "; ".join(f"{m}: {ratio(by[(m, False)]):.2f} at glibc's defaults, "
                                                f"{ratio(by[(m, True)]):.2f} with the mmap threshold raised on both "
                                                "sides" for m in pairs) + ". "
            "attar's lead over the reference at the defaults is the allocator effect above, which the reference "
            "loses too when `MALLOC_MMAP_THRESHOLD_` is raised (its own 256-row class batches then stop faulting). "
            "With that taken out both do the same arithmetic in the same time: the convolutions of "
            "C × batch_real real rows per iteration (DM: forward only; DC: forward and backward, `outer_loop` times, "
            "plus `(outer_loop − 1) × inner_loop` steps on the synthetic set), which batching over classes does not "
            "reduce. So the goal of ≤ 0.5× is not met on a CPU thread by doing the same work faster; it would take "
            "less work (e.g. fewer real rows, lower precision) or more parallel hardware, neither a like-for-like "
            "comparison. GPU timings were not measured (no GPU here).",
        ]
    if meta.get("analysis"):
        lines += ["", meta["analysis"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", help="a clone of https://github.com/VICO-UoE/DatasetCondensation")
    ap.add_argument("--quick", action="store_true", help="tiny network and batches, a few iterations; prints only")
    ap.add_argument("--methods", default="dm,dm-nodsa,dc", help="comma-separated: dm, dm-nodsa, dc")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, help="timed outer iterations per side (default: dm 5, dc 2)")
    ap.add_argument("--note", default="", help="a line for the doc, e.g. that the machine was shared")
    ap.add_argument("--sweep", action="store_true", help="time the big passes by rows per call (saved, then rendered)")
    ap.add_argument("--render", action="store_true", help="rewrite the doc section from the saved results only")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="bytes: glibc MALLOC_MMAP_THRESHOLD_ for both sides (rows labelled so); 0 = glibc's default")
    ap.add_argument("--attar-child")
    ap.add_argument("--sweep-child", action="store_true")
    a = ap.parse_args()
    global MMAP
    MMAP = a.mmap_threshold
    if a.attar_child:
        print(json.dumps(attar_child(json.loads(a.attar_child))))
        return
    if a.sweep_child:
        print(json.dumps(sweep_child(a.threads)))
        return
    saved = json.loads(SAVED.read_text()) if SAVED.exists() else {}
    sweep_file = SAVED.with_name("vs-reference-sweep-mmap.json" if MMAP else "vs-reference-sweep.json")
    sw_files = [SAVED.with_name("vs-reference-sweep.json"), SAVED.with_name("vs-reference-sweep-mmap.json")]
    sweeps = [json.loads(f.read_text()) if f.exists() else None for f in sw_files]
    if a.sweep:
        p = subprocess.run([sys.executable, __file__, "--sweep-child", "--threads", str(a.threads)],
                           capture_output=True, text=True, env=_env(a.threads))
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit("sweep failed")
        sw = dict(json.loads(p.stdout.strip().splitlines()[-1]), mmap=MMAP)
        for r in sw["rows"]:
            print(f"{r['pass']:55s} rows {str(r['rows'] or 'all'):>4s}  {r['seconds']:.2f} s  "
                  f"system {100 * r['system_share']:.0f}%")
        sweep_file.parent.mkdir(parents=True, exist_ok=True)
        sweep_file.write_text(json.dumps(sw, indent=2))
    if a.sweep or a.render:
        if not saved:
            raise SystemExit(f"no saved results in {SAVED}: run the bench first")
        sweeps = [json.loads(f.read_text()) if f.exists() else None for f in sw_files]
        meta = dict(saved["meta"], note=a.note or saved["meta"].get("note", ""))
        replace_section(DOC, "condense-vs-reference", render(saved["rows"], meta, *sweeps), "Benchmarks")
        return
    t0 = time.perf_counter()
    src, commit = prepare_reference(a.reference)
    shim, data = prepare_shim_and_data()
    print(f"reference: {src} (commit {commit[:12]}{', --reference' if a.reference else ', local snapshot export'})",
          flush=True)
    settings = QUICK if a.quick else FULL
    rows = []
    for method in a.methods.split(","):
        s = dict(settings[method])
        if a.iterations:
            s["iterations"] = a.iterations
        ref = run_reference(method, s, src, shim, data, a.threads)
        print(f"{method}: reference {ref['seconds_per_iteration']:.2f} s/it {[round(v, 2) for v in ref['steps']]}",
              flush=True)
        att = run_attar(method, s, a.threads)
        print(f"{method}: attar     {att['seconds_per_iteration']:.2f} s/it {[round(v, 2) for v in att['steps']]}  "
              f"ratio {att['seconds_per_iteration'] / ref['seconds_per_iteration']:.2f}", flush=True)
        rows.append({"method": method, "mmap": MMAP, "settings": s, "reference": ref, "attar": att})
    import torch

    meta = {"seconds": time.perf_counter() - t0, "commit": commit, "torch": torch.__version__, "threads": a.threads,
            "note": a.note}
    if not a.quick and saved:  # a subset of methods: replace those rows, keep the others
        done = {_label(r) for r in rows}
        order = ["dm", "dm-nodsa", "dc"]
        rows = sorted([r for r in saved["rows"] if _label(r) not in done] + rows,
                      key=lambda r: (bool(r.get("mmap")), order.index(r["method"])))
        if done != {_label(r) for r in rows}:
            meta["seconds"] += saved["meta"]["seconds"]
    text = render(rows, meta, *(sweeps if not a.quick else [None, None]))
    print(text)
    if not a.quick:
        SAVED.parent.mkdir(parents=True, exist_ok=True)
        SAVED.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
        replace_section(DOC, "condense-vs-reference", text, "Benchmarks")


if __name__ == "__main__":
    main()
