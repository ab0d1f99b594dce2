"""``attar lm`` as a user runs it: new -> train -> distill -> eval on tiny byte-level GPT-2s, the documented
commands, and the refusals (vocabulary mismatch, unknown divergence, bad --set, occupied --out, ...)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attar.cli import app
from attar.distill.lm import perplexity
from attar.text.charlm import byte_tokenizer, lm_data, save_causal_lm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "lm.md"

TEXTS = [f"{w} is the {a} of {b}; so it goes, said {n}." for w, a, b, n in
         zip(["Time", "Love", "Code", "Rain", "Salt", "Wind", "Fire", "Snow"] * 8,
             ["friend", "enemy", "mother", "end", "root", "cost", "art", "sum"] * 8,
             ["all", "most", "none", "some", "many", "few", "each", "any"] * 8,
             [f"N{i}" for i in range(64)])]
LIMITS = {"prompt_len": 8, "train_limit": 32, "val_limit": 8, "test_limit": 8}
TINY = ["--layers", "1", "--heads", "2", "--context", "48"]
FAST = ["--steps", "6", "--batch-size", "8", "--eval-every", "3", "--warmup-steps", "2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args) -> object:
    res = runner.invoke(app, ["lm", *map(str, args)], env={"CI": "true"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def _flat(res) -> str:
    return " ".join(res.output.split())


def _data_args(txt: Path) -> list[str]:
    return ["--data", str(txt), *(x for k, v in LIMITS.items() for x in (f"--{k.replace('_', '-')}", str(v)))]


def _ppl(folder: Path) -> float:
    """Test perplexity of a saved folder, recomputed independently of the CLI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    data = lm_data(TEXTS, tok, max_len=48, seed=0, **LIMITS)
    return perplexity(model, data.test, data.pad_id)


