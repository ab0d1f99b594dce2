"""Variable-length rows through the memory-mapped token store (attar.text.row_store): prompt/response (SFT) pairs,
with and without a chat template, and prompt + continuation rows of plain text hold the same ids, masks, prompt
lengths and train/val/test split as the in-memory rows, row by row and across shard boundaries; the store is reused
without tokenising again, a damaged file is refused by name, the build streams under a memory bound and a kill leaves
no torn store; and an lm stage trains SFT rows from the store and resumes to the uninterrupted weights."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import torch

from attar.errors import AttarError
from attar.text import charlm, row_store
from attar.text.charlm import byte_tokenizer, lm_data, lm_pair_data, lm_pair_store_data
from attar.text.lm_io import lm_dataset, pair_stream, read_pairs
from attar.text.row_store import RowView
from lm_store_resume import run_kill_resume

WORDS = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _pairs(n: int = 240) -> list[dict]:
    """Prompts and responses of many lengths, with repeated pairs, empty responses and rows longer than max_len."""
    out = []
    for i in range(n):
        w = WORDS[i % 12]
        out.append({"q": f"what is {w} {i % 97}?", "a": "" if i % 29 == 0 else f"{w} is " + "a word, " * (i % 11)})
    return out


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = byte_tokenizer()
    t.chat_template = TEMPLATE
    return t


def _same_rows(mem, stored) -> None:
    """Each split of two LMData: the same rows, masks, prompt lengths, width and scored tokens."""
    for name in ("train", "val", "test"):
        want, view = getattr(mem, name), getattr(stored, name)
        assert isinstance(view, RowView) and len(view) == len(want) > 0
        assert view.width == want.width and view.response_tokens == want.response_tokens
        got = view.slice(0, len(view))
        assert torch.equal(got.ids, want.ids) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.prompt_len, want.prompt_len) and torch.equal(view.prompt_len, want.prompt_len)
        idx = torch.tensor([len(view) - 1, 0, len(view) // 2, 0])
        part = view.rows(idx)
        assert part.ids.dtype == torch.int64 and torch.equal(part.ids, want.ids[idx])
        assert torch.equal(part.mask, want.mask[idx]) and torch.equal(part.prompt_len, want.prompt_len[idx])


@pytest.mark.parametrize("template", [False, True])
def test_sft_pairs_from_the_store_are_the_in_memory_rows_split_the_same_way(tok, chat_tok, tmp_path, template):
    t = chat_tok if template else tok
    f = _write_jsonl(tmp_path / "sft.jsonl", _pairs())
    seen = {}
    for seed in (0, 1):
        mem = lm_pair_data(*read_pairs(f, "q", "a"), t, 56, template, seed=seed)
        stored = lm_pair_store_data(pair_stream(f, "q", "a"), t, tmp_path / "tokens", 56, template, seed=seed,
                                    shard_tokens=100)  # 100: rows cross shard boundaries
        _same_rows(mem, stored)
        assert stored.info["store_built"] == (seed == 0)  # one store for every seed: the split is drawn when read
        assert stored.info["texts"] == mem.info["texts"] == len({(r["q"], r["a"]) for r in _pairs() if r["a"]})
        seen[seed] = stored
    store = seen[0].train.store
    assert len(store.manifest.splits["rows"].shards) > 10
    assert int(seen[0].train.prompt_len.min()) > 1 and int(seen[0].train.rows([0]).mask[0, 0]) == 0
    if template:  # the prompt is a user turn ending in the assistant's header
        first = seen[0].test.rows([0])
        assert tok.decode(first.ids[0, : int(first.prompt_len[0])]).startswith("<user>what is")
    # the test rows are the same for every seed, validation is drawn with the seed (as in memory)
    assert (seen[0].test.index == seen[1].test.index).all() and len(seen[0].val.index) == len(seen[1].val.index)
    assert seen[0].val.fingerprint() != seen[1].val.fingerprint() and seen[0].test.fingerprint() == seen[1].test.fingerprint()
    limited = lm_pair_store_data(pair_stream(f, "q", "a"), t, tmp_path / "tokens", 56, template, seed=0, train_limit=5,
                                 shard_tokens=100)
    assert torch.equal(limited.train.slice(0, 99).ids, seen[0].train.slice(0, 5).ids)


def test_prompt_and_continuation_rows_from_the_store_are_the_in_memory_rows(tok, tmp_path):
    lines = [f"the {WORDS[i % 12]} number {i} went to the river " + "and on " * (i % 13) for i in range(300)]
    lines[7] = "tiny"  # too short for a prompt and a response: dropped, counted
    lines += lines[::3]  # repeated texts: kept once, where they first occur
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(lines))
    kw = dict(text_column=None, prompt_len=8, max_len=64, seed=2, train_limit=None, val_limit=None, test_limit=None)
    mem = lm_dataset(str(f), tok, None, **kw)
    stored = lm_dataset(str(f), tok, None, **kw, store=tmp_path / "tokens")
    _same_rows(mem, stored)
    assert stored.info["texts"] == mem.info["texts"] == 300 and stored.info["dropped_short"] == mem.info["dropped_short"] == 1
    listed = lm_data(lines, tok, 8, 64, seed=2, store=tmp_path / "tokens", shard_tokens=64)
    _same_rows(mem, listed)
    with pytest.raises(AttarError, match="need 1 <= prompt_len < max_len - 1"):
        lm_data(lines, tok, 63, 64, store=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_store_is_reused_without_tokenising_again_and_rebuilt_when_the_file_changes(tok, tmp_path, monkeypatch):
    f = tmp_path / "sft.jsonl"
    _write_jsonl(f, _pairs())
    a = lm_pair_store_data(pair_stream(str(f), "q", "a"), tok, tmp_path / "tokens", 56)
    shard = a.train.files[0]
    stamp = shard.stat().st_mtime_ns

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(charlm, "_encode", no_tokenising)
        b = lm_pair_store_data(pair_stream(str(f), "q", "a"), tok, tmp_path / "tokens", 56)
        with pytest.raises(AssertionError, match="tokenised again"):  # other settings: a store of their own
            lm_pair_store_data(pair_stream(str(f), "q", "a"), tok, tmp_path / "tokens", 48)
    assert not b.info["store_built"] and b.info["store"] == a.info["store"] and shard.stat().st_mtime_ns == stamp
    assert b.train.fingerprint() == a.train.fingerprint()
    _write_jsonl(f, _pairs(200))  # the file changed: its store is rebuilt in place
    c = lm_pair_store_data(pair_stream(str(f), "q", "a"), tok, tmp_path / "tokens", 56)
    assert c.info["store_built"] and c.info["store"] == a.info["store"] and c.train.fingerprint() != a.train.fingerprint()
    m = json.loads((c.train.store.folder / "manifest.json").read_text())
    assert m["settings"]["layout"] == "rows" and m["settings"]["rows"] == "pairs" and m["settings"]["dtype"] == "uint16"
    assert sorted(m["splits"]["rows"]["index"]) == ["dropped", "offsets", "prompt", "rows", "width"]
    assert len(os.listdir(tmp_path / "tokens")) == 1  # the 48-token build was stopped: no staging left behind


def test_a_damaged_file_of_a_row_store_is_refused_naming_it_and_the_fix(tok, tmp_path):
    f = _write_jsonl(tmp_path / "sft.jsonl", _pairs())
    store = lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56).train.store
    for name, pattern in (("rows-00000.bin", r"rows-00000\.bin holds \d+ bytes, the manifest says \d+ \(\d+ tokens\)"),
                          ("rows-offsets.bin", r"rows-offsets\.bin holds \d+ bytes, the manifest says \d+ \(\d+ rows\)")):
        path = store.folder / name
        data = path.read_bytes()
        path.write_bytes(data[:-4])
        with pytest.raises(AttarError, match=pattern + r".*truncated.*delete the folder .* to rebuild"):
            lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56)
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        with pytest.raises(AttarError, match=name.replace(".", r"\.") + r" does not have the sha256 .*delete the folder"):
            lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56)
        path.write_bytes(data)
    with pytest.raises(AttarError, match=r"row \d+'s prompt has \d+ tokens, max_len=8 leaves no room"):
        lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "short", 8)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"q": "x", "a": " "}])
    with pytest.raises(AttarError, match="no prompt/response row has a non-empty response"):
        lm_pair_store_data(pair_stream(empty, "q", "a"), tok, tmp_path / "short", 32)
    assert not any((p / "manifest.json").exists() for p in (tmp_path / "short").iterdir())


def test_building_streams_the_pairs_and_reading_loads_only_the_rows_asked_for(tok, tmp_path):
    f = tmp_path / "big.jsonl"
    with open(f, "w") as out:
        for i in range(20000):
            out.write(json.dumps({"q": f"question {i}: what comes next?", "a": f"answer {i} " + "and words " * (i % 7)}) + "\n")
    tracemalloc.start()
    try:
        data = lm_pair_store_data(pair_stream(str(f), "q", "a"), tok, tmp_path / "tokens", 96, shard_tokens=100_000,
                                    chunk_rows=256)
        build_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]  # the views' row numbers: 8 bytes a row
        n = len(data.train)
        rows = data.train.rows([0, n // 2, n - 1])
        read_peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    info = data.train.store.manifest.splits["rows"]
    assert info.tokens > 1_000_000 and len(info.shards) > 10 and info.blocks == 20000
    # the in-memory rows would take rows * width * 9 bytes (int64 ids + bool mask), the ids alone tokens * 8
    assert build_peak < info.tokens * 8 / 3, (build_peak, info.tokens)
    assert read_peak < 100_000 and rows.ids.shape == (3, data.train.width)


def test_a_build_killed_halfway_leaves_no_store_that_is_read(tok, tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    f = _write_jsonl(tmp_path / "sft.jsonl", _pairs())
    real = row_store._write_array

    def die(path, parts):
        if path.name == "rows-prompt.bin":  # the shards and offsets are written: the last file is not
            raise Killed
        return real(path, parts)

    with monkeypatch.context() as m:
        m.setattr(row_store, "_write_array", die)
        with pytest.raises(Killed):
            lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56)
    assert not [p for p in (tmp_path / "tokens").iterdir() if (p / "manifest.json").exists()]
    data = lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56)
    assert data.info["store_built"] and len(data.train) > 0


def test_training_from_the_store_gives_the_weights_of_training_in_memory(tok, tmp_path):
    from attar.distill.lm import train_lm
    from attar.text.charlm import make_byte_lm

    f = _write_jsonl(tmp_path / "sft.jsonl", _pairs())
    mem = lm_pair_data(*read_pairs(f, "q", "a"), tok, 56, seed=0)
    stored = lm_pair_store_data(pair_stream(f, "q", "a"), tok, tmp_path / "tokens", 56, seed=0)
    cfg = {"steps": 4, "batch_size": 8, "lr": 0.01, "eval_every": 2, "eval_rows": 8, "seed": 0}
    a = train_lm(make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0), mem, cfg, progress=False)
    b = train_lm(make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0), stored, cfg, progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history) and len(a.history) == 2
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _recipe(tmp_path, rows) -> str:
    import yaml

    lm = {"student": {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 64}},
          "teacher": {"byte": {"layers": 1, "d_model": 24, "heads": 2, "context": 64}},
          "data": {"name": str(rows), "prompt_field": "q", "response_field": "a", "max_len": 56},
          "train": {"steps": 12, "batch_size": 4, "lr": 0.005, "eval_every": 3, "checkpoint_every": 4, "alpha": 0.5,
                    "warmup_steps": 2}, "cache_topk": 4}
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "sft", "seed": 0, "stages": [{"name": "s", "kind": "lm", "lm": lm}]}))
    return r


def test_an_lm_stage_trains_sft_rows_from_the_store_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    rows = _write_jsonl(tmp_path / "sft.jsonl", _pairs())

    def trains_from_the_store(args, kwargs):
        assert isinstance(args[1].train, RowView)  # the stage trains from the store's rows

    out = run_kill_resume(_recipe(tmp_path, rows), tmp_path, monkeypatch, check=trains_from_the_store)
    assert out["metrics"]["test_ppl"] > 1 and 0 <= out["metrics"]["top1_agreement"] <= 1
    assert json.loads((out["store"] / "manifest.json").read_text())["settings"]["rows"] == "pairs"


def test_csv_and_parquet_pairs_read_a_chunk_at_a_time_as_written(tok, tmp_path):
    import pandas as pd

    df = pd.DataFrame({"q": ["a", "007", "c", None, "e"], "a": ["1", "2.50", None, "4", "x"]})
    csv, pq = tmp_path / "p.csv", tmp_path / "p.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(pq)
    want = (["a", "007", "e"], ["1", "2.50", "x"])  # cells as written; a row missing either value is skipped
    for f in (csv, pq):
        s = pair_stream(str(f), "q", "a")
        assert read_pairs(str(f), "q", "a") == want
        assert [p for chunk in s.chunks(2) for p in chunk[0]] == want[0]  # the same rows whatever the chunk size
        with pytest.raises(AttarError, match=r"no column 'answer'; the columns are 'q', 'a'"):
            next(pair_stream(str(f), "q", "answer").chunks())
