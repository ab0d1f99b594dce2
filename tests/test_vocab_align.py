"""Token-string alignment across tokenizer families (attar.text.vocab_align)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attar.errors import AttarError
from attar.text.vocab_align import align_vocabularies, read_vocab, shared_token_ids

MODELS = Path(__file__).resolve().parents[1] / "runs" / "models"

# GPT-2 byte-level: 'Ġ' is a space, 'Ċ' a newline; SentencePiece: '▁' a space, '<0x0A>' a newline byte
BYTE_LEVEL = {"Ġhello": 0, "Ċ": 1, "world": 2, "Ġthe": 3, "x": 4}
SPIECE = {"<0x0A>": 0, "▁the": 1, "world": 2, "▁hello": 3, "▁zz": 4, "▁": 5, "<0x20>": 6}


def test_families_are_normalised_to_bytes():
    a, b = read_vocab(BYTE_LEVEL), read_vocab(SPIECE)
    assert (a.family, b.family) == ("byte_level", "metaspace")
    assert a.keys[:4] == [b" hello", b"\n", b"world", b" the"]
    assert b.keys[0] == b"\n" and b.keys[1] == b" the" and b.keys[6] == b" "
    ia, ib = shared_token_ids(BYTE_LEVEL, SPIECE)
    # hello, newline, world, the -- by hand; 'x' and '▁zz' have no partner
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 3), (1, 0), (2, 2), (3, 1)]
    assert ia.dtype == torch.long


def test_byte_fallback_loses_to_a_regular_piece_for_the_same_byte():
    # '▁' (id 5) and '<0x20>' (id 6) both spell b' '; the regular piece stands for it
    assert read_vocab(SPIECE).canonical[b" "] == 5
    al = align_vocabularies([{"Ġ": 0}, SPIECE])
    assert al.maps[1][5].item() == al.maps[1][6].item() == 0  # both spellings land on the one output token
    assert al.sources[1][0].item() == 5


def test_union_keeps_the_first_vocabulary_ids_and_appends_the_rest():
    al = align_vocabularies([BYTE_LEVEL, SPIECE])
    assert al.tokens[:5] == ["Ġhello", "Ċ", "world", "Ġthe", "x"]
    # SPIECE's tokens not in BYTE_LEVEL, in SPIECE id order: '▁zz' (4), '▁' (5); '<0x20>' is the same as '▁'
    assert al.tokens[5:] == ["▁zz", "▁"] and al.origin == [0] * 5 + [1, 1]
    assert al.maps[0].tolist() == [0, 1, 2, 3, 4]
    assert al.maps[1].tolist() == [1, 3, 2, 0, 5, 6, 6]
    assert al.sources[0].tolist() == [0, 1, 2, 3, 4, -1, -1]
    assert al.sources[1].tolist() == [3, 0, 2, 1, -1, 4, 5]
    assert al.missing(0) == 2 and al.missing(1) == 1
    # every input token round-trips: output token of map[i] decodes to the same bytes as input token i
    for k, v in enumerate(al.vocabs):
        for i, j in enumerate(al.maps[k].tolist()):
            assert al.keys[j] == v.keys[i]


def test_base_vocabulary_drops_what_the_base_lacks():
    al = align_vocabularies([BYTE_LEVEL, SPIECE], base=1)
    assert al.tokens == list(SPIECE)  # the base's own ids, in order
    assert al.maps[0].tolist() == [3, 0, 2, 1, -1]  # 'x' has no place
    assert al.dropped(0) == 1 and al.is_identity(1) and not al.is_identity(0)
    with pytest.raises(AttarError, match="base=2"):
        align_vocabularies([BYTE_LEVEL, SPIECE], base=2)


def test_permuted_vocabulary_maps_are_inverse_permutations():
    toks = [f"Ġt{i}" for i in range(50)]
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    a = {t: i for i, t in enumerate(toks)}
    b = {toks[p]: i for i, p in enumerate(perm.tolist())}
    al = align_vocabularies([a, b])
    assert len(al) == 50 and al.missing(1) == 0
    assert torch.equal(al.maps[1], perm) and torch.equal(al.sources[1][al.maps[1]], torch.arange(50))


def test_tokenizer_json_added_tokens_are_taken_as_written(tmp_path):
    data = {
        "model": {"type": "BPE", "vocab": {"a": 0, "Ġb": 1}, "merges": []},
        "added_tokens": [{"id": 2, "content": "<|im_start|>", "special": True},
                         {"id": 3, "content": "Ġnot byte level", "special": False}],
        "pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    v = read_vocab(tmp_path)
    assert v.family == "byte_level" and v.keys == [b"a", b" b", b"<|im_start|>", "Ġnot byte level".encode()]
    assert v.special == {2} and v.added == {2, 3}
    with pytest.raises(AttarError, match="no tokenizer.json"):
        read_vocab(tmp_path / "nowhere")


@pytest.mark.skipif(not (MODELS / "smollm2-135m" / "tokenizer.json").is_file()
                    or not (MODELS / "qwen2.5-coder-0.5b" / "tokenizer.json").is_file(), reason="models not present")
def test_smollm2_and_qwen_share_tens_of_thousands_of_tokens_that_decode_equal():
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m")
    qwen = AutoTokenizer.from_pretrained(MODELS / "qwen2.5-coder-0.5b")
    ia, ib = shared_token_ids(smol, qwen)
    # both GPT-2 byte-level BPE: measured 39,237 shared strings (of 49,152 SmolLM2 tokens)
    assert len(ia) == 39237 and len(set(ia.tolist())) == len(ia) and len(set(ib.tolist())) == len(ib)
    # reading from the folder gives the same pairs as from the loaded tokenizer
    fa, fb = shared_token_ids(MODELS / "smollm2-135m", MODELS / "qwen2.5-coder-0.5b")
    assert torch.equal(fa, ia) and torch.equal(fb, ib)
    # independent check with each tokenizer's own decoder on a sample of pairs
    for i, j in zip(ia[::500].tolist(), ib[::500].tolist()):
        assert smol.convert_tokens_to_string([smol.convert_ids_to_tokens(i)]) == \
            qwen.convert_tokens_to_string([qwen.convert_ids_to_tokens(j)])
    assert smol.convert_tokens_to_ids("<|im_start|>") in ia.tolist()


@pytest.mark.skipif(not (MODELS / "gemma3-270m" / "tokenizer.json").is_file()
                    or not (MODELS / "smollm2-135m" / "tokenizer.json").is_file(), reason="models not present")
def test_byte_level_and_sentencepiece_families_align_on_spaces_and_newlines():
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m")
    gemma = AutoTokenizer.from_pretrained(MODELS / "gemma3-270m")
    ia, ib = shared_token_ids(smol, gemma)
    pairs = dict(zip(ia.tolist(), ib.tolist()))
    assert len(pairs) > 40000  # measured 46,145
    for word in ("Ġthe", "Ġhello", "Ċ"):
        j = pairs[smol.convert_tokens_to_ids(word)]
        assert gemma.convert_ids_to_tokens(j) == word.replace("Ġ", "▁").replace("Ċ", "\n")


def test_spell_inverts_the_normalisation():
    from attar.text.vocab_align import _key, spell

    for raw in ("Ġhello", "Ċ", "Ã©", "ĠæĿ±"):  # byte-level, including a partial UTF-8 sequence
        assert spell(_key(raw, "byte_level", False), "byte_level") == raw
    assert spell(b" the", "metaspace") == "▁the" and spell(b"\xe6", "metaspace") == "<0xE6>"
    assert spell(b"\xe6\xb1", "plain") is None
