"""The ``lm`` recipe stage: train a byte-level teacher and distil it into a smaller student with `attar run`,
resume a killed LM run to identical weights, and refuse mistakes with the field named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import load_recipe

WORDS = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]


def _corpus(path: Path, n: int = 240) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        w = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=g)]
        lines.append(f"the {w[0]} and the {w[1]} went to the {w[2]}, said {w[3]} number {i}, to {w[4]} {w[5]}.")
    path.write_text("\n".join(lines))
    return path


def _recipe(tmp_path: Path, teacher_steps: int = 30, ckpt: int = 0) -> Path:
    corpus = _corpus(tmp_path / "corpus.txt")
    r = tmp_path / "lm.yaml"
    r.write_text(f"""\
name: lm-test
seed: 1
stages:
  - name: teacher
    kind: lm
    lm:
      student: {{byte: {{layers: 1, d_model: 48, heads: 2, context: 96}}}}
      data: {{name: {corpus}, max_len: 80}}
      train: {{steps: {teacher_steps}, batch_size: 16, lr: 0.005, eval_every: 10, checkpoint_every: {ckpt}}}
  - name: student
    kind: lm
    lm:
      student: {{byte: {{layers: 1, d_model: 16, heads: 2, context: 96}}}}
      teacher: {{stage: teacher}}
      data: {{name: {corpus}, max_len: 80}}
      train: {{steps: 20, batch_size: 16, lr: 0.005, eval_every: 10, alpha: 0.5}}
      cache_topk: 8
