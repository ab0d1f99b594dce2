"""attar's LM distillation against TRL's (``trl==1.16.0``, its GKD trainer) on the same work, in one run.

Same pair (teacher SmolLM2-135M-Instruct; student the same with half its layers dropped by ``attar.text.lm_prune``,
saved once as an HF folder both tools load), same data (packed fortunes blocks, every position scored), same batch,
sequence length, optimiser (AdamW, lr 1e-5, no weight decay), float32, no gradient checkpointing, same batch order.
The loss is the same on both sides: forward KL(teacher ‖ student) at T=1 per token, pure distillation, off-policy
(TRL: ``GKDTrainer`` with ``lmbda=0`` (never generates), ``beta=0`` (its generalized JSD is then forward KL)).

Each measurement runs in a fresh process (peak RSS is its own), attar's in this project's venv and TRL's in
``bench/.venvs/trl`` (made by this script: torch 2.13.0 from the local file first, then ``trl==1.16.0``; never an
attar dependency). Order alternates (attar first, TRL first, ...); the table reports medians over repeats of the
median step time after warm-up, tokens/s, peak RSS and the loss of the first step (before any update: the same
weights and batch, so the two must agree).

    .venv/bin/python bench/lm_vs_trl.py [--batch 4] [--length 256] [--steps 8] [--repeats 3]   # alone on the machine
"""

from __future__ import annotations

import argparse
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
OUT = ROOT / "bench" / ".runs" / "lm_vs_trl"
TRL_VENV = ROOT / "bench" / ".venvs" / "trl"
TRL_VERSION = "1.16.0"


# ------------------------------------------------------------------ the shared inputs (made once, attar's venv)

