"""Stored teacher outputs (attar.data.teacher_store, attar.distill.lm_store, `attar teacher dump`, the lm stage's
``teacher: {store: PATH}``): round trip within the stated error, bytes per token for a 151,936-token vocabulary,
KD from the store against the live teacher, resume after a kill, damaged shards and mismatched stores refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attar.data.teacher_store import (DEFAULT_STEP, StoreSettings, StoreWriter, TeacherStore,
                                      read_manifest)
from attar.distill.lm import distill_lm
from attar.distill.lm_objectives import LMTeacherCache, TopK, token_kd_loss
from attar.distill.lm_store import DEFAULT_K, StoredLMTeacher, dump_lm_teacher, reconstruction_kl, topk_of
from attar.errors import AttarError
from attar.text.charlm import BYTE_VOCAB, byte_tokenizer, lm_data, make_byte_lm

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

WORDS = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]


def _texts(n: int = 96) -> list[str]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        w = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=g)]
        out.append(f"the {w[0]} and the {w[1]} went to the {w[2]}, said {w[3]} number {i}, to {w[4]}.")
    return out


@pytest.fixture(scope="module")
def data():
    return lm_data(_texts(), byte_tokenizer(), prompt_len=8, max_len=48, val_fraction=0.15, test_fraction=0.15, seed=0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return make_byte_lm(layers=1, d_model=32, heads=2, context=64).eval()


def _write(folder, mask, top, ids, rest, vocab, shard_rows, step=DEFAULT_STEP) -> TeacherStore:
    """A store from arrays (positions row-major in ``mask``), written the way a dump writes it."""
    st = StoreSettings(vocab_size=vocab, k=top.shape[1], step=step, rows=mask.shape[0], width=mask.shape[1],
                       shard_rows=shard_rows)
    w = StoreWriter(folder, st)
    per_row = np.concatenate([[0], np.cumsum(mask.sum(1))])
    for i in range(w.n_shards):
        a, b = w.shard_rows(i)
        sl = slice(per_row[a], per_row[b])
        w.write(i, mask[a:b], top[sl], ids[sl], rest[sl])
    w.finish()
    return TeacherStore.open(folder)


def test_round_trip_keeps_ids_exact_and_log_probs_within_the_step(tmp_path):
    g = torch.Generator().manual_seed(1)
    rows, width, v, k = 13, 20, 1000, 16
    mask = torch.rand(rows, width, generator=g) < 0.6
    n = int(mask.sum())
    logits = torch.randn(n, v, generator=g) * 3
    logits[:5] = torch.randn(5, v, generator=g) * 40  # peaked: entries beyond 255 steps of the top-1 are clipped
    top, ind, rest = topk_of(logits, k, 1.0)
    store = _write(tmp_path / "s", mask.numpy(), top.numpy(), ind.numpy(), rest.numpy(), v, shard_rows=4)
    r, p, vals, ids, tail = store.positions(np.arange(rows))
    assert np.array_equal(r * width + p, np.flatnonzero(mask.numpy().ravel()))  # the same positions, in order
    order = np.argsort(ind.numpy(), 1)
    assert np.array_equal(ids, np.take_along_axis(ind.numpy(), order, 1))  # ids exact (sorted within a position)
    want = np.take_along_axis(top.numpy(), order, 1)
    in_range = (top[:, :1].numpy() - want) <= 255 * DEFAULT_STEP
    assert np.abs(vals - want)[in_range].max() <= DEFAULT_STEP + 1e-4  # the stated max error
    assert np.all(vals[~in_range] >= want[~in_range])  # clipped entries sit at the bound, above their true value
    assert np.allclose(tail, rest.numpy(), rtol=2**-10, atol=1e-6)  # float16
    # every position is a distribution: top-k mass + tail mass = 1
    assert np.allclose(np.exp(vals).sum(1) + np.exp(tail.astype(np.float64)), 1, atol=1e-5)
    # rows read in any order and through dense(): the same values where stored, nothing elsewhere
    pick = np.array([7, 0, 12, 7])
    dv, di, dr, stored = store.dense(pick)
    assert np.array_equal(stored, mask.numpy()[pick])
    r2, p2, v2, _, _ = store.positions(pick)
    assert np.array_equal(dv[r2, p2], v2)


def test_bytes_per_token_stay_under_100_for_a_151936_token_vocabulary_at_the_default_k(tmp_path):
    """A Zipf-like teacher over Qwen2.5's 151,936 tokens (ids in a random order, so nothing favours low ids): the
    written shards hold fewer than 100 bytes per token at the default k (DistillKit's setting: about 300)."""
    v, n = 151_936, 1024
    g = torch.Generator().manual_seed(0)
    prior = -1.1 * torch.log(torch.randperm(v, generator=g).float() + 1)  # token frequency ~ 1/rank^1.1
    tops, inds, rests = [], [], []
    for _ in range(n // 64):
        z = prior + 2.5 * torch.randn(64, v, generator=g)
        t, i, r = topk_of(z, DEFAULT_K, 1.0)
        tops.append(t), inds.append(i), rests.append(r)
    mask = np.ones((n // 32, 32), dtype=bool)
    store = _write(tmp_path / "s", mask, torch.cat(tops).numpy(), torch.cat(inds).numpy(), torch.cat(rests).numpy(),
                   v, shard_rows=8)
    on_disk = sum((tmp_path / "s" / s.file).stat().st_size for s in store.manifest.shards)
    assert on_disk == store.bytes
    per_token = on_disk / n
    assert per_token < 100, per_token
    raw = DEFAULT_K * (2 + 4) + 4  # float16 values + int32 ids + float32 tail: LMTeacherCache's format at this vocab
    assert per_token < raw / 1.9


def test_kd_from_the_store_matches_kd_from_the_live_teacher(tmp_path, data, teacher):
    torch.manual_seed(1)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    rows = torch.arange(12)
    part = data.train.rows(rows)
    with torch.no_grad():
        s = student(input_ids=part.ids).logits
        t = teacher(input_ids=part.ids).logits
    live = float(token_kd_loss(s, t, part.mask, "kl"))
    full = StoredLMTeacher(dump_lm_teacher(teacher, data.train, tmp_path / "full", pad_id=data.pad_id, k=BYTE_VOCAB,
                                           progress=False))
    assert float(token_kd_loss(s, full.get(rows), part.mask, "kl")) == pytest.approx(live, abs=1e-3)  # nats/token
    top = StoredLMTeacher(dump_lm_teacher(teacher, data.train, tmp_path / "k8", pad_id=data.pad_id, k=8, shard_rows=5,
                                          progress=False))
    cached = LMTeacherCache.build(teacher, data.train.ids, 8, pad_id=data.pad_id)
    a = float(token_kd_loss(s, top.get(rows), part.mask, "kl"))
    b = float(token_kd_loss(s, cached.get(rows), part.mask, "kl"))
    assert a == pytest.approx(b, abs=1e-3)
    # training: the store in place of the live teacher gives the same run within the quantisation's noise
    cfg = dict(steps=6, batch_size=8, eval_every=3, lr=3e-3)
    torch.manual_seed(2)
    s1 = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    s2 = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    s2.load_state_dict(s1.state_dict())
    r_live = distill_lm(s1, data, teacher, cfg, progress=False)
    r_store = distill_lm(s2, data, None, cfg, cache=tmp_path / "full", progress=False)
    assert "stored top-258" in r_store.metrics["teacher"]
    assert r_store.metrics["best_val_ppl"] == pytest.approx(r_live.metrics["best_val_ppl"], rel=5e-3)


def test_a_dump_killed_after_two_shards_resumes_to_the_same_store(tmp_path, data, teacher):
    whole = dump_lm_teacher(teacher, data.train, tmp_path / "whole", pad_id=data.pad_id, k=8, shard_rows=10,
                            progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(i):
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        dump_lm_teacher(teacher, data.train, tmp_path / "cut", pad_id=data.pad_id, k=8, shard_rows=10, progress=False,
                        on_shard=kill_after_two)
    m = read_manifest(tmp_path / "cut")
    assert not m.complete and [s.file for s in m.shards] == ["shard-00000.zst", "shard-00001.zst"]
    with pytest.raises(AttarError, match="did not finish.*resume"):
        TeacherStore.open(tmp_path / "cut")
    seen = []
    resumed = dump_lm_teacher(teacher, data.train, tmp_path / "cut", pad_id=data.pad_id, k=8, shard_rows=10,
                              progress=False, on_shard=seen.append)
    assert seen == list(range(2, len(whole.manifest.shards)))  # the finished shards were kept, not recomputed
    assert resumed.manifest == whole.manifest
    for s in whole.manifest.shards:
        assert (tmp_path / "cut" / s.file).read_bytes() == (tmp_path / "whole" / s.file).read_bytes()
    # a dump with other settings into the same folder is refused, naming what differs
    with pytest.raises(AttarError, match="k: 8 vs 4"):
        dump_lm_teacher(teacher, data.train, tmp_path / "cut", pad_id=data.pad_id, k=4, shard_rows=10, progress=False)


def test_a_truncated_or_changed_shard_is_refused_naming_the_file(tmp_path, data, teacher):
    dump_lm_teacher(teacher, data.train, tmp_path / "s", pad_id=data.pad_id, k=8, shard_rows=10, progress=False)
    for damage, says in (("truncate", "shard-00001.zst holds .* bytes, the manifest says"),
                         ("flip", "shard-00001.zst does not have the sha256"),
                         ("remove", "shard-00001.zst is missing")):
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(tmp_path / "s", tmp_path / "d")
        f = tmp_path / "d" / "shard-00001.zst"
        b = bytearray(f.read_bytes())
        if damage == "truncate":
            f.write_bytes(bytes(b[:-7]))
        elif damage == "flip":
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
        else:
            f.unlink()
        with pytest.raises(AttarError, match=says):
            TeacherStore.open(tmp_path / "d")
        with pytest.raises(AttarError, match="shard-00001.zst"):
            distill_lm(make_byte_lm(layers=1, d_model=16, heads=2, context=64), data, None, steps=1,
                       cache=tmp_path / "d", progress=False)


def test_a_store_made_for_another_vocabulary_temperature_or_rows_is_refused_naming_it(tmp_path, data, teacher):
    store = StoredLMTeacher(dump_lm_teacher(teacher, data.train, tmp_path / "s", pad_id=data.pad_id, k=8,
                                            temperature=2.0, progress=False))
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    with pytest.raises(AttarError, match="made at temperature 2, the loss uses 1"):
        distill_lm(student, data, None, steps=1, cache=store, progress=False)
    with pytest.raises(AttarError, match="other data rows.*data hash"):
        store.check(ids=data.train.rows(torch.arange(len(data.train)).flip(0)), temperature=2.0)
    with pytest.raises(AttarError, match="made on .* rows"):
        distill_lm(student, data.with_train(data.train.rows(torch.arange(10))), None, steps=1, temperature=2.0,
                   cache=store, progress=False)
    with pytest.raises(AttarError, match="vocabulary of 258 tokens, the student's has 300"):
        store.check(vocab_size=300)
    with pytest.raises(AttarError, match="another tokenizer"):
        StoredLMTeacher(dump_lm_teacher(teacher, data.train, tmp_path / "t", pad_id=data.pad_id, k=8,
                                        tokenizer="a" * 64, progress=False)).check(tokenizer="b" * 64)
    store.check(ids=data.train, temperature=2.0, vocab_size=BYTE_VOCAB)  # the right one passes


def test_reconstruction_kl_by_hand_and_zero_when_everything_is_kept():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    p = torch.softmax(z, -1)[0]
    tk = TopK.from_logits(z, 2)
    tail = float(p[2:].sum())
    by_hand = float(sum(p[i] * math.log(p[i] / (tail / 3)) for i in range(2, 5)))
    assert float(reconstruction_kl(z, tk)[0]) == pytest.approx(by_hand, rel=1e-5)
    assert float(reconstruction_kl(z, TopK.from_logits(z, 5))[0]) == pytest.approx(0, abs=1e-6)


def test_cli_dump_then_a_recipe_reads_the_store(tmp_path):
    from attar.cli import app
    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts(120)))
    torch.manual_seed(0)
    make_byte_lm(tmp_path / "teacher", layers=1, d_model=32, heads=2, context=96)
    block = f"{{name: {corpus}, max_len: 80}}"
    res = CliRunner().invoke(app, ["teacher", "dump", "--model", str(tmp_path / "teacher"), "--data", block,
                                   "--out", str(tmp_path / "store"), "--k", "16", "--shard-rows", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "bytes/token" in res.output
    shown = CliRunner().invoke(app, ["teacher", "show", str(tmp_path / "store")])
    assert "all shards intact" in shown.output and "top-16 of 258" in shown.output

    def recipe(name, **train):
        r = tmp_path / f"{name}.yaml"
        r.write_text(json.dumps({"name": name, "stages": [{"name": "student", "kind": "lm", "lm": {
            "student": {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 96}},
            "teacher": {"store": str(tmp_path / "store")}, "data": {"name": str(corpus), "max_len": 80},
            "train": {"steps": 4, "batch_size": 8, "eval_every": 2} | train}}]}))
        return Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None)

    run = recipe("ok").run()
    metrics = json.loads((run / "student" / "lm-metrics.json").read_text())["metrics"]
    assert metrics["steps"] == 4 and math.isfinite(metrics["test_ppl"]) and "teacher_test_ppl" not in metrics
    with pytest.raises(AttarError, match="temperature 1, the loss uses 2"):
        recipe("hot", temperature=2.0).run()
    with pytest.raises(AttarError, match="cache_topk"):
        r = tmp_path / "bad.yaml"
        r.write_text(json.dumps({"name": "bad", "stages": [{"name": "s", "kind": "lm", "lm": {
            "student": {"byte": {"layers": 1}}, "teacher": {"store": str(tmp_path / "store")}, "cache_topk": 8}}]}))
        load_recipe(r)


def test_every_scored_position_is_stored_even_a_final_token_equal_to_the_pad_id(tmp_path, data, teacher):
    """An EOS that doubles as padding is scored; a dump batch of that row alone must not cut it away (a training
    batch with a longer row keeps the column and asks for it)."""
    from attar.text.lm_split import LMSplit

    ids = torch.full((3, 12), data.pad_id)
    ids[0, :6] = torch.tensor([1, 70, 71, 72, 73, data.pad_id])  # its last response token is the pad id
    ids[1, :10] = torch.arange(60, 70)
    ids[2, :4] = torch.arange(80, 84)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:6], mask[1, 2:10], mask[2, 2:4] = True, True, True
    split = LMSplit(ids, mask, torch.full((3,), 2))
    store = StoredLMTeacher(dump_lm_teacher(teacher, split, tmp_path / "s", pad_id=data.pad_id, k=4, batch_size=1,
                                            progress=False))
    *_, stored = store.store.dense([0, 1, 2])
    assert np.array_equal(stored[:, :-1], mask[:, 1:].numpy())
