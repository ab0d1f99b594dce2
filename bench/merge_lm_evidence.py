"""Evidence for merging real language models (issue 13): SmolLM2-135M, one LoRA fine-tune per domain (Brown corpus,
Jane Austen, State of the Union addresses), merged by a recipe's ``merge`` stage six ways, against the base, each
fine-tune and one multi-task LoRA fine-tune on the same training blocks of all three domains (the same tokens as
the three fine-tunes together: the upper bound a merge is measured against).

    nice -n 10 .venv/bin/python bench/merge_lm_evidence.py --seeds 0       # one seed (~45 min on 2 shared cores)
    .venv/bin/python bench/merge_lm_evidence.py --quick                     # smoke test, docs untouched
    .venv/bin/python bench/merge_lm_evidence.py --from-json                 # rewrite the doc section from saved rows

Each seed is one recipe (``bench/.runs/merge_lm/<full|quick>/recipe-s<seed>.yaml``; ``attar run`` runs it as it
is): three ``finetune`` stages (``{pretrained: smollm2-135m, lora: {rank: 8}}``, packed text of 64 tokens, the
first 64 training blocks, 16 steps of 4 blocks, lr 2e-3: a small budget, sized for a shared 2-core CPU) and the
merge stages. The multi-task model is trained by the bench on the three domains' training blocks interleaved
(48 steps of 4: the same blocks, the same settings). Perplexity is on each domain's first 32 test blocks (texts go
to a split by a hash of their content, so no test paragraph is trained on). The seed is the fine-tunes' (and the
multi-task model's) training order and LoRA init; the splits do not change with it. Runs and rows are kept under
``bench/.runs/merge_lm``: a rerun resumes an unfinished recipe run and skips finished seeds.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _doc import read_results, replace_section  # noqa: E402

from attar.distill.lm import distill_lm, perplexity  # noqa: E402
from attar.distill.lm_config import LMDistillConfig, LMLoraSpec, LMTextSpec  # noqa: E402
from attar.pipeline import Pipeline  # noqa: E402
from attar.recipe import load_recipe  # noqa: E402
from attar.stages.lm import stage_data, with_lora  # noqa: E402
from attar.text.charlm import load_causal_lm, save_causal_lm  # noqa: E402
from attar.text.lm_split import LMData, LMSplit  # noqa: E402
from attar.text.pretrained_lm import load_pretrained_lm  # noqa: E402

MODEL = "smollm2-135m"
DOMAINS = ("brown", "austen", "sotu")
FULL = dict(steps=16, batch=4, max_len=64, lr=2e-3, rank=8, train=64, val=8, test=32, examples=16)
QUICK = dict(steps=2, batch=2, max_len=32, lr=1e-3, rank=4, train=4, val=2, test=4, examples=4)
BASE = {"pretrained": MODEL}
#: the merges: name -> the recipe's merge block (models filled in). TIES/DARE at density 0.5 with mergekit's
#: defaults (lambda 1, TIES normalises by the agreeing weights); task arithmetic is base + sum of the task vectors.
MERGES = {
    "linear": {"method": "linear"},
    "task_arithmetic": {"method": "task_arithmetic", "base": BASE},
    "ties": {"method": "ties", "base": BASE, "parameters": {"density": 0.5}},
    "dare_ties": {"method": "dare_ties", "base": BASE, "parameters": {"density": 0.5}},
    "regmean": {"method": "regmean", "parameters": {"examples": "EXAMPLES", "batch_size": 8}},
    "greedy_soup": {"method": "greedy_soup"},
}
KEY = "evidence-merge-lm"


def text_block(c: dict, domain: str) -> dict:
    return {"name": domain, "pack": True, "max_len": c["max_len"], "train_limit": c["train"], "val_limit": c["val"],
            "test_limit": c["test"]}


def train_block(c: dict, steps: int) -> dict:
    return {"steps": steps, "batch_size": c["batch"], "lr": c["lr"], "warmup_steps": max(1, steps // 10),
            "eval_every": steps, "checkpoint_every": 0}  # one checkpoint, at the end


def recipe(c: dict, seed: int) -> dict:
    stages = [{"name": f"ft_{d}", "kind": "finetune", "model": {"pretrained": MODEL, "lora": {"rank": c["rank"]}},
               "data": text_block(c, d), "train": train_block(c, c["steps"])} for d in DOMAINS]
    for name, block in MERGES.items():
        block = json.loads(json.dumps(block).replace('"EXAMPLES"', str(c["examples"])))
        stages.append({"name": name, "kind": "merge", "merge": block | {"models": [f"ft_{d}" for d in DOMAINS]}})
    return {"name": f"merge-lm-s{seed}", "seed": seed, "stages": stages}


def run_recipe(c: dict, seed: int, out: Path) -> Path:
    """The seed's recipe run: finished before (its folder), or resumed, or started."""
    path = out / f"recipe-s{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe(c, seed), sort_keys=False))
    state = out / "runs.json"
    runs = json.loads(state.read_text()) if state.exists() else {}
    known = runs.get(str(seed))
    if known and known.get("done"):
        return Path(known["dir"])
    pipe = Pipeline(*load_recipe(path), home=out / "home")
    if known:  # killed before: carry on where it stopped
        run = pipe.run(resume_dir=Path(known["dir"]))
    else:
        before = set((out / "home").glob("*")) if (out / "home").exists() else set()
        try:
            run = pipe.run()
        except BaseException:
            new = [p for p in (out / "home").glob("*") if p not in before and p.is_dir() and p.name[0].isdigit()]
            if new:
                runs[str(seed)] = {"dir": str(new[0]), "done": False}
                state.write_text(json.dumps(runs, indent=2))
            raise
    runs[str(seed)] = {"dir": str(run), "done": True}
    state.write_text(json.dumps(runs, indent=2))
    return run


