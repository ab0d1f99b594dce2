"""Merging across vocabularies on the real SmolLM2-135M (runs/models/smollm2-135m): two exactness checks and
their wall time, for docs/merge.md.

1. SmolLM2-135M merged (linear, 0.5/0.5, ``tokenizer_source: union``) with a copy of itself whose 49,152-token
   vocabulary is randomly re-ordered (tokenizer.json ids and embedding rows permuted alike): the merge must give
   the original's logits bit for bit on a text.
2. A "fine-tune" that added 8 special tokens (49,152 -> 49,160 rows, new rows drawn at the embedding's scale,
   all other weights nudged by 1e-3 noise) merged with its base by task arithmetic (weight 1.0, union): the
   output must equal the fine-tune exactly (its added rows kept), tokenizer included.

    .venv/bin/python bench/merge_vocab_check.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "runs" / "models" / "smollm2-135m"
TEXT = "The merged model reads <|im_start|>user\nHello, 東京!<|im_end|> and code: def f(x): return x"


def logits(path: Path, text: str) -> tuple[torch.Tensor, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0], ids


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from attar.merge import run_merge
    from transformers import AutoTokenizer

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(SMOL, work / "base")
        want, ids = logits(work / "base", TEXT)
        # 1. re-ordered vocabulary
        perm = torch.randperm(49152, generator=torch.Generator().manual_seed(0))
        p = perm.tolist()
        shutil.copytree(SMOL, work / "perm")
        data = json.loads((work / "perm" / "tokenizer.json").read_text())
        data["model"]["vocab"] = {t: p[i] for t, i in data["model"]["vocab"].items()}
        for t in data["added_tokens"]:
            t["id"] = p[t["id"]]
        (work / "perm" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        cfg = json.loads((work / "perm" / "tokenizer_config.json").read_text())
        cfg["added_tokens_decoder"] = {str(p[int(i)]): v for i, v in cfg.get("added_tokens_decoder", {}).items()}
        (work / "perm" / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
        sd = load_file(str(work / "perm" / "model.safetensors"))
        emb = sd["model.embed_tokens.weight"]
        new = torch.empty_like(emb)
        new[perm] = emb
        sd["model.embed_tokens.weight"] = new
        save_file(sd, str(work / "perm" / "model.safetensors"), metadata={"format": "pt"})
        t0 = time.perf_counter()
        res = run_merge({"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
                         "models": [{"model": "base", "parameters": {"weight": 0.5}}, {"model": "perm", "parameters": {"weight": 0.5}}]},
                        work / "m1", base_dir=work, progress=False)
        t1 = time.perf_counter() - t0
        got, got_ids = logits(work / "m1", TEXT)
        same = got_ids == ids and torch.equal(got, want)
        ok &= same
        print(f"1. self-merge under a permuted vocabulary: {t1:.1f} s, {len(ids)} tokens, logits bit-identical: {same}; "
              f"max |diff| {float((got - want).abs().max()) if got.shape == want.shape else float('nan'):.3g}")
        print("   " + "; ".join(n for n in res.notes if "vocabulary" in n))
        # 2. fine-tune with 8 added special tokens
        shutil.copytree(SMOL, work / "ft")
        added = [f"<tool_{i}>" for i in range(8)]
        tok = AutoTokenizer.from_pretrained(SMOL)
        tok.add_special_tokens({"additional_special_tokens": added})
        tok.save_pretrained(work / "ft")
        sd = load_file(str(work / "ft" / "model.safetensors"))
        g = torch.Generator().manual_seed(1)
        sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()}
        emb = sd["model.embed_tokens.weight"]
        sd["model.embed_tokens.weight"] = torch.cat([emb, (emb.float().std() * torch.randn(8, emb.shape[1], generator=g)).to(emb.dtype)])
        save_file(sd, str(work / "ft" / "model.safetensors"), metadata={"format": "pt"})
        c = json.loads((work / "ft" / "config.json").read_text())
        c["vocab_size"] = 49160
        (work / "ft" / "config.json").write_text(json.dumps(c))
        t0 = time.perf_counter()
        res = run_merge({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                         "models": [{"model": "ft", "parameters": {"weight": 1.0}}]}, work / "m2", base_dir=work, progress=False)
        t2 = time.perf_counter() - t0
        text = f"{added[2]} call {added[5]} " + TEXT
        want2, ids2 = logits(work / "ft", text)
        got2, got_ids2 = logits(work / "m2", text)
        out = load_file(str(work / "m2" / "model.safetensors"))["model.embed_tokens.weight"]
        rows = torch.equal(out[49152:], sd["model.embed_tokens.weight"][49152:])
        same2 = got_ids2 == ids2 and torch.equal(got2, want2)
        ok &= rows and same2
        print(f"2. fine-tune with 8 added tokens + base, task arithmetic: {t2:.1f} s, output rows {out.shape[0]}, "
              f"added rows kept exactly: {rows}, same ids and logits as the fine-tune: {same2}")
        print("   " + "; ".join(n for n in res.notes if "vocabulary" in n))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
