"""attar against torchdistill (``torchdistill==1.1.5``) on the same vision distillation, in one run.

The same work on both sides:

* **teacher**: one ConvNet (width 32, depth 3) trained once by attar on Fashion-MNIST and saved as an attar model
  artifact (``bench/.runs/vs_torchdistill/teacher``); both sides load those exact weights (their sha256 is checked);
* **student**: ConvNet width 8, depth 2, built from the same seed, so both start from the same weights (checked);
* **data**: attar's built-in Fashion-MNIST loader (``attar.data``), the same training rows, batch 256, last partial
  batch dropped, and the same row order: torchdistill's ``DataLoader`` gets a sampler that draws each epoch's
  permutation exactly as attar's Trainer does (``attar.rng.generator(seed, 1, epoch)``), so both see the same batches;
* **optimiser**: SGD, momentum 0.9, Nesterov, weight decay 5e-4, lr 0.05, cosine to 0 over the run, stepped per step
  (attar: ``schedule: cosine``; torchdistill: ``CosineAnnealingLR(T_max=steps)`` with ``scheduling_step: 1``);
* **loss**: Hinton KD, ``α·CE + (1−α)·T²·KL(p_T ‖ q_T)`` at T = 4, α = 0.5 (attar: objective ``kd``; torchdistill:
  its ``KDLoss`` inside a ``WeightedSumLoss``, both built from a config dict as its YAML configs do);
* **loop**: attar's ``Trainer.fit``; torchdistill's ``DistillationBox`` driven as its own example
  (``examples/torchvision/image_classification.py``: ``pre_epoch_process``, ``forward_process``,
  ``post_forward_process``, ``loss.item()`` and a NaN/Inf check each step, ``post_epoch_process``; its
  logging and its re-collation of the (here empty) supplementary dicts left out).
  The teacher is frozen (``requires_grad: False``: torchdistill runs it under ``no_grad``) and in eval mode on both.

Each measurement is a fresh process, all in one venv, ``bench/.venvs/torchdistill`` (made by this script when missing:
``torch==2.14.1 torchvision==0.29.1`` (torchdistill imports torchvision, which has no build for attar's torch 2.13
here), then ``torchdistill==1.1.5``, then attar itself, editable and ``--no-deps``, with its other dependencies), so
both sides run on the same torch; torchdistill is never an attar dependency. Per seed the two sides run back to
back, the order alternating between seeds. Reported: samples/s from building the trainer (attar's ``Trainer``;
torchdistill's ``DistillationBox`` with its optimiser and data loader) to the last step, peak resident memory of the
process at the end of training (``ru_maxrss``), minor page faults and user CPU seconds per step (counts other jobs on
the machine hardly change), the loss of the first step (same weights, same batch: must agree) and the test accuracy
of both students after the same number of steps (attar's evaluation code for both).

    .venv/bin/python bench/vs_torchdistill.py [--steps 420] [--seeds 3] [--threads 1]   # alone on the machine
    .venv/bin/python bench/vs_torchdistill.py --steps 5 --seeds 1 --no-doc             # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / ".runs" / "vs_torchdistill"
VENV = ROOT / "bench" / ".venvs" / "torchdistill"
TD_VERSION = "1.1.5"
TORCH, TORCHVISION = "2.14.1", "0.29.1"

TEACHER = {"arch": "convnet", "width": 32, "depth": 3}
STUDENT = {"arch": "convnet", "width": 8, "depth": 2}
BATCH, LR, MOMENTUM, WD, T, ALPHA = 256, 0.05, 0.9, 5e-4, 4.0, 0.5


# ------------------------------------------------------------------ the venv both sides run in

def ensure_venv() -> tuple[Path, str]:
    """The torchdistill venv's python (made when missing or incomplete) and what ``pip check`` says there."""
    py = VENV / "bin" / "python"
    probe = ("import sys, torch, torchvision, torchdistill, attar; "
             f"sys.exit(not (torchdistill.__version__ == '{TD_VERSION}' and torch.__version__.startswith('{TORCH}') "
             f"and attar.__file__.startswith({str(ROOT / 'src')!r})))")
    ok = py.exists() and subprocess.run([str(py), "-c", probe], check=False, capture_output=True).returncode == 0
    if not ok:
        print(f"making {VENV} (torch {TORCH} + torchvision {TORCHVISION}, torchdistill {TD_VERSION}, attar; "
              "~6 GB, a few minutes)", flush=True)
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        # torchvision first, with the torch it was built for (pip takes both from this machine's disk)
        subprocess.run(pip + [f"torch=={TORCH}", f"torchvision=={TORCHVISION}"], check=True)
        subprocess.run(pip + [f"torchdistill=={TD_VERSION}"], check=True)
        # attar pins torch<2.14 (its CPU build); here both sides must share torchvision's torch, so attar goes in
        # without its dependencies, which are then installed from pyproject.toml minus torch
        subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
        subprocess.run(pip + _attar_deps_without_torch(), check=True)
        if subprocess.run([str(py), "-c", probe], check=False, capture_output=True).returncode:
            raise SystemExit(f"{VENV} was made but does not import torch {TORCH}, torchdistill {TD_VERSION} and attar")
    check = subprocess.run([str(py), "-m", "pip", "check"], check=False, capture_output=True, text=True)
    return py, (check.stdout + check.stderr).strip()