def prune(out: Path, seed: int) -> None:
    """Once a seed's rows are saved: drop its weights (checkpoints, model folders: ~0.5 GB each, 11 GB a seed), keep
    the adapters, metrics and recipe."""
    import shutil

    run = json.loads((out / "runs.json").read_text())[str(seed)]["dir"]
    for p in [*Path(run).glob("*/checkpoints"), *Path(run).glob("*/model"), out / f"multitask-s{seed}"]:
        shutil.rmtree(p, ignore_errors=True)


def domain_data(c: dict, tok, seed: int, out: Path) -> dict[str, LMData]:
    """Each domain's text as its fine-tune read it (same spec, tokenizer and store)."""
    return {d: stage_data(LMTextSpec(**text_block(c, d)), tok, [8192], seed, out / "home" / "cache") for d in DOMAINS}


def multitask(c: dict, seed: int, data: dict[str, LMData], out: Path) -> Path:
    """A LoRA fine-tune on the three domains' training blocks, interleaved: the same blocks as the three fine-tunes
    together, the same settings, 3x their steps."""
    folder = out / f"multitask-s{seed}"
    if (folder / "config.json").exists():
        return folder
    parts = [data[d].train.slice(0, len(data[d].train)) for d in DOMAINS]
    n = min(len(p) for p in parts)
    ids = torch.stack([p.ids[:n] for p in parts], 1).reshape(-1, parts[0].width)  # round robin over the domains
    mask = torch.stack([p.mask[:n] for p in parts], 1).reshape(-1, parts[0].width)
    train = LMSplit(ids, mask, torch.ones(len(ids), dtype=torch.long))
    val = [data[d].val.slice(0, len(data[d].val)) for d in DOMAINS]
    val = LMSplit(torch.cat([v.ids for v in val]), torch.cat([v.mask for v in val]), torch.cat([v.prompt_len for v in val]))
    first = data[DOMAINS[0]]
    both = LMData(train, val, first.test, first.pad_id, first.eos_id, {"sizes": {"train": len(train)}})
    model, tok = load_pretrained_lm(BASE)
    model = with_lora(model, LMLoraSpec(rank=c["rank"]))
    cfg = LMDistillConfig(**train_block(c, len(DOMAINS) * c["steps"]), alpha=1.0, seed=seed)
    res = distill_lm(model, both, None, cfg, student_tokenizer=tok)
    save_causal_lm(res.model.merge_and_unload(), tok, folder)
    return folder


