"""Memory-mapped token shards (attar.text.token_store): the same rows as in-memory packing across shard boundaries,
built without holding the corpus in memory, reused or rebuilt by its manifest, refused when damaged, never half
built; and an lm stage with ``pack: true`` trains from it (teacher cache, perplexity, agreement on the lazy view)
and resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import torch

from attar.errors import AttarError
from attar.text import token_store as ts
from attar.text.charlm import byte_tokenizer, lm_packed, lm_packed_data
from attar.text.text_stream import text_stream
from attar.text.token_store import split_of, token_store
from lm_store_resume import run_kill_resume

WORDS = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]


def _texts(n: int = 300) -> list[str]:
    return [f"text {i} says {WORDS[i % 12]} " + "and more " * (i % 5) for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_store_rows_equal_in_memory_packing_across_shard_boundaries(tok, tmp_path):
    texts = _texts()
    ram = lm_packed_data(texts, tok, max_len=16)
    store, built = token_store(text_stream(texts), tok, tmp_path, block=16, shard_tokens=50)  # 50: not a block multiple
    assert built and len(store.manifest.splits["train"].shards) > 10
    for name in ("train", "val", "test"):
        view, want = store.split(name), getattr(ram, name)
        assert len(view) == len(want) > 0 and view.width == 16 and view.response_tokens == want.response_tokens
        assert torch.equal(view.slice(0, len(view)).ids, want.ids) and torch.equal(view.slice(0, len(view)).mask, want.mask)
        idx = torch.tensor([len(view) - 1, 3, 0, 3])  # block 3 spans the first shard boundary (48..64 over 50)
        got = view.rows(idx)
        assert got.ids.dtype == torch.int64 and torch.equal(got.ids, want.ids[idx]) and torch.equal(got.mask, want.mask[idx])
        # the split is each text's own: the in-memory packing of exactly its texts, in source order
        mine = [t for t in texts if split_of(t, 0.1, 0.1) == name]
        assert torch.equal(lm_packed(mine, tok, 16).ids, want.ids)
    assert store.split("train", limit=5).slice(0, 99).ids.shape == (5, 16)
    test_text = tok.decode(ram.test.ids.flatten())
    assert not any(t in test_text for t in texts if split_of(t, 0.1, 0.1) == "train")


def test_building_streams_the_corpus_and_reading_loads_only_the_rows_asked_for(tok, tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("".join(f"line {i} of a corpus larger than the budget, with words and more words.\n" for i in range(20000)))
    tracemalloc.start()
    try:
        store, _ = token_store(text_stream(str(f)), tok, tmp_path / "s", block=64, shard_tokens=100_000, chunk_texts=256)
        build_peak = tracemalloc.get_traced_memory()[1]
        tokens = sum(s.tokens for s in store.manifest.splits.values())
        tracemalloc.reset_peak()
        view = store.split("train")
        n = len(view)
        rows = view.rows([0, n // 2, n - 1])
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens > 1_400_000 and len(store.manifest.splits["train"].shards) > 10
    assert build_peak < tokens * 8 / 3, (build_peak, tokens)  # the ids as int64 would need tokens * 8 bytes
    assert read_peak < 200_000 and rows.ids.shape == (3, 64)


def test_a_store_is_reused_while_its_manifest_matches_and_rebuilt_otherwise(tok, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(_texts()))
    s1, built1 = token_store(text_stream(str(f)), tok, tmp_path / "root", block=16)
    shard = s1.folder / s1.manifest.splits["train"].shards[0].file
    stamp = shard.stat().st_mtime_ns
    s2, built2 = token_store(text_stream(str(f)), tok, tmp_path / "root", block=16)
    assert built1 and not built2 and s2.folder == s1.folder and shard.stat().st_mtime_ns == stamp
    s3, built3 = token_store(text_stream(str(f)), tok, tmp_path / "root", block=32)  # other settings: a store of its own
    assert built3 and s3.folder != s1.folder and s1.folder.exists()
    f.write_text("\n".join(_texts()[:200]))  # the source changed: the same folder is rebuilt
    s4, built4 = token_store(text_stream(str(f)), tok, tmp_path / "root", block=16)
    assert built4 and s4.folder == s1.folder and s4.manifest.settings.source_sha256 != s1.manifest.settings.source_sha256
    m = json.loads((s4.folder / "manifest.json").read_text())
    assert m["format"] == "attar-token-store/1" and m["settings"]["dtype"] == "uint16" and m["settings"]["eos_id"] == 256
    assert sorted(os.listdir(tmp_path / "root")) == sorted([s1.folder.name, s3.folder.name])  # no staging left


def test_a_damaged_shard_is_refused_naming_the_file_and_the_fix(tok, tmp_path):
    store, _ = token_store(text_stream(_texts()), tok, tmp_path, block=16)
    shard = store.folder / store.manifest.splits["train"].shards[0].file
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(AttarError, match=r"train-00000\.bin holds \d+ bytes, the manifest says \d+ .*truncated.*delete "
                                         r"the folder .* to rebuild"):
        token_store(text_stream(_texts()), tok, tmp_path, block=16)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(AttarError, match=r"train-00000\.bin does not have the sha256 .*delete the folder"):
        token_store(text_stream(_texts()), tok, tmp_path, block=16)
    with pytest.raises(AttarError, match=r"its train texts \(14 of 20, 510 tokens\) make no full block of max_len=100000"):
        token_store(text_stream(_texts(20)), tok, tmp_path / "small", block=100_000)


def test_a_build_killed_halfway_leaves_no_store_that_is_read(tok, tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    def die(self, texts, block):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(ts._ShardWriter, "close", die)
        with pytest.raises(Killed):
            token_store(text_stream(_texts()), tok, tmp_path, block=16)
    assert not [p for p in tmp_path.iterdir() if (p / "manifest.json").exists()]
    store, built = token_store(text_stream(_texts()), tok, tmp_path, block=16)
    assert built and len(store.split("train")) > 0


def _recipe(tmp_path, corpus, steps=12, kill=None):
    import yaml

    lm = {"student": {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 48}},
          "teacher": {"byte": {"layers": 1, "d_model": 24, "heads": 2, "context": 48}},
          "data": {"name": str(corpus), "pack": True, "max_len": 48},
          "train": {"steps": steps, "batch_size": 4, "lr": 0.005, "eval_every": 3, "checkpoint_every": 4,
                    "alpha": 0.5, "warmup_steps": 2}, "cache_topk": 4}
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "pack", "seed": 0, "stages": [{"name": "s", "kind": "lm", "lm": lm}]}))
    return r


def test_an_lm_stage_trains_from_the_store_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(200)))
    saved = run_kill_resume(_recipe(tmp_path, corpus), tmp_path, monkeypatch)["metrics"]
    assert saved["test_ppl"] > 1 and 0 <= saved["top1_agreement"] <= 1