def prepare(args) -> None:
    from safetensors.torch import save_file

    from attar.text.charlm import lm_packed_data
    from attar.text.lm_prune import decoder_layers, prune_depth
    from attar.text.pretrained_lm import load_pretrained_lm, resolve_lm

    OUT.mkdir(parents=True, exist_ok=True)
    student, tok = load_pretrained_lm({"pretrained": "smollm2-135m"}, progress=False)
    data = lm_packed_data("fortunes", tok, max_len=args.length, seed=0)
    need = args.batch * args.steps
    if len(data.train) < need:
        raise SystemExit(f"only {len(data.train)} packed blocks; need {need}")
    ids = data.train.ids[:need].contiguous()
    prune_depth(student, ids[:8], pad_id=-1, keep=len(decoder_layers(student)) // 2)
    student.save_pretrained(OUT / "student")
    tok.save_pretrained(OUT / "student")
    save_file({"ids": ids}, str(OUT / "batches.safetensors"))
    (OUT / "pair.json").write_text(json.dumps({"teacher": str(resolve_lm({"pretrained": "smollm2-135m"})),
                                               "student": str(OUT / "student")}))


def _inputs():
    from safetensors.torch import load_file

    pair = json.loads((OUT / "pair.json").read_text())
    return pair, load_file(str(OUT / "batches.safetensors"))["ids"]


def _report(mode: str, times: list[float], first_loss: float, args) -> None:
    timed = times[args.warmup:]
    step = statistics.median(timed)
    print(json.dumps({"mode": mode, "step_s": step, "tokens_per_s": args.batch * args.length / step, "steps": times,
                      "first_loss": first_loss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


# ------------------------------------------------------------------ attar (this venv)

def run_attar(args) -> None:
    import torch

    from attar.distill.lm_objectives import check_vocab
    from attar.distill.lm_task import LMLoss, LMTask
    from attar.text.charlm import LMSplit
    from attar.text.pretrained_lm import load_pretrained_lm
    from attar.train.callbacks import Callback
    from attar.train.config import TrainConfig
    from attar.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    pair, ids = _inputs()
    teacher, _ = load_pretrained_lm({"hf": pair["teacher"]}, progress=False)
    student, _ = load_pretrained_lm({"hf": pair["student"]}, progress=False)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False  # position t is scored when token t+1 is: every position but the last, as TRL's shifted labels
    split = LMSplit(ids, mask, torch.ones(len(ids), dtype=torch.long))
    task = LMTask(split, pad_id=-1, eos_id=None, alpha=0.0, divergence_name="kl", temperature=1.0, divergence_args={},
                  teacher=teacher.eval(), cache=None, vmap=check_vocab(teacher, student), chunk_tokens=None)
    times: list[float] = []
    losses: dict[int, float] = {}

    class Clock(Callback):
        t = 0.0

        def on_step_end(self, trainer, step):
            now = time.perf_counter()
            times.append(now - Clock.t)
            Clock.t = now

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-5, weight_decay=0.0, warmup_steps=0,
                      eval_every=10**9)
    trainer = Trainer(student.train(), LMLoss(0.0, "kl", 1.0, {}, None), ids, split.prompt_len, cfg, teachers=[teacher],
                      task=task, callbacks=[Clock()], order=lambda epoch: torch.arange(len(ids)), progress=False)
    trainer.on_metrics = lambda step, m: losses.setdefault(step, m["train_loss"])
    Clock.t = time.perf_counter()
    trainer.fit()
    _report("attar", times, losses[1], args)


# ------------------------------------------------------------------ TRL (its own venv)

def run_trl(args) -> None:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(args.threads)
    pair, ids = _inputs()
    tok = AutoTokenizer.from_pretrained(pair["student"])
    teacher = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    rows = ids.tolist()
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        t = 0.0

        def on_step_begin(self, a, state, control, **kw):
            if not times and Clock.t == 0.0:
                Clock.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            times.append(now - Clock.t)
            Clock.t = now

    with tempfile.TemporaryDirectory() as out:
        cfg = GKDConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                        max_steps=args.steps, learning_rate=1e-5, weight_decay=0.0, warmup_steps=0,
                        lr_scheduler_type="constant", optim="adamw_torch", lmbda=0.0, beta=0.0, temperature=1.0,
                        seq_kd=False, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1,
                        report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                        max_length=args.length, disable_dropout=True, shuffle_dataset=False, seed=0,
                        train_sampling_strategy="sequential")
        class Recorded(GKDTrainer):  # the exact loss of each step (the logged one is averaged and may be rounded)
            def compute_loss(self, *a, **k):
                loss = super().compute_loss(*a, **k)
                losses.append(float(loss.detach()))
                return loss

        trainer = Recorded(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                           processing_class=tok, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    _report("trl", times, losses[0], args)


# ------------------------------------------------------------------ driver

def _child(python: Path, mode: str, args) -> dict:
    cmd = [str(python), __file__, "--mode", mode, *[f"--{k}={getattr(args, k)}" for k in
                                                    ("batch", "length", "steps", "warmup", "threads")]]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--no-doc", action="store_true", help="print only (a smoke test)")
    args = ap.parse_args()
    if args.mode == "attar":
        return run_attar(args)
    if args.mode == "trl":
        return run_trl(args)
    sys.path.insert(0, str(ROOT / "bench"))
    from _doc import peer_venv

    trl_python = peer_venv(TRL_VENV, f"trl=={TRL_VERSION}",
                           f"import trl, sys; sys.exit(trl.__version__ != '{TRL_VERSION}')")
    prepare(args)
    runs: dict[str, list[dict]] = {"attar": [], "trl": []}
    for r in range(args.repeats):
        for mode in (("attar", "trl") if r % 2 == 0 else ("trl", "attar")):
            res = _child(Path(sys.executable) if mode == "attar" else trl_python, mode, args)
            runs[mode].append(res)
            print(f"{mode}: {res['step_s']:.3f} s/step, {res['tokens_per_s']:.0f} tokens/s, peak {res['peak_rss_mb']:.0f} MB,"
                  f" first loss {res['first_loss']:.6f}", flush=True)
    (OUT / "results.json").write_text(json.dumps(runs, indent=1))
    if not args.no_doc:
        write_doc(args, runs)


def write_doc(args, runs: dict) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from _doc import replace_section

    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "peak_rss_mb")}
           for m, rs in runs.items()}
    a, t = med["attar"], med["trl"]
    la, lt = runs["attar"][0]["first_loss"], runs["trl"][0]["first_loss"]
    spread = {m: (min(r["step_s"] for r in rs), max(r["step_s"] for r in rs)) for m, rs in runs.items()}
    body = f"""## LM distillation: attar vs TRL (`trl=={TRL_VERSION}`, GKD trainer), same work

Teacher SmolLM2-135M-Instruct, student the same with 15 of its 30 layers dropped (one HF folder, loaded by both);
{args.batch} packed fortunes blocks of {args.length} tokens per step, every position scored; forward KL(teacher ‖ student)
at T=1 per token, off-policy (TRL: `GKDTrainer`, `lmbda=0`, `beta=0`); AdamW lr 1e-5, float32, no gradient
checkpointing, same batch order. Each side in its own process (its own venv), {args.repeats} repeats in alternating
order, median of {args.steps - args.warmup} timed steps after {args.warmup} warm-up per repeat; {args.threads} threads,
{platform.machine()}, torch {torch.__version__}.

| | s / step (median; range over repeats) | tokens / s | peak RSS (MB) | loss of the first step |
|---|---|---|---|---|
| attar (Trainer + LM task) | {a['step_s']:.3f} ({spread['attar'][0]:.3f}–{spread['attar'][1]:.3f}) | {a['tokens_per_s']:.0f} | {a['peak_rss_mb']:.0f} | {la:.6f} |
| TRL GKDTrainer | {t['step_s']:.3f} ({spread['trl'][0]:.3f}–{spread['trl'][1]:.3f}) | {t['tokens_per_s']:.0f} | {t['peak_rss_mb']:.0f} | {lt:.6f} |
| **attar / TRL** | | **{a['tokens_per_s'] / t['tokens_per_s']:.2f}×** (goal ≥ 1.0) | **{a['peak_rss_mb'] / t['peak_rss_mb']:.2f}×** (goal ≤ 1.0) | difference {abs(la - lt):.2e} |

Reproduce (alone on the machine): `.venv/bin/python bench/lm_vs_trl.py --batch {args.batch} --length {args.length}
--steps {args.steps} --repeats {args.repeats}` (it makes `bench/.venvs/trl` on first use).
"""
    replace_section(ROOT / "docs" / "benchmarks.md", "lm-vs-trl", body, "Benchmarks")


if __name__ == "__main__":
    main()