def evaluate(c: dict, seed: int, out: Path) -> list[dict]:
    run = run_recipe(c, seed, out)
    base, tok = load_pretrained_lm(BASE)
    data = domain_data(c, tok, seed, out)
    tests = {d: data[d].test for d in DOMAINS}
    pad = data[DOMAINS[0]].pad_id

    def ppl(model) -> dict[str, float]:
        return {d: perplexity(model, s, pad) for d, s in tests.items()}

    rows = [{"arm": "base", "ppl": ppl(base)}]
    del base
    for d in DOMAINS:
        m, _ = load_causal_lm(run / f"ft_{d}" / "model")
        rows.append({"arm": f"ft_{d}", "ppl": ppl(m)})
    t0 = time.time()
    folder = multitask(c, seed, data, out)
    rows.append({"arm": "multitask", "ppl": ppl(load_causal_lm(folder)[0]), "train_s": round(time.time() - t0)})
    for name in MERGES:
        met = json.loads((run / name / "lm-metrics.json").read_text())["metrics"]
        row = {"arm": name, "ppl": {d: met[f"test_ppl[ft_{d}]"] for d in DOMAINS}}
        if "kept" in met:
            row["kept"] = met["kept"]
        row["adapter"] = (run / name / "adapter" / "adapter_config.json").exists()
        rows.append(row)
    return rows


