"""GRAPE response selection: the log-likelihood against a hand computation, the choice per prompt, the data
formats, a plain callable scorer, and the CLI command on a local tiny GPT-2 folder (nothing downloaded)."""

import csv
import json
import math

import pytest
import torch

from attar.errors import AttarError
from attar.select.grape import grape_select, group_candidates, read_candidates, response_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a cat dog sat ran on under mat rug fast slowly is was red blue big small and then".split()


def _tiny_lm(folder=None, seed=0):
    """A random 1-layer GPT-2 over a 25-word word-level vocabulary, tokenizer built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|endoftext|>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<pad>", unk_token="<unk>")
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=2,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger weights than GPT-2's init: clearly different likelihoods per response
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.eval()
    if folder is not None:
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
    return model, tok


def _by_hand(model, tok, prompt, response, eos=False):
    """Sum and count of log p(response token | everything before it), one unpadded sequence at a time."""
    p = [tok.bos_token_id] + [tok.convert_tokens_to_ids(w) for w in prompt.split()]
    r = [tok.convert_tokens_to_ids(w) for w in response.split()] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = logits.log_softmax(-1)
    total = sum(float(lp[t - 1, ids[0, t]]) for t in range(len(p), len(p) + len(r)))
    return total, len(r)


DATA = [
    {"prompt": "the cat", "responses": ["sat on the mat", "ran", "is red and big", "dog dog dog"]},
    {"prompt": "a dog was", "responses": ["small", "blue then fast", "under the rug slowly"]},
    {"prompt": "then", "responses": ["the cat sat"]},
]


@pytest.mark.parametrize("normalize", ["mean", "sum"])
@pytest.mark.parametrize("eos", [False, True])
def test_log_likelihood_matches_a_hand_computation(normalize, eos):
    model, tok = _tiny_lm()
    prompts = [d["prompt"] for d in DATA for _ in d["responses"]]
    responses = [r for d in DATA for r in d["responses"]]
    stats = {}
    got = response_logprobs(model, tok, prompts, responses, normalize=normalize, eos=eos, batch_size=3, stats=stats)
    for p, r, g in zip(prompts, responses, got):
        total, n = _by_hand(model, tok, p, r, eos)
        assert g == pytest.approx(total / n if normalize == "mean" else total, abs=1e-4)
    assert stats["scoring_forward_rows"] == len(responses)
    assert stats["scored_tokens"] == sum(len(r.split()) + eos for r in responses)


def test_grape_keeps_the_most_likely_response_per_prompt():
    model, tok = _tiny_lm()
    res = grape_select(DATA, model, tok)
    assert [r["prompt"] for r in res.rows] == ["the cat", "a dog was", "then"]
    for d, row in zip(DATA, res.rows):
        hand = [(lambda t, n: t / n)(*_by_hand(model, tok, d["prompt"], r)) for r in d["responses"]]
        best = max(range(len(hand)), key=hand.__getitem__)
        assert row["chosen"] == best and row["response"] == d["responses"][best]
        assert row["scores"] == pytest.approx(hand, abs=1e-4) and row["candidates"] == len(hand)
    assert res.stats["prompts"] == 3 and res.stats["candidates"] == 8 and res.stats["scoring_forward_rows"] == 8
    assert res.stats["select_seconds"] > 0
    total = grape_select(DATA, model, tok, normalize="sum")  # the total log-likelihood
    for d, row in zip(DATA, total.rows):
        hand = [_by_hand(model, tok, d["prompt"], r)[0] for r in d["responses"]]
        assert row["chosen"] == max(range(len(hand)), key=hand.__getitem__)


def test_a_plain_callable_scorer_and_ties():
    res = grape_select(DATA, scorer=lambda ps, rs: [-len(r) for r in rs])  # the shortest response
    assert [r["response"] for r in res.rows] == ["ran", "small", "the cat sat"]
    tie = grape_select({"q": ["x", "y", "z"]}, scorer=lambda ps, rs: [1.0] * len(rs))
    assert tie.rows[0]["chosen"] == 0  # the first of equal maxima
    with pytest.raises(AttarError, match="2 scores for 3"):
        grape_select({"q": ["x", "y", "z"]}, scorer=lambda ps, rs: [1.0, 2.0])
    with pytest.raises(AttarError, match="either a model"):
        grape_select(DATA)


def test_data_formats_long_wide_and_numbered(tmp_path):
    long = [{"prompt": d["prompt"], "response": r} for d in DATA for r in d["responses"]]
    assert group_candidates(long) == DATA
    j = tmp_path / "wide.jsonl"
    j.write_text("".join(json.dumps(d) + "\n" for d in DATA))
    assert read_candidates(j) == DATA
    c = tmp_path / "long.csv"
    with c.open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response"])
        w.writeheader()
        w.writerows(long)
    assert read_candidates(c) == DATA
    c2 = tmp_path / "wide.csv"
    with c2.open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "responses"])
        w.writeheader()
        w.writerows({"prompt": d["prompt"], "responses": json.dumps(d["responses"])} for d in DATA)
    assert read_candidates(c2) == DATA
    c3 = tmp_path / "numbered.csv"
    with c3.open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response_1", "response_2", "response_3", "response_4"])
        w.writeheader()
        w.writerows({"prompt": d["prompt"], **{f"response_{i + 1}": r for i, r in enumerate(d["responses"])}}
                    for d in DATA)
    assert read_candidates(c3) == DATA
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    assert read_candidates(q, prompt_column="instruction", response_column="output") == [
        {"prompt": "hi", "responses": ["yo"]}]
    with pytest.raises(AttarError, match="no text column 'prompt'"):
        read_candidates(q)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(AttarError, match="unknown format"):
        read_candidates(tmp_path / "x.txt")


def test_truncation_keeps_the_response_start_and_counts_it():
    model, tok = _tiny_lm()
    stats = {}
    full = response_logprobs(model, tok, ["the cat sat on the mat"], ["is red"], stats=stats)
    cut = response_logprobs(model, tok, ["the cat sat on the mat"], ["is red"], max_length=4, stats=stats)
    assert stats["truncated"] == 1 and math.isfinite(cut[0]) and cut[0] != pytest.approx(full[0])
    assert response_logprobs(model, tok, ["the cat"], [""], stats=stats) == [-math.inf]


def test_cli_command_on_a_model_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from attar.cli.select import app

    model, tok = _tiny_lm(tmp_path / "lm")
    data = tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DATA))
    out = tmp_path / "kept.csv"
    r = CliRunner().invoke(app, ["grape", str(data), "--model", str(tmp_path / "lm"), "--out", str(out),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    want = grape_select(DATA, model, tok)
    assert [(x["prompt"], x["response"]) for x in rows] == list(zip(*want.pairs()))
    bad = CliRunner().invoke(app, ["grape", str(data), "--model", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and "config.json" in bad.output
    assert isinstance(app, typer.Typer)
    from attar.cli import app as attar_app

    listing = CliRunner().invoke(attar_app, ["methods", "selectors"])
    assert listing.exit_code == 0 and "disagreement" in listing.output


def test_chat_template_wraps_the_prompt():
    model, tok = _tiny_lm()
    tok.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} then{% endif %}")
    wrapped = response_logprobs(model, tok, ["the cat"], ["sat on the mat"], chat_template=True)
    plain = response_logprobs(model, tok, ["the cat then"], ["sat on the mat"])
    assert wrapped == pytest.approx(plain, abs=1e-6)
    tok.chat_template = None
    with pytest.raises(AttarError, match="no chat template"):
        response_logprobs(model, tok, ["the cat"], ["sat"], chat_template=True)
