"""Text a user brings to a language model: the SpamAssassin and Austen built-ins (from fake folders laid out like the
fetched corpora), and .jsonl / .csv / .parquet files and datasets folders read a chunk at a time, with one-paragraph
errors for a missing field and an empty corpus."""

from __future__ import annotations

import json

import pytest

from attar.errors import AttarError
from attar.text import sources
from attar.text.lm_io import read_texts
from attar.text.mail import mail_body
from attar.text.text_stream import text_stream

MAIL = """From someone@example.com  Tue Aug  6 11:52:20 2002
Return-Path: <someone@example.com>
Subject: Re: apt
Content-Type: text/plain; charset=us-ascii

How do I hold all kernel packages?   

-- Peter
"""

HTML_MAIL = """From x@y  Mon Sep  2 2002
Subject: BUY NOW
MIME-Version: 1.0
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<html><head><style>p {color: red}</style></head><body><p>Cheap =E9conomie</p><p>Click&nbsp;here</p></body></html>
"""


def test_mail_body_drops_headers_and_reads_html_only_mails():
    assert mail_body(MAIL) == "How do I hold all kernel packages?\n\n-- Peter"
    body = mail_body(HTML_MAIL)
    assert "Cheap \u00e9conomie" in body and "Click\xa0here" in body and "color" not in body and "Subject" not in body
    assert mail_body("Subject: nothing\nContent-Type: image/gif\n\nR0lGOD") == ""


def test_spam_assassin_reads_bodies_with_ham_or_spam_from_the_group(tmp_path, monkeypatch):
    for group, name, text in (("easy-ham-1", "00001.a", MAIL), ("spam-2", "00001.b", HTML_MAIL),
                              ("hard-ham-1", "00002.c", "Subject: empty\n\n")):
        (tmp_path / "spam-assassin" / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / "spam-assassin" / group / f"{name}.json").write_text(json.dumps(
            {"id": name[:5], "group": group, "checksum": {"type": "MD5", "value": "0"}, "text": text}))
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path))
    sources._decode_spam.cache_clear()
    raw = sources.TEXT_BUILTINS.get("spam-assassin").load()
    sources._decode_spam.cache_clear()
    assert raw.texts[0] == "How do I hold all kernel packages?\n\n-- Peter" and "Cheap" in raw.texts[1]
    assert [raw.classes[i] for i in raw.y.tolist()] == ["ham", "spam"] and raw.info["rows_dropped_empty"] == 1
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path / "none"))
    with pytest.raises(AttarError, match="get-corpus.sh spam-assassin"):
        sources.TEXT_BUILTINS.get("spam-assassin").load()


def test_austen_reads_paragraphs_with_the_novel_as_class(tmp_path, monkeypatch):
    (tmp_path / "austen").mkdir()
    (tmp_path / "austen" / "emma.jsonl").write_text(
        json.dumps({"text": "EMMA"}) + "\n" + json.dumps({"text": "Emma Woodhouse, handsome, clever, and rich."}) + "\n")
    (tmp_path / "austen" / "persuasion.jsonl").write_text(json.dumps({"text": "Sir Walter Elliot, of Kellynch Hall."}) + "\n\n")
    monkeypatch.setenv("ATTAR_CORPORA", str(tmp_path))
    sources._decode_austen.cache_clear()
    raw = sources.TEXT_BUILTINS.get("austen").load()
    assert raw.texts == ["EMMA", "Emma Woodhouse, handsome, clever, and rich.", "Sir Walter Elliot, of Kellynch Hall."]
    assert [raw.classes[i] for i in raw.y.tolist()] == ["emma", "emma", "persuasion"]
    (tmp_path / "austen" / "emma.jsonl").write_text("[1, 2]\n")
    sources._decode_austen.cache_clear()
    with pytest.raises(AttarError, match="emma.jsonl, line 1: not a JSON object with a 'text' field"):
        sources.TEXT_BUILTINS.get("austen").load()
    sources._decode_austen.cache_clear()
    listed = {d["name"]: d for d in sources.list_text_datasets()}
    assert listed["austen"]["available"] and "get-corpus.sh austen" in listed["austen"]["install"]


def test_jsonl_csv_parquet_and_datasets_folders_are_read_in_chunks(tmp_path):
    import pandas as pd
    from datasets import Dataset, DatasetDict

    texts = [f"text {i}" for i in range(7)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pd.DataFrame({"body": texts + [None]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "d.parquet")
    DatasetDict({"train": Dataset.from_dict({"body": texts}), "test": Dataset.from_dict({"body": ["x"]})}).save_to_disk(
        str(tmp_path / "hf"))
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf1"))
    assert read_texts(str(tmp_path / "a.jsonl"), None) == texts
    for name in ("b.jsonl", "c.csv", "d.parquet", "hf"):
        assert read_texts(str(tmp_path / name), "body") == texts, name
        assert [len(c) for c in text_stream(str(tmp_path / name), "body").chunks(3)] == [3, 3, 1], name
    assert read_texts(str(tmp_path / "hf1"), None) == texts
    assert text_stream(str(tmp_path / "a.jsonl")).fingerprint() != text_stream(str(tmp_path / "b.jsonl"), "body").fingerprint()


def test_a_missing_field_or_an_empty_corpus_is_one_paragraph_naming_what_exists(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(AttarError, match=r"b.jsonl, line 1: no field 'text' \(the row has 'body', 'id'\)\. Set text_column"):
        read_texts(str(tmp_path / "b.jsonl"), None)
    from datasets import Dataset

    Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(AttarError, match=r"no text column 'text'; the columns are 'body'"):
        read_texts(str(tmp_path / "hf"), None)
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "  "}) + "\n\n")
    with pytest.raises(AttarError, match="e.jsonl: no text in it .*in column 'text'"):
        read_texts(str(tmp_path / "e.jsonl"), None)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(AttarError, match="empty.txt: no text in it"):
        read_texts(str(tmp_path / "empty.txt"), None)
    (tmp_path / "plain").mkdir()
    with pytest.raises(AttarError, match="not a datasets folder"):
        read_texts(str(tmp_path / "plain"), None)
    with pytest.raises(AttarError, match="neither a built-in text set"):
        read_texts(str(tmp_path / "x.json"), None)