def _fmt(v: list[float]) -> str:
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    head = "| model | " + " | ".join(DOMAINS) + " | mean | notes |\n|---|" + "---:|" * (len(DOMAINS) + 1) + "---|\n"
    names = {"base": "SmolLM2-135M (no fine-tune)", "multitask": "multi-task LoRA (all three, same blocks)"}
    lines = []
    for arm, rs in by.items():
        cells = [_fmt([r["ppl"][d] for r in rs]) for d in DOMAINS]
        cells.append(_fmt([sum(r["ppl"].values()) / len(DOMAINS) for r in rs]))
        note = ""
        if "kept" in rs[0]:
            note = "kept: " + "; ".join(sorted({r["kept"] for r in rs}))
        if rs[0].get("adapter"):
            note = "also written as one PEFT adapter (rank 24)"
        label = names.get(arm, f"LoRA fine-tune on {arm[3:]}" if arm.startswith("ft_") else f"merge: {arm}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    return head + "\n".join(lines) + f"\n\nSeeds: {', '.join(map(str, seeds))} (mean ± std over seeds where more than one)."


def write_docs(rows: list[dict], c: dict) -> None:
    body = f"""## Merging language models: SmolLM2-135M, three LoRA fine-tunes (Brown, Austen, State of the Union)

Test perplexity on each domain (lower is better) of the base model, a LoRA fine-tune per domain, one multi-task
LoRA fine-tune on the same training blocks of all three (the upper bound a merge is measured against), and six
merges of the three fine-tunes, each made by a recipe's `merge` stage. Fine-tunes: LoRA rank {c['rank']} on every
linear layer, {c['steps']} steps of {c['batch']} packed {c['max_len']}-token blocks (the first {c['train']} training
blocks of the domain), lr {c['lr']}; multi-task: the same {len(DOMAINS) * c['train']} blocks interleaved,
{len(DOMAINS) * c['steps']} steps. Test: each domain's first {c['test']} test blocks. RegMean (α 0.95): Grams over
{c['examples']} training blocks per fine-tune. Greedy soup: ordered and accepted by mean validation perplexity
({c['val']} blocks per domain). TIES/DARE-TIES: density 0.5; task arithmetic, TIES and DARE with mergekit's default
λ 1 (nothing tuned). A small budget (a shared 2-core CPU): what it shows is the ordering at this scale.

{table(rows)}

{_reading(rows)}

Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, CPU, 1 thread. Reproduce:
`nice -n 10 .venv/bin/python bench/merge_lm_evidence.py --seeds {' '.join(map(str, sorted({r['seed'] for r in rows})))} --threads 1`
(~10 minutes a seed; each seed's recipe is written to `bench/.runs/merge_lm/full/recipe-s<seed>.yaml` and runs
with `attar run` as it is).
"""
    replace_section(ROOT / "docs" / "evidence.md", "merge-lm", body, "Evidence")


def _reading(rows: list[dict]) -> str:
    """The table in words, from the means over seeds; every sentence is checked against the numbers."""
    cell: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        for d, v in r["ppl"].items():
            cell.setdefault((r["arm"], d), []).append(v)
        cell.setdefault((r["arm"], "mean"), []).append(sum(r["ppl"].values()) / len(DOMAINS))
    m = {k: statistics.mean(v) for k, v in cell.items()}
    merges = [a for a in MERGES if (a, "mean") in m]
    best = min(merges, key=lambda a: m[(a, "mean")])
    base, multi, top = m[("base", "mean")], m[("multitask", "mean")], m[(best, "mean")]
    lowest = min({a for a, _ in m}, key=lambda a: m[(a, "mean")])
    lead = "has the lowest mean" if lowest == "multitask" else f"has mean {multi:.2f} (lowest: {lowest})"
    out = [f"Reading it (means over seeds): the multi-task model {lead} ({multi:.2f}); the best merge, "
           f"**{best}**, is {top - multi:+.2f} from it ({top:.2f}; linear average {m[('linear', 'mean')]:.2f}, base "
           f"{base:.2f}), so it closes {100 * (base - top) / (base - multi):.0f}% of the base-to-multi-task gap."]
    single = min(m[("ft_" + d, "mean")] for d in DOMAINS)
    beat = [a for a in merges if m[(a, "mean")] < single]
    out.append(f"On the mean, {', '.join(beat) or 'no merge'} beat{'s' if len(beat) == 1 else ''} the best single "
               f"fine-tune ({single:.2f}).")
    own = {d: (m[("ft_" + d, d)], min(m[(a, d)] for a in merges)) for d in DOMAINS}
    lost = [d for d, (f, b) in own.items() if f < b]
    out.append("On its own domain the fine-tune is better than every merge for " + (", ".join(lost) or "no domain")
               + " (fine-tune vs best merge: " + ", ".join(f"{d} {f:.2f} vs {b:.2f}" for d, (f, b) in own.items()) + ").")
    worse = [a for a in ("task_arithmetic", "dare_ties") if a in merges and m[(a, "mean")] > m[("linear", "mean")]]
    if worse:
        vals = ", ".join(f"{m[(a, 'mean')]:.2f}" for a in worse)
        out.append(f"{' and '.join(worse)} ({vals}) "
                   "are worse than the linear average: with λ 1 they add the three task vectors (DARE also rescales "
                   "the kept half by 2), which overshoots; λ 1/3 is the linear merge, so λ needs tuning on validation "
                   "text, which this table does not do.")
    kept = sorted({r.get("kept", "") for r in rows if r["arm"] == "greedy_soup"})
    every = all(len(k.split(", ")) == len(DOMAINS) for k in kept)
    out.append(f"Greedy soup kept: {'; '.join(kept)}" + (" (all three, every seed: the soup is the linear merge)."
                                                          if every else "."))
    return " ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = QUICK if args.quick else FULL
    out = ROOT / "bench" / ".runs" / "merge_lm" / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    key = KEY + json.dumps(c, sort_keys=True)
    done = read_results(results, key)
    if not args.from_json:
        for seed in args.seeds:
            if any(s == seed for _, s in done):
                continue
            t0 = time.time()
            rows = evaluate(c, seed, out)
            with results.open("a") as f:
                for r in rows:
                    f.write(json.dumps({"config": key, "seed": seed, **r}) + "\n")
            prune(out, seed)
            print(f"seed {seed}: {time.time() - t0:.0f} s")
        done = read_results(results, key)
    rows = [r for (_, s), r in sorted(done.items(), key=lambda kv: kv[0][1]) if s in args.seeds or args.from_json]
    print(table(rows))
    if not args.quick:
        write_docs(rows, c)


if __name__ == "__main__":
    main()
