"""attar's LM distillation step against its limit, and the memory the chunked loss saves, in one run.

The pair is real and shares a tokenizer: teacher SmolLM2-135M-Instruct (30 layers, vocabulary 49,152), student
the same model with 15 layers dropped (``attar.text.lm_prune``). Each configuration runs in a fresh process (so its
peak resident memory is its own) on the same token batches (random ids, every position after the first scored):

* ``limit`` — plain PyTorch: teacher forward under no_grad, student forward + backward of mean token KL on the full
  ``[B, L, V]`` logits of both, AdamW step. The least any KD step can do.
* ``attar`` — the same step through ``attar.train.trainer.Trainer`` with the LM task and ``LMLoss`` (forward KL,
  automatic chunking: whole logits here, since a batch's are under 256 MiB).
* ``sft`` / ``cached`` — a plain SFT step of the student, and a KD step reading a top-64 teacher cache (built
  before the timed steps): the cached-teacher overhead over SFT.
* ``attar-chunked`` — the same with ``chunk_tokens: 256`` (the head applied 256 positions at a time under
  activation checkpointing), what a large vocabulary or batch gets automatically.

Reports seconds per step (median of the timed steps after warm-up) and peak RSS; writes the ratios to
docs/benchmarks.md. Run it alone on the machine (timings):

    .venv/bin/python bench/lm_step_perf.py [--batch 4] [--length 256] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


MODEL = {"name": "smollm2-135m"}


def _vocab() -> int:
    from attar.text.pretrained_lm import get_pretrained

    return get_pretrained(MODEL["name"]).vocab


def _pair():
    """The teacher and, as the student, the same model with half its decoder layers dropped."""
    import torch

    from attar.text.lm_prune import decoder_layers, prune_depth
    from attar.text.pretrained_lm import load_pretrained_lm

    teacher, tok = load_pretrained_lm({"pretrained": MODEL["name"]}, progress=False)
    student, _ = load_pretrained_lm({"pretrained": MODEL["name"]}, progress=False)
    calib = torch.randint(0, _vocab(), (8, 64), generator=torch.Generator().manual_seed(0))
    prune_depth(student, calib, pad_id=-1, keep=len(decoder_layers(student)) // 2)
    return teacher.eval(), student.train(), tok


def _batches(n: int, batch: int, length: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, _vocab(), (batch, length), generator=g) for _ in range(n)]


ESTIMATE: dict = {}


def run_limit(args) -> list[float]:
    import torch
    import torch.nn.functional as F

    teacher, student, _ = _pair()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times = []
    for ids in _batches(args.steps, args.batch, args.length):
        t0 = time.perf_counter()
        with torch.no_grad():
            zt = teacher(input_ids=ids).logits[:, :-1].float()
        zs = student(input_ids=ids).logits[:, :-1].float()
        lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def run_attar(args, chunk: int | None, mode: str = "kd") -> list[float]:
    import torch

    from attar.distill.lm_objectives import check_vocab
    from attar.distill.lm_task import LMLoss, LMTask
    from attar.text.charlm import LMSplit
    from attar.train.callbacks import Callback
    from attar.train.config import TrainConfig
    from attar.train.trainer import Trainer

    teacher, student, _ = _pair()
    ids = torch.cat(_batches(args.steps, args.batch, args.length))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    split = LMSplit(ids, mask, torch.ones(len(ids), dtype=torch.long))
    vmap = check_vocab(teacher, student)
    cache = None
    if mode == "cached":  # the teacher runs once, before the timed steps; its top-64 per token are kept
        from attar.distill.lm_objectives import LMTeacherCache

        cache = LMTeacherCache.build(teacher, ids, k=64, temperature=1.0, batch_size=args.batch)
        ESTIMATE["cache_bytes_per_token"] = cache.bytes / ids.numel()
    alpha = 1.0 if mode == "sft" else 0.0
    task = LMTask(split, pad_id=-1, eos_id=None, alpha=alpha, divergence_name="kl", temperature=1.0, divergence_args={},
                  teacher=teacher if mode == "kd" else None, cache=cache, vmap=vmap, chunk_tokens=chunk)
    times: list[float] = []

    class Clock(Callback):
        t = time.perf_counter()

        def on_step_end(self, trainer, step):
            now = time.perf_counter()
            times.append(now - Clock.t)
            Clock.t = now

    from attar.distill.lm_memory import estimate_lm_memory

    ESTIMATE.update(estimate_lm_memory(student, teacher, batch_size=args.batch, length=args.length, chunk_tokens=chunk))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-5, weight_decay=0.0, eval_every=10**9)
    order = lambda epoch: torch.arange(len(ids))  # noqa: E731  (the limit's batch order)
    Clock.t = time.perf_counter()
    Trainer(student, LMLoss(alpha, "kl", 1.0, {}, chunk), ids, split.prompt_len, cfg,
            teachers=[teacher] if mode == "kd" else [], teacher_cache=cache, task=task, callbacks=[Clock()], order=order,
            progress=False).fit()
    return times


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    MODEL["name"] = args.model
    if args.mode == "limit":
        times = run_limit(args)
    elif args.mode in ("sft", "cached"):
        times = run_attar(args, None, args.mode)
    else:
        times = run_attar(args, {"attar-chunked": 256, "attar-whole": 0}.get(args.mode))
    timed = times[args.warmup:]
    print(json.dumps({"mode": args.mode, "step_s": statistics.median(timed), "steps": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "estimate_mb": ESTIMATE.get("total", 0) / 2**20,
                      "cache_bytes_per_token": ESTIMATE.get("cache_bytes_per_token")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (step time) or gemma3-270m (memory)")
    ap.add_argument("--mode", default=None)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    MODEL["name"] = args.model
    res = {}
    large = args.model != "smollm2-135m"
    for mode in ("limit", "attar", "attar-whole") if large else ("limit", "attar", "attar-chunked", "sft", "cached"):
        cmd = [sys.executable, __file__, "--mode", mode, *[f"--{k}={getattr(args, k)}" for k in
                                                          ("batch", "length", "steps", "warmup", "threads", "model")]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[mode] = json.loads(out)
        print(res[mode]["mode"], f"{res[mode]['step_s']:.2f} s/step", f"peak {res[mode]['peak_rss_mb']:.0f} MB")
    import torch
    from _doc import replace_section

    if large:
        return write_large(args, res)
    lim, at, whole = res["limit"], res["attar"], res["attar-chunked"]

    body = f"""## LM distillation step: attar vs its limit, chunked vs whole logits