def _no_partial(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_cli")
    (d / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return d


@pytest.fixture(scope="module")
def teacher(work):
    """`attar lm new` then `attar lm train`: the teacher every other test distills from."""
    r = _cli("new", work / "t0", *TINY, "--d-model", "32")
    assert r.exit_code == 0, r.output
    r = _cli("train", work / "t0", *_data_args(work / "texts.txt"), *FAST, "--steps", "10", "--out", work / "teacher")
    assert r.exit_code == 0, r.output
    return work / "teacher"


@pytest.fixture(scope="module")
def student(work):
    r = _cli("new", work / "s0", *TINY, "--d-model", "16", "--seed", "1")
    assert r.exit_code == 0, r.output
    return work / "s0"


def test_new_and_train_write_hf_folders(work, teacher):
    from transformers import AutoModelForCausalLM

    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (work / "t0" / f).is_file() and (teacher / f).is_file()
    m = AutoModelForCausalLM.from_pretrained(str(teacher))
    assert m.config.n_layer == 1 and m.config.n_embd == 32 and m.config.vocab_size == 258
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["seconds"] > 0 and metrics["history"]
    assert metrics["test_ppl"] == pytest.approx(_ppl(teacher), rel=1e-6)
    assert metrics["test_ppl"] < 258  # better than uniform after 10 steps
    assert metrics["data"]["sizes"] == {"train": 32, "val": 6, "test": 6}
    _no_partial(work)


def test_distill_token_kd_then_eval(work, teacher, student):
    from transformers import AutoModelForCausalLM

    out = work / "kd"
    r = _cli("distill", "--teacher", teacher, "--student", student, *_data_args(work / "texts.txt"), *FAST,
             "--divergence", "gjsd", "--set", "beta=0.5", "--on-policy", "0.5", "--cache-topk", "16", "--out", out)
    assert r.exit_code == 0, r.output
    assert "student test perplexity" in _flat(r)
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.n_embd == 16
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "token-kd" and m["steps"] == 6
    assert m["student_test_ppl"] == pytest.approx(_ppl(out), rel=1e-6)
    assert m["teacher_test_ppl"] == pytest.approx(_ppl(teacher), rel=1e-6)
    assert m["teacher_hacking_suspected"] is False and m["on_policy_rows"] > 0
    assert m["config"]["divergence"] == "gjsd" and m["config"]["divergence_args"] == {"beta": 0.5}
    assert "cached top-16" in m["teacher_signal"]
    assert [h["step"] for h in m["history"]] == [3, 6] and "teacher_nll_of_samples" in m["history"][-1]

    r = _cli("eval", out, *_data_args(work / "texts.txt"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["perplexity"] == pytest.approx(m["student_test_ppl"], rel=1e-9)
    r = _cli("eval", out, *_data_args(work / "texts.txt"))
    assert r.exit_code == 0 and f"test perplexity {m['student_test_ppl']:.3f}" in r.output


def test_seq_kd_runs(work, teacher, student):
    out = work / "seqkd"
    r = _cli("distill", "--teacher", teacher, "--student", student, *_data_args(work / "texts.txt"), *FAST,
             "--seq-kd", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "sequence-kd" and "sequence-level" in m["teacher_signal"]
    assert m["student_test_ppl"] == pytest.approx(_ppl(out), rel=1e-6)
    r = _cli("distill", "--teacher", teacher, "--student", student, *_data_args(work / "texts.txt"), "--seq-kd",
             "--divergence", "kl", "--out", work / "seqkd2")
    assert r.exit_code == 2 and "--divergence only apply to token-level KD" in _flat(r)


def test_vocab_mismatch_refused_before_anything(work, teacher):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(42)])
    assert len(tok) == 300
    save_causal_lm(GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=48, n_embd=16, n_layer=1, n_head=2)), tok,
                   work / "s300")
    out = work / "mismatch"
    r = _cli("distill", "--teacher", teacher, "--student", work / "s300", *_data_args(work / "texts.txt"), *FAST,
             "--out", out)
    assert r.exit_code == 2
    msg = _flat(r)
    assert "vocabulary mismatch" in msg and "258" in msg and "300" in msg
    assert not out.exists()
    _no_partial(work)


def test_unknown_divergence_lists_known(work, teacher, student):
    out = work / "nope"
    r = _cli("distill", "--teacher", teacher, "--student", student, *_data_args(work / "texts.txt"),
             "--divergence", "wasserstein9", "--out", out)
    assert r.exit_code == 2
    msg = _flat(r)
    assert "unknown divergence 'wasserstein9'" in msg and all(n in msg for n in ("kl", "reverse_kl", "gjsd", "tvd"))
    assert not out.exists()


def test_bad_inputs_are_one_paragraph_errors(work, teacher, student):
    from transformers import ViTConfig

    data = _data_args(work / "texts.txt")
    base = ["distill", "--teacher", teacher, "--student", student, *data]
    cases = [
        (["eval", work / "missing", *data], "does not exist"),
        (["eval", work / "empty", *data], "no config.json"),
        (["eval", work / "vit", *data], "not a causal language model"),
        ([*base, "--set", "beta", "--divergence", "gjsd", "--out", work / "x"], "expected NAME=VALUE"),
        ([*base, "--divergence", "gjsd", "--set", "gamma=1", "--out", work / "x"], "does not accept"),
        ([*base, "--on-policy", "0.9", "--out", work / "x"], "min_ground_truth"),
        ([*base, "--cache-file", work / "c.safetensors", "--out", work / "x"], "--cache-file needs --cache-topk"),
        ([*base, "--max-len", "64", "--out", work / "x"], "longer than the model's context of 48"),
        ([*base, "--out", teacher], "already exists and is not empty"),
        ([*base, "--out", teacher / "metrics.json" / "sub"], "which is a file"),  # --out under a file
        (["eval", teacher, "--data", work / "nothing.txt"], "no such file"),
        (["eval", teacher, "--data", "texts.json"], "neither a built-in text set"),
    ]
    (work / "empty").mkdir(exist_ok=True)
    ViTConfig().save_pretrained(str(work / "vit"))
    for args, expected in cases:
        r = _cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert expected in _flat(r), (args, r.output)
        assert "Traceback" not in r.output
    assert not (work / "x").exists()
    assert (teacher / "metrics.json").is_file()  # the refused --out was left alone


def test_csv_data_with_text_column(work, student):
    csv = work / "texts.csv"
    pd.DataFrame({"id": range(len(TEXTS)), "body": TEXTS}).to_csv(csv, index=False)
    args = ["--prompt-len", "8", "--train-limit", "32", "--test-limit", "8"]
    r = _cli("eval", student, "--data", csv, *args)
    assert r.exit_code == 2 and "no text column 'text'" in _flat(r) and "'body'" in _flat(r)
    r = _cli("eval", student, "--data", csv, "--text-column", "body", *args, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    r = _cli("eval", student, *_data_args(work / "texts.txt"), "--json")
    assert got["perplexity"] == pytest.approx(json.loads(r.output.strip().splitlines()[-1])["perplexity"], rel=1e-9)


def test_overwrite_and_no_partial_output_on_failure(work, student, monkeypatch):
    out = work / "fresh"
    assert _cli("new", out, *TINY, "--d-model", "16").exit_code == 0
    (out / "marker").write_text("old")
    r = _cli("new", out, *TINY, "--d-model", "16")
    assert r.exit_code == 2 and "--overwrite" in _flat(r) and (out / "marker").exists()
    r = _cli("new", out, *TINY, "--d-model", "16", "--overwrite")
    assert r.exit_code == 0 and not (out / "marker").exists() and (out / "config.json").is_file()

    import attar.text.charlm as charlm

    real = charlm.save_causal_lm

    def broken(model, tok, folder):
        real(model, tok, folder)
        raise charlm.AttarError("disk full (simulated)")

    monkeypatch.setattr(charlm, "save_causal_lm", broken)
    r = _cli("train", student, *_data_args(work / "texts.txt"), *FAST, "--steps", "2", "--out", work / "broken")
    assert r.exit_code == 2 and "disk full" in r.output
    assert not (work / "broken").exists()
    _no_partial(work)


def _doc_commands() -> list[list[str]]:
    text = DOCS.read_text()
    section = text.split("### From the command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_documented_commands_run(tmp_path, monkeypatch):
    """The exact commands of docs/lm.md, shrunk by options appended at the end (the last value wins)."""
    cmds = _doc_commands()
    assert [c[:3] for c in cmds] == [["attar", "lm", "new"], ["attar", "lm", "train"], ["attar", "lm", "new"],
                                     ["attar", "lm", "distill"], ["attar", "lm", "distill"], ["attar", "lm", "eval"]]
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    monkeypatch.chdir(tmp_path)
    shrink = {"new": [*TINY, "--d-model", "16"], "train": [*_data_args(Path("texts.txt")), *FAST],
              "distill": [*_data_args(Path("texts.txt")), *FAST], "eval": _data_args(Path("texts.txt"))}
    for c in cmds:
        r = _cli(*c[2:], *shrink[c[2]])
        assert r.exit_code == 0, (c, r.output)
    for f in ("out/teacher-trained", "out/student-gjsd", "out/student-seqkd"):
        assert (tmp_path / f / "metrics.json").is_file()
