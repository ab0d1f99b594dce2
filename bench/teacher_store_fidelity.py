"""Stored teacher outputs: bytes per token against fidelity, for several k and quantisation steps, on real text.

A pretrained LM (SmolLM2-135M by default) reads the training rows of a built-in corpus; at every scored token its
full next-token distribution ``p`` is compared with what a store of the format keeps (:mod:`attar.data.teacher_store`:
top-k log-probs quantised at ``step`` nats, sorted delta-varint ids, float16 log tail mass, zstd per section) read
back as ``p̂``: the stored top-k at their ids, the tail mass spread uniformly over the other ``V − k`` ids. Reported:
mean KL(p ‖ p̂) in nats/token (fidelity, measured), the same for the unquantised top-k (what truncation alone
costs), and the written shards' bytes per token; beside them the in-RAM cache's format (float16 values, int16/int32
ids, float32 tail) and DistillKit's ~300 bytes/token. No timing: bytes and KL only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_store_fidelity.py --rows 300          # writes docs/benchmarks.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_store_fidelity.py --model qwen2.5-coder-0.5b --rows 120 --no-doc
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _doc import replace_section  # noqa: E402

from attar.data.teacher_store import StoreSettings, StoreWriter, dequantise, quantise  # noqa: E402
from attar.distill.lm_objectives import TopK  # noqa: E402
from attar.distill.lm_store import _through_last_scored, reconstruction_kl  # noqa: E402
from attar.distill.lm_task import head_split, scored  # noqa: E402
from attar.text.lm_io import lm_dataset, scored_vocab  # noqa: E402
from attar.text.pretrained_lm import load_pretrained_lm  # noqa: E402

KS = (8, 16, 32, 64)
STEPS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="fortunes")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=128)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained_lm({"pretrained": a.model})
    model.eval()
    v = scored_vocab(model, tok) or len(tok)
    data = lm_dataset(a.data, tok, None, text_column=None, prompt_len=16, max_len=a.max_len, seed=0,
                      train_limit=a.rows, val_limit=8, test_limit=8)
    split = data.train
    kmax = max(KS)
    tops, inds, rests, masks = [], [], [], []
    kl = {(k, s): 0.0 for k in KS for s in (0.0, *STEPS)}
    bucket = dict.fromkeys(kl, 0.0)  # KL(exact top-k + tail buckets ‖ stored ones): what the format alone adds
    n = 0
    t0 = time.time()
    hs = head_split(model)
    with torch.no_grad():
        for i in range(0, len(split), a.batch):
            part = split.slice(i, i + a.batch)
            pos_full = scored(part.mask)
            masks.append(torch.cat([pos_full, torch.zeros(len(pos_full), 1, dtype=torch.bool)], 1).numpy())
            ids, mask = _through_last_scored(part.ids, part.mask)
            pos = scored(mask)
            rows, head = hs.at(ids, (ids != data.pad_id).long(), pos)
            z = head(rows)[:, :v].float()
            full = TopK.from_logits(z, kmax)
            for k in KS:
                top, ind = full.values[:, :k], full.index[:, :k]
                rest = torch.logaddexp(full.rest, torch.logsumexp(full.values[:, k:], -1)) if k < kmax else full.rest
                kl[(k, 0.0)] += float(reconstruction_kl(z, TopK(top, ind, rest, v)).sum())
                for s in STEPS:
                    r16 = rest.numpy().astype(np.float16).astype(np.float32)
                    q = dequantise(quantise(top.double().numpy(), s), r16, s)
                    kl[(k, s)] += float(reconstruction_kl(z, TopK(torch.from_numpy(q), ind, torch.from_numpy(r16),
                                                                  v)).sum())
                    pb = torch.cat([top, rest[:, None]], 1).double()
                    qb = torch.cat([torch.from_numpy(q), torch.from_numpy(r16)[:, None]], 1).double()
                    bucket[(k, s)] += float((pb.exp() * (pb - qb)).nan_to_num().sum())
            tops.append(full.values.numpy())
            inds.append(full.index.numpy())
            rests.append(full.rest.numpy())
            n += len(z)
            print(f"  rows {min(i + a.batch, len(split))}/{len(split)}  tokens {n}  {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    top_all, ind_all, rest_all = np.concatenate(tops), np.concatenate(inds), np.concatenate(rests)
    mask_all = np.concatenate(masks)
    per_row = np.concatenate([[0], np.cumsum(mask_all.sum(1))])
    results = []
    for k in KS:
        top = top_all[:, :k]
        rest = np.logaddexp(rest_all, np.logaddexp.reduce(top_all[:, k:], axis=1)) if k < kmax else rest_all
        cache_bytes = k * 2 + k * (2 if v <= 32767 else 4) + 4
        results.append({"k": k, "step": None, "kl": kl[(k, 0.0)] / n, "bucket_kl": 0.0, "bytes": None,
                        "cache_bytes": cache_bytes})
        for s in STEPS:
            with tempfile.TemporaryDirectory() as tmp:
                st = StoreSettings(vocab_size=v, k=k, step=s, rows=len(mask_all), width=mask_all.shape[1],
                                   shard_rows=a.shard_rows)
                w = StoreWriter(tmp, st)
                for j in range(w.n_shards):
                    r0, r1 = w.shard_rows(j)
                    sl = slice(per_row[r0], per_row[r1])
                    w.write(j, mask_all[r0:r1], top[sl], ind_all[sl, :k], rest[sl])
                m = w.finish()
            results.append({"k": k, "step": s, "kl": kl[(k, s)] / n, "bucket_kl": bucket[(k, s)] / n,
                            "bytes": m.bytes / n, "cache_bytes": cache_bytes})
    info = {"model": a.model, "vocab": v, "data": a.data, "rows": len(split), "tokens": n, "max_len": a.max_len,
            "results": results}
    print(json.dumps(info, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=1))
    if not a.no_doc:
        write_doc(info)


def write_doc(info: dict) -> None:
    lines = [
        "## Stored teacher outputs: bytes per token against fidelity",
        "",
        f"`bench/teacher_store_fidelity.py` (`OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_store_fidelity.py "
        f"--rows {info['rows']}`): {info['model']} (vocabulary {info['vocab']:,}) on the {info['rows']} training rows "
        f"of `{info['data']}` (max_len {info['max_len']}, {info['tokens']:,} scored tokens). KL = mean "
        "KL(teacher's full distribution ‖ stored one) in nats/token, the stored one being the top-k as read back with "
        "the tail mass spread uniformly over the other ids; *exact* = the top-k in float32 (truncation alone). Bytes "
        "= the written shards (zstd level 9) per token. The in-RAM `cache_topk` format (float16 values, int16/int32 "
        "ids, float32 tail) beside it; DistillKit's recommended setting stores about 300 B/token. *Format KL* = "
        "KL(exact top-k + tail buckets ‖ stored ones): what quantisation adds on the k + 1 buckets the KD loss reads.",
        "",
        "| k | step (nats) | KL nats/token | format KL | bytes/token | in-RAM cache bytes/token |",
        "|---|---|---|---|---|---|",
    ]
    for r in info["results"]:
        step = "exact" if r["step"] is None else f"1/{round(1 / r['step'])}"
        b = "—" if r["bytes"] is None else f"{r['bytes']:.1f}"
        lines.append(f"| {r['k']} | {step} | {r['kl']:.4f} | {r['bucket_kl']:.1e} | {b} | {r['cache_bytes']} |")
    replace_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "teacher-store-fidelity",
                    "\n".join(lines), "Benchmarks")


if __name__ == "__main__":
    main()