Teacher SmolLM2-135M-Instruct (30 layers, vocabulary 49,152), student the same with 15 layers pruned; batch
{args.batch} × {args.length} tokens, forward KL on every position, AdamW; median of {args.steps - args.warmup} timed
steps after {args.warmup} warm-up; each configuration in its own process (peak RSS is its own, model weights
included); {args.threads} threads, {platform.machine()}, torch {torch.__version__}.

| configuration | s / step | ratio to limit | peak RSS (MB) | attar's estimate (MB) |
|---|---|---|---|---|
| limit: plain PyTorch, whole logits of both models | {lim['step_s']:.2f} | 1.00 | {lim['peak_rss_mb']:.0f} | — |
| attar Trainer + LM task, automatic (whole logits: under 256 MiB here) | {at['step_s']:.2f} | {at['step_s'] / lim['step_s']:.2f} | {at['peak_rss_mb']:.0f} | {at['estimate_mb']:.0f} |
| attar Trainer + LM task, `chunk_tokens: 256` (4 chunks, checkpointed) | {whole['step_s']:.2f} | {whole['step_s'] / lim['step_s']:.2f} | {whole['peak_rss_mb']:.0f} | {whole['estimate_mb']:.0f} |

Cached teacher: a KD step that reads the teacher's top-64 log-probs per token from the cache (built once before the
timed steps; {res['cached']['cache_bytes_per_token']:.0f} bytes per token) takes {res['cached']['step_s']:.2f} s, against
{res['sft']['step_s']:.2f} s for a plain SFT step (next-token CE, no teacher) of the same student: **{res['cached']['step_s'] / res['sft']['step_s']:.2f}×**.

Chunking costs a second pass of the output heads (recomputed in the backward) and saves the `[B, L, V]` logits
of both models: here {lim['peak_rss_mb'] - whole['peak_rss_mb']:.0f} MB of peak memory against the limit. attar's estimate
(`attar.distill.lm_memory`, checked before the first step) counts tensors only, not the runtime or allocator slack:
the measured peak is {at['peak_rss_mb'] / max(1, at['estimate_mb']):.1f}× it here. Reproduce:
`.venv/bin/python bench/lm_step_perf.py --batch {args.batch} --length {args.length} --steps {args.steps}` on an
otherwise idle machine.
"""
    replace_section(ROOT / "docs" / "benchmarks.md", "lm-step-perf", body, "Benchmarks")


def write_large(args, res: dict) -> None:
    """The memory table of a large-vocabulary model: whole logits vs attar's automatic chunks."""
    import torch
    from _doc import replace_section

    lim, at, whole = res["limit"], res["attar"], res["attar-whole"]
    v = _vocab()
    body = f"""## LM distillation memory with a 262k vocabulary: Gemma-3-270M, chunked vs whole logits

Teacher {args.model} (vocabulary {v:,}), student the same with half its layers pruned; batch {args.batch} × {args.length}
tokens (whole logits of one model: {args.batch * (args.length - 1) * v * 4 / 2**30:.2f} GiB in float32), forward KL on every
position, AdamW; median of {args.steps - args.warmup} timed steps after {args.warmup} warm-up, each configuration in its own
process; {args.threads} threads, {platform.machine()}, torch {torch.__version__}.

| configuration | s / step | ratio to limit | peak RSS (MB) | attar's estimate (MB) |
|---|---|---|---|---|
| limit: plain PyTorch, whole logits of both models | {lim['step_s']:.2f} | 1.00 | {lim['peak_rss_mb']:.0f} | — |
| attar, whole logits (`chunk_tokens: 0`) | {whole['step_s']:.2f} | {whole['step_s'] / lim['step_s']:.2f} | {whole['peak_rss_mb']:.0f} | {whole['estimate_mb']:.0f} |
| attar, automatic chunks (64 positions) | {at['step_s']:.2f} | {at['step_s'] / lim['step_s']:.2f} | {at['peak_rss_mb']:.0f} | {at['estimate_mb']:.0f} |

Automatic chunking saves {lim['peak_rss_mb'] - at['peak_rss_mb']:.0f} MB of peak memory against the limit
({whole['peak_rss_mb'] - at['peak_rss_mb']:.0f} MB against attar's own whole-logit path). Reproduce:
`.venv/bin/python bench/lm_step_perf.py --model {args.model} --batch {args.batch} --length {args.length} --steps {args.steps}
--warmup {args.warmup}` (after `attar models convert {args.model}`), on an otherwise idle machine.
"""
    replace_section(ROOT / "docs" / "benchmarks.md", "lm-step-perf-large", body, "Benchmarks")


if __name__ == "__main__":
    main()