def _attar_deps_without_torch() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if d.split(">")[0].split("<")[0].split("=")[0].strip() != "torch"]


# ------------------------------------------------------------------ the shared inputs

def _data():
    from attar.data import load_data
    from attar.specs import DataSpec

    return load_data(DataSpec(name="fashion-mnist"))


def _sha(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_dir(epochs: int) -> Path:
    return OUT / f"teacher-e{epochs}"


def prepare_teacher(epochs: int, threads: int) -> None:
    """Train the teacher once with attar (AdamW, cosine) and save it; reused while its folder exists."""
    import torch

    from attar.distill.objectives import build_objective
    from attar.metrics import classification_metrics
    from attar.models import build_model, save_model
    from attar.specs import ModelSpec
    from attar.train.config import TrainConfig
    from attar.train.task import predict
    from attar.train.trainer import Trainer

    folder = teacher_dir(epochs)
    if (folder / "manifest.json").exists():
        return
    torch.set_num_threads(threads)
    b = _data()
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(**TEACHER), b.input_shape, len(b.classes), b.mean, b.std)
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=2e-3, checkpoint_every=0)
    print(f"training the teacher once ({epochs} epochs; saved to {folder})", flush=True)
    Trainer(teacher, build_objective({"name": "ce"}), b.train.x, b.train.y, cfg, seed=0, progress=False).fit()
    acc = classification_metrics(predict(teacher, b.test.x), b.test.y)["accuracy"]
    save_model(folder, teacher, extra={"test_accuracy": acc, "epochs": epochs})
    print(f"teacher test accuracy {acc:.4f}", flush=True)


# ------------------------------------------------------------------ one side, in its own process