""")
    return r


def _run_stages(tmp_path: Path, *stages: dict) -> Path:
    """Run ``lm`` stages (name, then the ``lm:`` block; ``data`` defaults to the test corpus) as one recipe."""
    import yaml

    corpus = str(_corpus(tmp_path / "corpus.txt"))
    recipe = {"name": "lm-test", "stages": [{"name": name, "kind": "lm", "lm": {"data": {"name": corpus, "max_len": 80}} | lm}
                                            for name, lm in stages]}
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe))
    return Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None).run()


def _byte(layers: int, d_model: int) -> dict:
    return {"byte": {"layers": layers, "d_model": d_model, "heads": 2, "context": 96}}


def test_lm_recipe_trains_a_teacher_and_distils_a_student(tmp_path):
    recipe, text = load_recipe(_recipe(tmp_path))
    run = Pipeline(recipe, text, home=tmp_path / "home", log=lambda *a, **k: None).run()
    rows = {s: json.loads((run / s / "lm-metrics.json").read_text())["metrics"] for s in ("teacher", "student")}
    assert rows["teacher"]["test_ppl"] < 258 and rows["student"]["test_ppl"] < 258  # better than uniform bytes
    assert rows["student"]["teacher_test_ppl"] == pytest.approx(rows["teacher"]["test_ppl"])
    assert 0 <= rows["student"]["top1_agreement"] <= 1 and rows["student"]["kl_to_teacher"] >= 0
    for stage in ("teacher", "student"):
        assert (run / stage / "model" / "config.json").exists()
    assert (run / "student" / "teacher-cache.safetensors").exists()
    assert "test_ppl" in (run / "report.md").read_text()


@pytest.mark.parametrize("block,field", [
    ("lm: {student: {byte: {layers: 1}}, train: {alpha: 0.5}}", "no teacher"),
    ("lm: {student: {pretrained: gpt-17}}", "gpt-17"),
    ("lm: {student: {byte: {layers: 1}, hf: x}}", "exactly one of"),
    ("lm: {student: {byte: {layers: 1}}, data: {name: nowhere.txt}}", "no such file"),
    ("lm: {student: {byte: {layers: 2}, prune: {mlp: 8}}}", "width pruning needs"),
    ("lm: {student: {byte: {layers: 2}, prune: {}}}", "at least one of layers"),
    ("lm: {student: {byte: {layers: 1}}, responses: teacher}", "needs lm.teacher"),
])
def test_lm_stage_mistakes_are_refused_before_any_work(tmp_path, block, field):
    r = tmp_path / "bad.yaml"
    r.write_text(f"name: bad\nstages:\n  - name: s\n    kind: lm\n    {block}\n")
    with pytest.raises((AttarError, ValueError), match=field):
        Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None).run()
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").glob("*/s/model"))


ENV = {**os.environ, "CI": "true", "ATTAR_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_of_an_lm_run_then_resume_matches_uninterrupted(tmp_path):
    recipe = _recipe(tmp_path, teacher_steps=400, ckpt=10)
    cmd = lambda home, *a: [sys.executable, "-m", "attar.cli", "run", *a, "--home", str(home)]  # noqa: E731
    subprocess.run(cmd(tmp_path / "ref", str(recipe)), check=True, env=ENV, capture_output=True)
    home = tmp_path / "killed"
    proc = subprocess.Popen(cmd(home, str(recipe)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, deadline = False, time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.parent.name.split("-")[1]) >= 30 for p in home.glob("*/teacher/checkpoints/step-*/manifest.json")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before it could be killed; the test needs a longer run"
    run_dir = next(p for p in home.iterdir() if (p / "run.json").exists())
    res = subprocess.run(cmd(home, "--resume", str(run_dir)), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ref_dir = next(p for p in (tmp_path / "ref").iterdir() if (p / "run.json").exists())
    for stage in ("teacher", "student"):
        a = load_file(ref_dir / stage / "model" / "model.safetensors")
        b = load_file(run_dir / stage / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


def test_prune_then_recover_by_distillation_from_the_unpruned_model(tmp_path):
    run = _run_stages(tmp_path,
                      ("full", {"student": _byte(3, 48), "train": {"steps": 40, "batch_size": 16, "lr": 0.005,
                                                                    "eval_every": 20}}),
                      ("pruned", {"student": {"stage": "full", "prune": {"layers": 1}}, "teacher": {"stage": "full"},
                                  "train": {"steps": 30, "batch_size": 16, "lr": 0.005, "eval_every": 10, "alpha": 0.0}}))
    m = json.loads((run / "pruned" / "lm-metrics.json").read_text())["metrics"]
    assert m["layers"] == "3->1" and m["test_ppl"] < m["pruned_ppl"]
    from attar.text.charlm import load_causal_lm
    from attar.text.lm_prune import decoder_layers

    assert len(decoder_layers(load_causal_lm(run / "pruned" / "model")[0])) == 1


def test_width_pruning_of_an_hf_llama_then_recovery_records_the_shape(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from attar.text.charlm import byte_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
                     ).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    run = _run_stages(tmp_path, ("pruned", {"student": {"hf": str(folder), "prune": {"mlp": 24, "kv_heads": 1}},
                                            "teacher": {"hf": str(folder)},
                                            "train": {"steps": 6, "batch_size": 8, "lr": 0.005, "alpha": 0.5}}))
    m = json.loads((run / "pruned" / "lm-metrics.json").read_text())["metrics"]
    assert (m["layers"], m["mlp"], m["kv_heads"]) == ("2->2", "64->24", "2->1") and m["pruned_ppl"] > 0
    cfg = AutoModelForCausalLM.from_pretrained(run / "pruned" / "model").config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (24, 2, 1, 8)


def test_self_data_distillation_trains_on_the_unpruned_models_own_responses(tmp_path):
    """responses: teacher: each training prompt is continued once by the teacher (here the unpruned model of a
    pruned student: self-data distillation); the student trains with CE on those, and a resume reuses them."""
    from safetensors.torch import load_file

    run = _run_stages(tmp_path,
                      ("full", {"student": _byte(2, 32), "train": {"steps": 30, "batch_size": 16, "lr": 0.005}}),
                      ("self", {"student": {"stage": "full", "prune": {"layers": 1}}, "teacher": {"stage": "full"},
                                "responses": "teacher", "train": {"steps": 10, "batch_size": 16, "lr": 0.005}}))
    gen = load_file(str(run / "self" / "teacher-responses.safetensors"))
    m = json.loads((run / "self" / "lm-metrics.json").read_text())["metrics"]
    assert m["test_ppl"] > 0 and m["steps"] == 10 and m["layers"] == "2->1"
    from attar.text.charlm import byte_tokenizer
    from attar.text.lm_io import lm_dataset

    data = lm_dataset(str(tmp_path / "corpus.txt"), byte_tokenizer(), None, text_column=None, prompt_len=16, max_len=80,
                      seed=0, train_limit=None, val_limit=None, test_limit=None)
    n = len(data.train)
    assert gen["ids"].shape[0] == n and torch.equal(gen["prompt_len"], data.train.prompt_len)
    p = int(data.train.prompt_len[0])
    assert torch.equal(gen["ids"][:, :p], data.train.ids[:, :p])  # same prompts ...
    assert not torch.equal(gen["ids"], data.train.ids[:, : gen["ids"].shape[1]])  # ... the teacher's own responses


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT on GPT-2's Conv1D: it sets fan_in_fan_out itself
def test_lora_on_a_causal_lm_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    from attar.text.charlm import load_causal_lm

    run = _run_stages(tmp_path,
                      ("base", {"student": _byte(1, 32), "train": {"steps": 10, "batch_size": 16, "lr": 0.005,
                                                                   "eval_every": 10}}),
                      ("tuned", {"student": {"stage": "base", "lora": {"rank": 4, "alpha": 8}},
                                 "train": {"steps": 15, "batch_size": 16, "lr": 0.01, "eval_every": 15}}))
    m = json.loads((run / "tuned" / "lm-metrics.json").read_text())["metrics"]
    assert 0 < m["trainable"] < m["params"] / 5
    base, _ = load_causal_lm(run / "base" / "model")
    merged, _ = load_causal_lm(run / "tuned" / "model")
    adapted = PeftModel.from_pretrained(base, run / "tuned" / "adapter").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)
        fresh, _ = load_causal_lm(run / "base" / "model")  # the adapter changed the model
        assert not torch.allclose(fresh.eval()(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_sft_rows_train_on_the_response_only_with_a_chat_template(tmp_path):
    from attar.text.charlm import byte_tokenizer, lm_pairs

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    split = lm_pairs(["hi"], ["yo"], tok, max_len=40, chat_template=True)
    n_prompt = len("<user>hi<assistant>")
    assert int(split.prompt_len[0]) == n_prompt
    assert tok.decode(split.ids[0][:n_prompt]) == "<user>hi<assistant>"
    assert split.mask[0].nonzero().flatten().tolist() == [n_prompt, n_prompt + 1, n_prompt + 2]  # "y", "o", EOS
    with pytest.raises(AttarError, match="has no chat template"):
        lm_pairs(["hi"], ["yo"], byte_tokenizer(), chat_template=True)

    rows = tmp_path / "sft.jsonl"
    rows.write_text("\n".join(json.dumps({"q": f"what is {w}?", "a": f"{w} is a word."}) for w in WORDS * 4))
    r = tmp_path / "sft.yaml"
    block = f"data: {{name: {rows}, prompt_field: q, response_field: a, max_len: 48}}"
    r.write_text(f"name: sft\nstages:\n  - name: s\n    kind: lm\n    lm:\n      student: {{byte: {{layers: 1, d_model: 16, "
                 f"heads: 2, context: 64}}}}\n      {block}\n      train: {{steps: 4, batch_size: 8, eval_every: 4}}\n")
    run = Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: None).run()
    assert json.loads((run / "s" / "lm-metrics.json").read_text())["metrics"]["test_ppl"] > 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": "y"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    r.write_text(r.read_text().replace(str(rows), str(bad)))
    with pytest.raises(AttarError, match="line 2: no field 'a'"):
        Pipeline(*load_recipe(r), home=tmp_path / "home2", log=lambda *a, **k: None).run()


def test_packed_text_fills_every_row_and_keeps_test_texts_apart(tmp_path):
    from attar.text.charlm import byte_tokenizer, lm_packed, lm_packed_data

    tok = byte_tokenizer()
    split = lm_packed(["abc", "de"], tok, block=4)  # [BOS] a b c [EOS] [BOS] d e [EOS] -> 9 tokens, 2 rows of 4
    assert split.ids.tolist() == [[tok.bos_token_id, 97, 98, 99], [tok.eos_token_id, tok.bos_token_id, 100, 101]]
    assert split.mask[:, 0].tolist() == [False, False] and bool(split.mask[:, 1:].all())
    texts = [f"text number {i} says {WORDS[i % len(WORDS)]}" for i in range(60)]
    a = lm_packed_data(texts, tok, max_len=32, seed=0)
    b = lm_packed_data(texts, tok, max_len=32, seed=1)  # a text's split is a hash of its content, the same for every seed
    assert len(a.test) > 0 and torch.equal(a.test.ids, b.test.ids) and torch.equal(a.train.ids, b.train.ids)
    test_text = tok.decode(a.test.ids.flatten())
    assert not any(t in test_text for t in (tok.decode(r) for r in a.train.ids))  # no block shared across splits
    run = _run_stages(tmp_path, ("s", {"student": _byte(1, 16), "data": {"name": str(_corpus(tmp_path / "c.txt")),
                                                                         "pack": True, "max_len": 48},
                                       "train": {"steps": 3, "batch_size": 4, "eval_every": 3}}))
    assert json.loads((run / "s" / "lm-metrics.json").read_text())["metrics"]["test_ppl"] > 1


def test_mezo_trains_a_causal_lm_with_forward_passes_only(tmp_path):
    run = _run_stages(tmp_path, ("m", {"student": _byte(1, 16), "optimizer": "mezo", "mezo_eps": 1e-3,
                                       "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "eval_every": 3}}))
    saved = json.loads((run / "m" / "lm-metrics.json").read_text())
    assert saved["metrics"]["steps"] == 6 and len(saved["history"]) == 2
    r = tmp_path / "bad.yaml"
    r.write_text("name: b\nstages:\n  - name: s\n    kind: lm\n    lm: {student: {byte: {layers: 1}}, teacher: {byte: "
                 "{layers: 1}}, optimizer: mezo, train: {alpha: 0.5}}\n")
    with pytest.raises(AttarError, match="mezo trains with next-token CE only"):
        Pipeline(*load_recipe(r), home=tmp_path / "home2", log=lambda *a, **k: None).run()
