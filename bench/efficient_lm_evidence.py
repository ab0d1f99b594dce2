"""Evidence for the efficient-training layer (issue 15) on a small causal LM pre-trained from scratch: a byte-level
GPT-2 (4 blocks, d_model 192, 4 heads, context 128; ~1.9M parameters) on Jane Austen's novels, packed into
128-byte rows (the LM route's data path: ``data: {name: austen, pack: true}``), trained through ``train_lm`` (the
one Trainer). Arms at matched steps/tokens against plain AdamW, 3 seeds; held-out loss on validation rows;
optimizer-state and parameter bytes measured from the tensors. G_stack: a 2-block model trained for half the steps,
stacked to 4 blocks, then trained on; we report the tokens it needs to reach the plain 4-block run's final
validation loss (or that it does not within the plain run's budget). V-cycle (``train.growth: {method: v_cycle}``):
the 4-block model trained 10 steps, coalesced to 2 blocks (adjacent pairs averaged), trained half the steps,
de-coalesced and interpolated (alpha 0.25) into the 4-block weights, then trained on; reported the same way.

    bash scripts/get-corpus.sh austen     # once
    nice -n 10 .venv/bin/python bench/efficient_lm_evidence.py     # ~25 CPU-minutes; writes docs/evidence.md

``--steps/--seeds/--arms`` shrink it for a try (nothing is written then). Matched compute: every run is one thread
and records its process CPU time at each evaluation, so each arm is also read at the AdamW run's CPU time (same
seed), and G_stack / V-cycle by the CPU seconds they need to reach the plain run's final loss. CPU time rather
than wall time, because the machine is shared: single-threaded, the two agree when the run has a core to itself.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _doc import ms, replace_section, verdict  # noqa: E402

from attar.distill.lm import train_lm  # noqa: E402
from attar.distill.lm_config import LMDistillConfig  # noqa: E402
from attar.models.sltrain import apply_sltrain, parameter_bytes  # noqa: E402
from attar.text.charlm import byte_tokenizer, lm_packed_data, make_byte_lm  # noqa: E402
from attar.train.adamw import state_bytes  # noqa: E402
from attar.train.config import TrainConfig  # noqa: E402
from attar.train.growth import g_stack  # noqa: E402
from attar.train.strategy import Backprop  # noqa: E402
from attar.train.config import VCycleConfig  # noqa: E402
from attar.train.vcycle import run_v_cycle  # noqa: E402

SHAPE = {"layers": 4, "d_model": 192, "heads": 4, "context": 128}
MAX_LEN, BATCH, STEPS, EVAL_EVERY = 128, 16, 80, 10
BASE = dict(batch_size=BATCH, lr=3e-3, warmup_steps=10, weight_decay=0.0, eval_every=EVAL_EVERY, eval_rows=64,
            restore_best=False, monitor_prompts=0)
SLTRAIN = {"rank": 48, "sparsity": 0.97}  # the paper's r ~ d/4 and delta = 3% non-zeros
ARMS = {
    "AdamW (baseline)": {},
    "COAT FP8 state (dynamic expansion)": {"optimizer_state": {"dtype": "fp8_e4m3", "expansion": "dynamic"}},
    "GaLore rank 8, T=40": {"optimizer": {"name": "adamw", "projection": {"rank": 8, "update_every": 40}}},
    "SPDF 75% sparse, dense from half": {"sparsity": {"sparsity": 0.75, "dense_from": "half"}},
    f"SLTrain rank {SLTRAIN['rank']}, {100 - SLTRAIN['sparsity'] * 100:.0f}% of S": {"sltrain": SLTRAIN},
}


def _model(seed: int, layers: int, sltrain: dict | None = None):
    model = make_byte_lm(**(SHAPE | {"layers": layers}), seed=seed)
    if sltrain is not None:
        apply_sltrain(model, sltrain["rank"], sltrain["sparsity"])
    return model


def _bytes(model, cfg: LMDistillConfig, data) -> tuple[int, int]:
    """(optimizer-state bytes after one real step of the optimizer this config builds, parameter bytes)."""
    probe = copy.deepcopy(model)
    opt = Backprop().optimizer(TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.train_fields()),
                               [p for p in probe.parameters() if p.requires_grad])
    x = data.train.ids[:4]
    probe(x, labels=x).loss.backward()
    opt.step()
    pb = parameter_bytes(probe)
    return state_bytes(opt), pb["parameters"] + pb["support"]


def _train(model, data, seed: int, steps: int, extra: dict, stop_below: float | None = None) -> dict:
    extra = dict(extra)
    if extra.get("sparsity", {}).get("dense_from") == "half":
        extra["sparsity"] = extra["sparsity"] | {"dense_from": steps // 2}
    cfg = LMDistillConfig(**BASE, steps=steps, seed=seed, **extra)
    opt_b, par_b = _bytes(model, cfg, data)
    curve: list[tuple[int, float, float]] = []  # (step, val loss, process CPU seconds since this run started)

    class Reached(Exception):
        pass

    cpu = time.process_time()

    def record(step: int, rec: dict) -> None:
        curve.append((step, math.log(rec["val_ppl"]), time.process_time() - cpu))
        if stop_below is not None and curve[-1][1] <= stop_below:
            raise Reached

    try:
        train_lm(model, data, cfg, on_metrics=record, progress=False)
    except Reached:
        pass
    return {"curve": curve, "val": curve[-1][1], "opt_bytes": opt_b, "param_bytes": par_b,
            "cpu_s": time.process_time() - cpu}


V_DOWN, V_ALPHA = 10, 0.25  # V-cycle: 4-block steps before coalescing; interpolation weight (the paper's)


def _v_cycle(seed: int, data, steps: int, target: float) -> dict:
    """One V-cycle run through attar.train.vcycle: 4 blocks for V_DOWN steps, 2 blocks for steps // 2, then the
    4-block model (interpolated) for up to ``steps``, stopping once it reaches ``target``."""
    got: list[dict] = []

    def phase(model, ph, phase_seed, ckpt_dir, resume):
        got.append(_train(model, data, phase_seed, ph.steps, {}, stop_below=target if ph.way == "last" else None))
        return SimpleNamespace(model=model, metrics={})

    g = VCycleConfig(levels=2, alpha=V_ALPHA, steps=[V_DOWN, steps // 2])
    run_v_cycle(_model(seed, SHAPE["layers"]), g, steps, seed, phase, None, None)
    down, bottom, last = got
    return {"down_val": down["val"], "small_val": bottom["val"], "first_val": last["curve"][0][1],
            "reached": last["curve"][-1][1] <= target, "steps": last["curve"][-1][0],
            "cpu_s": sum(x["cpu_s"] for x in got), "cpu_to_target": down["cpu_s"] + bottom["cpu_s"] + last["curve"][-1][2]}


def at_cpu(curve: list[tuple[int, float, float]], budget: float) -> float:
    """The val loss of the last evaluation made within ``budget`` CPU seconds (nan when none was)."""
    within = [v for _, v, t in curve if t <= budget]
    return within[-1] if within else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="all", help="comma-separated arm prefixes, or all (+ g_stack, v_cycle)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    full = a.steps == STEPS and a.seeds == 3 and a.arms == "all"
    seeds = list(range(a.seeds))
    data = lm_packed_data("austen", byte_tokenizer(), MAX_LEN)
    wanted = [arm for arm in ARMS if a.arms == "all" or any(arm.startswith(p) for p in a.arms.split(","))]
    if "AdamW (baseline)" not in wanted:
        wanted.insert(0, "AdamW (baseline)")
    rows: dict[str, list[dict]] = {}
    for arm in wanted:
        spec = dict(ARMS[arm])
        sl = spec.pop("sltrain", None)
        rows[arm] = [_train(_model(s, SHAPE["layers"], sl), data, s, a.steps, spec) for s in seeds]
        print(arm, [round(r["val"], 4) for r in rows[arm]], f"{sum(r['cpu_s'] for r in rows[arm]):.0f} CPU-s", flush=True)
    base = rows["AdamW (baseline)"]
    grow = []
    if a.arms == "all" or "g_stack" in a.arms:
        for s, b in zip(seeds, base):
            small = _model(s, SHAPE["layers"] // 2)
            first = _train(small, data, s, a.steps // 2, {})
            big = g_stack(small, _model(s, SHAPE["layers"]), 2)
            cont = _train(big, data, s, a.steps, {}, stop_below=b["val"])
            reached = cont["curve"][-1][1] <= b["val"]
            grow.append({"small_val": first["val"], "reached": reached, "steps": cont["curve"][-1][0],
                         "first_val": cont["curve"][0][1], "cpu_s": first["cpu_s"] + cont["cpu_s"],
                         "cpu_to_target": first["cpu_s"] + cont["curve"][-1][2]})
            print("g_stack", s, grow[-1], flush=True)
    vcyc = []
    if a.arms == "all" or "v_cycle" in a.arms:
        for s, b in zip(seeds, base):
            vcyc.append(_v_cycle(s, data, a.steps, b["val"]))
            print("v_cycle", s, vcyc[-1], flush=True)
    tok = BATCH * MAX_LEN  # tokens per optimizer step (packed rows: every position is scored)
    params = sum(p.numel() for p in _model(0, SHAPE["layers"]).parameters())
    b_opt, b_par = base[0]["opt_bytes"], base[0]["param_bytes"]
    lines = ["| arm | val loss at matched steps (nats/byte, 3 seeds) | vs AdamW | val loss at AdamW's CPU time | vs AdamW "
             "| CPU time per run × AdamW's | optimizer state bytes | × AdamW's | parameter bytes | × AdamW's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        v = [x["val"] for x in r]
        at = [at_cpu(x["curve"], b["cpu_s"]) for x, b in zip(r, base)]
        cmp = "—" if r is base else verdict([-x for x in v], [-x["val"] for x in base]).replace("no gain", "within noise")
        cmp_t = "—" if r is base else verdict([-x for x in at], [-x["val"] for x in base]).replace("no gain", "within noise")
        ratio = sum(x["cpu_s"] for x in r) / sum(x["cpu_s"] for x in base)
        lines.append(f"| {arm} | {ms(v, 1, 3)} | {cmp} | {ms(at, 1, 3)} | {cmp_t} | {ratio:.2f} | {r[0]['opt_bytes']:,} | "
                     f"{r[0]['opt_bytes'] / b_opt:.3f} | {r[0]['param_bytes']:,} | {r[0]['param_bytes'] / b_par:.3f} |")
    g_lines = []
    if grow:
        got = [g for g in grow if g["reached"]]
        g_lines = [
            f"| | plain 4-block run | G_stack (2 blocks for {a.steps // 2} steps, stacked, continued) |",
            "|---|---|---|",
            f"| target: plain run's final val loss | {ms([x['val'] for x in base], 1, 3)} | — |",
            f"| val loss of the 2-block model at growth | — | {ms([g['small_val'] for g in grow], 1, 3)} |",
            f"| val loss at the first evaluation after growth (step {EVAL_EVERY}) | "
            f"{ms([x['curve'][0][1] for x in base], 1, 3)} | {ms([g['first_val'] for g in grow], 1, 3)} |",
            f"| seeds reaching the target within {a.steps} steps | 3 of 3 (by definition) | {len(got)} of {len(grow)} |",
            f"| 4-block steps (tokens) to reach it | {a.steps} ({a.steps * tok:,}) | "
            + (", ".join(f"{g['steps']} ({g['steps'] * tok:,})" if g["reached"] else "not reached" for g in grow))
            + " |",
            f"| + 2-block tokens before growth | — | {a.steps // 2 * tok:,} (about half the FLOPs per token) |",
            f"| CPU seconds to reach the target (both models) | {ms([x['cpu_s'] for x in base], 1, 0)} | "
            + ", ".join(f"{g['cpu_to_target']:.0f}" if g["reached"] else "not reached" for g in grow) + " |",
        ]
    v_lines = []
    if vcyc:
        v_lines = [
            f"| | plain 4-block run | V-cycle (4 blocks {V_DOWN} steps, 2 blocks {a.steps // 2} steps, interpolated "
            f"alpha {V_ALPHA}, 4 blocks continued) |",
            "|---|---|---|",
            f"| target: plain run's final val loss | {ms([x['val'] for x in base], 1, 3)} | — |",
            f"| val loss of the 4-block model when coalesced (step {V_DOWN}) | — | "
            f"{ms([v['down_val'] for v in vcyc], 1, 3)} |",
            f"| val loss of the 2-block level at the end of its phase | — | {ms([v['small_val'] for v in vcyc], 1, 3)} |",
            f"| val loss at the first evaluation of the last phase (step {EVAL_EVERY}) | "
            f"{ms([x['curve'][0][1] for x in base], 1, 3)} | {ms([v['first_val'] for v in vcyc], 1, 3)} |",
            f"| seeds reaching the target within {a.steps} last-phase steps | 3 of 3 (by definition) | "
            f"{sum(v['reached'] for v in vcyc)} of {len(vcyc)} |",
            f"| last-phase 4-block steps (tokens) to reach it | {a.steps} ({a.steps * tok:,}) | "
            + (", ".join(f"{v['steps']} ({v['steps'] * tok:,})" if v["reached"] else "not reached" for v in vcyc))
            + " |",
            f"| + the cycle before | — | {V_DOWN} 4-block steps + {a.steps // 2} 2-block steps "
            f"({(V_DOWN + a.steps // 2) * tok:,} tokens; the 2-block ones at about half the FLOPs per token) |",
            f"| CPU seconds to reach the target (whole cycle) | {ms([x['cpu_s'] for x in base], 1, 0)} | "
            + ", ".join(f"{v['cpu_to_target']:.0f}" if v["reached"] else "not reached" for v in vcyc) + " |",
        ]
    cpu = (sum(x["cpu_s"] for r in rows.values() for x in r) + sum(g["cpu_s"] for g in grow)
           + sum(v["cpu_s"] for v in vcyc))
    body = "\n".join([
        "## Efficient training (issue 15): a byte-level causal LM pre-trained from scratch",
        "",
        f"Byte-level GPT-2, {SHAPE['layers']} blocks, d_model {SHAPE['d_model']}, {SHAPE['heads']} heads "
        f"({params / 1e6:.2f}M parameters), trained from scratch on `austen` packed into {MAX_LEN}-byte rows "
        f"({len(data.train):,} training rows), {a.steps} AdamW steps of {BATCH} rows ({a.steps * tok:,} tokens), lr "
        "3e-3, 10 warm-up steps, cosine, seeds 0, 1, 2. Val loss: mean next-byte NLL on 64 validation rows at the last "
        "step. Bytes measured from the tensors (the optimizer's state after one step; the model's parameters, SLTrain "
        "plus its int32 support). Matched compute: one thread per run, process CPU time recorded at every evaluation "
        f"(every {EVAL_EVERY} steps, evaluation included); 'at AdamW's CPU time' is each arm's last evaluation made "
        "within the AdamW run's total CPU time of the same seed (CPU time, not wall time: the machine was shared with "
        f"other benchmark jobs). {cpu / 60:.0f} CPU-minutes in all. Reproduce: "
        "`nice -n 10 .venv/bin/python bench/efficient_lm_evidence.py`.",
        "",
        *lines,
        "",
        *g_lines,
        "",
        *v_lines,
        "",
        f"Reading: this is about {params / 1e6:.0f}M parameters and {a.steps * tok / 1e3:.0f}k tokens per run, far "
        "from the papers' scale "
        "(COAT 1.54x end-to-end memory; GaLore-style up to 89.5% less optimizer memory; SLTrain up to 73% less "
        "memory; SPDF 2.5x fewer pre-training FLOPs on sparse hardware; G_stack 194B instead of 300B tokens on 7B "
        "models; V-cycle about 20% less compute on BERT/GPT-Base, up to 51.6% on BERT-Large). The byte ratios are what this model holds; the embeddings (dense in every arm) weigh more here "
        "than in an LLM. SPDF stores and multiplies its zeros on a dense CPU: no bytes or time saved. Growth: the V-cycle "
        "reached the plain run's loss in every seed with less CPU time for the whole cycle, and G_stack in two of "
        "three (the CPU-seconds rows), near V-cycle's claimed ~20% saving; but at this scale the 2-block model alone "
        "already matches the 4-block run's loss (the V-cycle's 2-block level ends level with the target), so the "
        "saving is that of a smaller model being enough here, not evidence that growth beats training the small model. "
        "One V-cycle seed's 4-block model was at 10.4 nats/byte after its 10 warm-up steps (the 5.56 ± 4.20 row) and "
        "the cycle recovered.",
    ])
    print(body)
    if full:
        replace_section(Path(__file__).parent.parent / "docs" / "evidence.md", "efficient-training-lm", body, "Evidence")


if __name__ == "__main__":
    main()