def run_side(args) -> None:
    import torch

    # torch.optim's first optimizer imports torch._dynamo (~0.5 s); torchdistill's import (torchvision) already did,
    # outside the timed part, so it is imported here for both sides before any clock starts
    import torch._dynamo

    from attar.metrics import classification_metrics
    from attar.models import build_model, load_model
    from attar.specs import ModelSpec
    from attar.train.task import predict

    torch.set_num_threads(args.threads)
    b = _data()
    x, y = b.train.x, b.train.y
    teacher, info = load_model(teacher_dir(args.teacher_epochs))  # sha256-checked against its manifest
    teacher.eval()
    torch.manual_seed(args.seed)
    student = build_model(ModelSpec(**STUDENT), b.input_shape, len(b.classes), b.mean, b.std)
    shas = {"teacher": _sha(teacher), "student_init": _sha(student)}
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.mode == "attar":
        seconds, first_loss, r0, r1 = _attar(args, student, teacher, x, y)
    else:
        seconds, first_loss, r0, r1 = _torchdistill(args, student, teacher, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KiB)
    m = classification_metrics(predict(student, b.test.x), b.test.y)
    print(json.dumps({
        "mode": args.mode, "seed": args.seed, "steps": args.steps, "rows": len(x), "seconds": seconds,
        "samples_per_s": args.steps * BATCH / seconds, "peak_rss_mb": peak, "rss_before_training_mb": rss_built,
        "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / args.steps,
        "user_s_per_step": (r1.ru_utime - r0.ru_utime) / args.steps,
        "first_loss": first_loss, "test_accuracy": m["accuracy"], "test_nll": m["nll"],
        "teacher_test_accuracy": info.get("test_accuracy"), "torch": torch.__version__, **shas,
    }))


def _attar(args, student, teacher, x, y):
    from attar.distill.objectives import build_objective
    from attar.train.config import TrainConfig
    from attar.train.trainer import Trainer

    cfg = TrainConfig(steps=args.steps, batch_size=BATCH, optimizer="sgd", lr=LR, momentum=MOMENTUM,
                      weight_decay=WD, schedule="cosine", checkpoint_every=0, device="cpu")
    first: list[float] = []
    record = lambda step, m: first.append(m["train_loss"]) if step == 1 and "train_loss" in m else None
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()  # set-up counts, as on the other side
    trainer = Trainer(student, build_objective({"name": "kd", "temperature": T, "alpha": ALPHA}), x, y, cfg,
                      seed=args.seed, teachers=[teacher], on_metrics=record, progress=False)
    trainer.fit()
    seconds = time.perf_counter() - t0
    return seconds, first[0], r0, resource.getrusage(resource.RUSAGE_SELF)


class AttarOrder:
    """A torch sampler that visits the rows in attar's epoch order: ``randperm(n, generator(seed, 1, epoch))``."""

    def __init__(self, data_source, seed: int):
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def __iter__(self):
        import torch

        from attar import rng

        order = torch.randperm(self.n, generator=rng.generator(self.seed, 1, self.epoch))
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def _torchdistill(args, student, teacher, x, y):
    import math

    import torch
    from torch.utils.data import Dataset
    from torchdistill.core.distillation import DistillationBox

    class Rows(Dataset):  # the in-memory tensors attar.data gives, one row at a time as a torch Dataset does
        def __getitem__(self, i):
            return x[i], y[i]

        def __len__(self):
            return len(x)

    per_epoch = len(x) // BATCH
    epochs = math.ceil(args.steps / per_epoch)
    config = {
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": AttarOrder, "kwargs": {"seed": args.seed}},
            "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},  # as its sample configs
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "nesterov": True}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": args.steps}, "scheduling_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
            "student_module_path": ".", "student_module_io": "output",
            "teacher_module_path": ".", "teacher_module_io": "output",
            "temperature": T, "alpha": ALPHA, "reduction": "batchmean"}}, "weight": 1.0}}}},
        "num_epochs": epochs,
    }
    device = torch.device("cpu")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()  # set-up counts, as on the other side
    box = DistillationBox(teacher, student, {"train": Rows()}, config, device, None, False, 1)
    first, step = None, 0
    # torchdistill's example loop (train_one_epoch), less its MetricLogger and its default_collate(supp_dict):
    # the supplementary dicts are empty here (BaseDatasetWrapper), and re-collating the collated {} fails
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            value = loss.item()
            if first is None:
                first = value
            if torch.isnan(loss) or torch.isinf(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")
            step += 1
            if step == args.steps:
                break
        box.post_epoch_process()
        if step == args.steps:
            break
    seconds = time.perf_counter() - t0
    return seconds, first, r0, resource.getrusage(resource.RUSAGE_SELF)


# ------------------------------------------------------------------ driver

def _child(python: Path, mode: str, seed: int, args) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--mode", mode, "--seed", str(seed), "--steps", str(args.steps),
           "--threads", str(args.threads), "--teacher-epochs", str(args.teacher_epochs)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} (seed {seed}) failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=420, help="optimizer steps per side (210 = one epoch of 54k rows)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (1: least disturbed by other jobs)")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--mode", choices=["attar", "torchdistill"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="print only (a smoke test)")
    args = ap.parse_args()
    if args.mode:
        return run_side(args)
    t_start = time.perf_counter()
    python, pip_check = ensure_venv()
    print(f"pip check in {VENV.relative_to(ROOT)}: {pip_check}", flush=True)
    subprocess.run([str(python), str(Path(__file__).resolve()), "--prepare", str(args.teacher_epochs),
                    str(args.threads)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    runs: list[dict] = []
    for s in range(args.seeds):
        for mode in (("attar", "torchdistill") if s % 2 == 0 else ("torchdistill", "attar")):
            r = _child(python, mode, s, args)
            runs.append(r)
            print(f"seed {s} {mode:12s} {r['samples_per_s']:7.0f} samples/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"faults/step {r['faults_per_step']:6.0f}  user s/step {r['user_s_per_step']:.4f}  "
                  f"first loss {r['first_loss']:.6f}  test acc {r['test_accuracy']:.4f}  "
                  f"teacher {r['teacher']} student0 {r['student_init']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "pip_check": pip_check, "runs": runs}, indent=1))
    body = report(args, runs, pip_check, time.perf_counter() - t_start)
    print(body)
    if not args.no_doc:
        sys.path.insert(0, str(ROOT / "bench"))
        from _doc import replace_section

        replace_section(ROOT / "docs" / "benchmarks.md", "vs-torchdistill", body, "Benchmarks")
        print("wrote docs/benchmarks.md")


def report(args, runs: list[dict], pip_check: str, wall: float) -> str:
    by = {m: sorted((r for r in runs if r["mode"] == m), key=lambda r: r["seed"]) for m in ("attar", "torchdistill")}
    a, d = by["attar"], by["torchdistill"]
    for ra, rd in zip(a, d):  # the same work, or the comparison means nothing
        if (ra["teacher"], ra["student_init"]) != (rd["teacher"], rd["student_init"]):
            raise SystemExit(f"seed {ra['seed']}: the two sides did not start from the same weights")
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    diff_txt = ", ".join(f"{v * 100:+.2f}" for v in [x - z for x, z in zip([r["test_accuracy"] for r in a],
                                                                             [r["test_accuracy"] for r in d])])
    thr = [ra["samples_per_s"] / rd["samples_per_s"] for ra, rd in zip(a, d)]
    mem = [ra["peak_rss_mb"] / rd["peak_rss_mb"] for ra, rd in zip(a, d)]
    acc_a, acc_d = [r["test_accuracy"] for r in a], [r["test_accuracy"] for r in d]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    diffs = [x - z for x, z in zip(acc_a, acc_d)]
    noise = max(sd(acc_a), sd(acc_d))
    same = all(abs(v) <= max(noise, 0.005) for v in diffs)
    rows = []
    for name, rs in (("attar (`Trainer.fit`, objective `kd`)", a), (f"torchdistill {TD_VERSION} (`DistillationBox`, `KDLoss`)", d)):
        acc = [r["test_accuracy"] for r in rs]
        firsts = ", ".join(f"{r['first_loss']:.6f}" for r in rs)
        rows.append(f"| {name} | {med(rs, 'samples_per_s'):.0f} | {med(rs, 'peak_rss_mb'):.0f} "
                    f"| {med(rs, 'rss_before_training_mb'):.0f} | {med(rs, 'faults_per_step'):,.0f} "
                    f"| {med(rs, 'user_s_per_step'):.4f} | {statistics.mean(acc) * 100:.2f} ± {sd(acc) * 100:.2f} "
                    f"| {firsts} |")
    teacher_acc = a[0].get("teacher_test_accuracy")
    pip_line = pip_check.replace("\n", "; ")
    return f"""## Vision distillation: attar vs torchdistill (`torchdistill=={TD_VERSION}`), same work

Fashion-MNIST (attar's loader, {args.steps} steps of batch {BATCH} over the {a[0]['rows']:,} training rows, the same row order
on both sides); teacher ConvNet width 32 depth 3 trained once by attar ({args.teacher_epochs} epochs, test accuracy
{teacher_acc * 100:.2f} %), the same weights loaded by both (sha256 `{a[0]['teacher']}`); student ConvNet width 8
depth 2 from the same initial weights per seed; SGD (momentum 0.9, Nesterov, weight decay 5e-4, lr {LR}, cosine to 0
per step); Hinton KD α·CE + (1−α)·T²·KL at T = {T:g}, α = {ALPHA}; teacher frozen, in eval mode, under `no_grad`.
attar runs `Trainer.fit`; torchdistill runs its `DistillationBox` built from a config dict (`KDLoss` in a
`WeightedSumLoss`, `SGD`, `CosineAnnealingLR` stepped per step, its `DataLoader` over the same in-memory rows)
in the loop of its own image-classification example. Each side a fresh process, both in one venv
(`bench/.venvs/torchdistill`: torch {a[0]['torch']}, torchvision {TORCHVISION}, torchdistill {TD_VERSION}, attar
installed `--no-deps`); {args.seeds} seed(s), the two sides back to back per seed, the order alternating;
{args.threads} thread(s) per side, {platform.machine()}. Medians over seeds; accuracy mean ± std over seeds.

| | samples / s | peak RSS (MB) | peak RSS before training (MB) | minor page faults / step | user CPU s / step | test accuracy (%) | loss of the first step, per seed |
|---|---|---|---|---|---|---|---|
{rows[0]}
{rows[1]}

**attar / torchdistill**: throughput **{statistics.median(thr):.2f}×** (per seed {", ".join(f"{v:.2f}" for v in thr)}; goal ≥ 1.0),
peak memory **{statistics.median(mem):.2f}×** (per seed {", ".join(f"{v:.2f}" for v in mem)}; goal ≤ 1.0); test accuracy
difference per seed {diff_txt} points, against a seed-to-seed std of {noise * 100:.2f} (equal: every difference within
max(that std, 0.5 points)):
{'equal within seed noise' if same else 'NOT equal within seed noise'}. The first step's loss (same weights, same batch, before any update) agrees on both sides,
so they optimise the same objective.

Where the time goes: both sides run the same operators (torch.profiler) and spend about the same user CPU per step; the
difference is kernel time for minor page faults (memory the allocator handed back and took again, zeroed by the
kernel). attar's Trainer raises glibc's trim and mmap thresholds for CPU runs (`attar.allocator.keep_freed_memory`), so
a step's buffers are reused by the next: its faults per step stay near 16k where torchdistill's vary from run to run
(16k–33k here), with the same peak memory. Before that setting attar measured 0.88× on this bench.

Peak RSS is the process's high-water mark at the end of training (imports, data, both models, training), read by
`getrusage`; samples/s, page faults and user CPU time cover building the trainer (attar's `Trainer`, torchdistill's
`DistillationBox` with its optimiser and data loader) and the training loop; page faults and user CPU hardly change with other load
on the machine, unlike samples/s. `pip check` in that venv: {pip_line or 'no problems'} (attar pins torch < 2.14 for its
CPU build; torchvision 0.29.1 needs torch 2.14.1). Whole run {wall / 60:.1f} min.

Reproduce (alone on the machine): `.venv/bin/python bench/vs_torchdistill.py --steps {args.steps} --seeds {args.seeds}
--threads {args.threads}` (it makes `bench/.venvs/torchdistill` on first use, ~6 GB, and trains the teacher once).
"""


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--prepare":  # the teacher, trained in the shared venv
        prepare_teacher(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
