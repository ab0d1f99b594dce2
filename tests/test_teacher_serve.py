"""A served teacher (attar.distill.lm_served, `attar teacher serve`, the lm stage's ``teacher: {url}``), end to end
against servers started here on 127.0.0.1: served top-k equal to the live teacher's, KD from the server equal to KD
from the live teacher or an in-process top-k cache, the OpenAI-compatible prompt_logprobs shape, a server that dies
mid-run (clear error, checkpoint, resume to the weights of an uninterrupted run), and bad answers refused."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attar.distill import lm_served
from attar.distill.lm import distill_lm
from attar.distill.lm_objectives import LMTeacherCache, TopK, ids_hash, token_kd_loss
from attar.distill.lm_serve import TeacherServer, serve_model
from attar.distill.lm_served import ServedLMTeacher, parse_attar, parse_openai
from attar.errors import AttarError
from attar.text.charlm import BYTE_VOCAB, byte_tokenizer, lm_data, make_byte_lm
from attar.text.token_store import tokenizer_fingerprint
from attar.train.trainer import InputUnavailable

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

SMOL = Path(__file__).resolve().parents[1] / "runs" / "models" / "smollm2-135m"
WORDS = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]


def _texts(n: int = 64) -> list[str]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        w = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (4,), generator=g)]
        out.append(f"the {w[0]} and the {w[1]} went to the {w[2]}, said {w[3]} number {i}.")
    return out


class Served:
    """A TeacherServer on a thread; ``stop()`` shuts it and closes its port."""

    def __init__(self, server: TeacherServer):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _serve(model, tok, port: int = 0, **kw) -> Served:
    return Served(TeacherServer(model, vocab_size=len(tok), tokenizer=tokenizer_fingerprint(tok), name="test",
                                port=port, pad_id=tok.pad_token_id or 0, **kw))


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(lm_served, "DEFAULT_RETRIES", 1)
    monkeypatch.setattr(lm_served, "DEFAULT_BACKOFF", 0.01)


@pytest.fixture(scope="module")
def byte_setup():
    torch.manual_seed(0)
    teacher = make_byte_lm(layers=1, d_model=32, heads=2, context=64).eval()
    data = lm_data(_texts(), byte_tokenizer(), prompt_len=8, max_len=48, val_fraction=0.15, test_fraction=0.15, seed=0)
    served = _serve(teacher, byte_tokenizer(), max_topk=BYTE_VOCAB)
    yield teacher, data, served
    served.stop()


@pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="runs/models/smollm2-135m is not present")
def test_served_topk_equals_the_live_teachers_for_a_tiny_llama_with_the_smollm2_tokenizer():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(SMOL))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128)).eval()
    data = lm_data(_texts(24), tok, prompt_len=4, max_len=32, val_fraction=0.2, test_fraction=0.2, seed=0)
    served = _serve(teacher, tok, max_topk=16)
    try:
        rows, k = torch.arange(6), 8
        part = data.train.rows(rows)
        width = part.ids.shape[1]
        with torch.no_grad():
            z = teacher(input_ids=part.ids, attention_mask=(part.ids != data.pad_id).long()).logits
        live = TopK.from_logits(z, k)
        pos = torch.cat([part.mask[:, 1:], torch.zeros(len(rows), 1, dtype=torch.bool)], 1)  # scored positions
        assert int(pos.sum()) > 50
        for protocol in ("attar", "openai"):
            client = ServedLMTeacher(served.url, k=k, protocol=protocol, vocab_size=len(tok)).bind(data.train,
                                                                                                   data.pad_id)
            got = client.get(rows, width)
            assert client.protocol == protocol and got.vocab_size == len(tok)
            assert torch.equal(got.index[pos], live.index[pos]), protocol
            assert (got.values[pos] - live.values[pos]).abs().max() < 1e-6, protocol
            # attar: the log tail as the server computed it; openai: log(1 - sum exp(top-k)) from the k log-probs
            assert (got.rest[pos] - live.rest[pos]).abs().max() < (1e-6 if protocol == "attar" else 1e-5), protocol
        info = ServedLMTeacher(served.url, k=k).info
        assert info["vocab_size"] == len(tok) == 49152 and info["tokenizer"] == tokenizer_fingerprint(tok)
    finally:
        served.stop()


def _weights_after(steps, data, teacher=None, cache=None):
    torch.manual_seed(2)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    res = distill_lm(student, data, teacher, dict(steps=steps, batch_size=8, eval_every=100, lr=3e-3, warmup_steps=0),
                     cache=cache, progress=False)
    return res.model.state_dict()


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all((a[n] - b[n]).abs().max() <= tol for n in a)


def test_kd_from_the_server_equals_kd_from_the_live_teacher_and_from_an_in_process_topk(byte_setup):
    teacher, data, served = byte_setup
    torch.manual_seed(1)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64).eval()
    rows = torch.arange(8)
    part = data.train.rows(rows)
    attn = (part.ids != data.pad_id).long()
    with torch.no_grad():
        s = student(input_ids=part.ids, attention_mask=attn).logits
        t = teacher(input_ids=part.ids, attention_mask=attn).logits
    # k = V: the top-k + tail bucket loss is the full one, so the served teacher gives the live teacher's loss
    full = ServedLMTeacher(served.url, k=BYTE_VOCAB).bind(data.train, data.pad_id)
    live = float(token_kd_loss(s, t, part.mask))
    assert abs(float(token_kd_loss(s, full.get(rows, data.train.width), part.mask)) - live) < 1e-5
    # k = 8: the served top-8 gives the loss of the same top-8 made in process (float32, no rounding)
    tk = TopK.from_logits(torch.cat([teacher(input_ids=data.train.ids[i : i + 16],
                                             attention_mask=(data.train.ids[i : i + 16] != data.pad_id).long()
                                             ).logits.detach() for i in range(0, len(data.train), 16)]), 8)
    local = LMTeacherCache(tk.values, tk.index, tk.rest, BYTE_VOCAB, 1.0, data_hash=ids_hash(data.train))
    k8 = ServedLMTeacher(served.url, k=8).bind(data.train, data.pad_id)
    loss8 = float(token_kd_loss(s, k8.get(rows, data.train.width), part.mask))
    assert abs(loss8 - float(token_kd_loss(s, local.get(rows), part.mask))) < 1e-5 and abs(loss8 - live) > 1e-3
    # training: the same runs, step for step
    full.requests = 0
    assert _close(_weights_after(3, data, teacher=teacher), _weights_after(3, data, cache=full))
    assert full.requests == 3  # one request per step: 8 rows fit one
    assert _close(_weights_after(3, data, cache=local), _weights_after(3, data, cache=k8))


def test_batching_splits_rows_over_requests_and_the_result_does_not_depend_on_it(byte_setup):
    _, data, served = byte_setup
    rows = torch.arange(10)
    one = ServedLMTeacher(served.url, k=4, rows_per_request=16).bind(data.train, data.pad_id)
    three = ServedLMTeacher(served.url, k=4, rows_per_request=4).bind(data.train, data.pad_id)
    a, b = one.get(rows, data.train.width), three.get(rows, data.train.width)
    assert (one.requests, three.requests) == (1, 3)
    assert torch.equal(a.index, b.index) and (a.values - b.values).abs().max() < 1e-6


def _openai_answer(prompts: list[list[int]], k: int, lp: dict[int, list[tuple[int, float]]]) -> dict:
    """A canned vLLM /v1/completions answer: prompt_logprobs per token, the first null, each entry's dict keyed by
    the token id as a string; the prompt's own token added (rank > k) when it is not among the top k."""
    choices = []
    for i, p in enumerate(prompts):
        entries: list = [None]
        for t in range(1, len(p)):
            top = lp[t]
            d = {str(j): {"logprob": v, "rank": n + 1, "decoded_token": f"<{j}>"} for n, (j, v) in enumerate(top[:k])}
            if str(p[t]) not in d:
                d[str(p[t])] = {"logprob": -20.0, "rank": 900, "decoded_token": f"<{p[t]}>"}
            entries.append(d)
        choices.append({"index": i, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                        "prompt_logprobs": entries})
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": choices[::-1],
            "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}}


def test_the_openai_prompt_logprobs_shape_is_parsed_from_a_canned_answer():
    lp = {1: [(5, math.log(0.5)), (7, math.log(0.25)), (2, math.log(0.125))],
          2: [(3, math.log(0.9)), (4, math.log(0.05)), (5, math.log(0.01))]}
    prompts = [[1, 5, 9], [1, 3, 4]]
    (v0, j0, r0), (v1, j1, r1) = parse_openai(_openai_answer(prompts, 2, lp), [3, 3], 2, 16)
    # position t holds entry t + 1; the own token (9, rank 900) is not one of the top 2; tail = 1 - sum exp(top-k)
    assert j0[:2].tolist() == [[5, 7], [3, 4]] and j1[:2].tolist() == [[5, 7], [3, 4]]
    assert np.allclose(v0[0], [math.log(0.5), math.log(0.25)]) and np.allclose(v0[1], [math.log(0.9), math.log(0.05)])
    assert np.allclose(r0[:2], [math.log(0.25), math.log(0.05)])
    assert r0[2] == v0[2, 0] == -1e4  # the last position predicts past the prompt: never scored, the floor
    with pytest.raises(AttarError, match="returned 2 log-probs at token 1 of prompt 0, 3 were asked"):
        parse_openai(_openai_answer(prompts, 2, lp), [3, 3], 3, 16)
    with pytest.raises(AttarError, match="prompt_logprobs for 3 tokens of prompt 0, 5 were sent"):
        parse_openai(_openai_answer(prompts, 2, lp), [5, 3], 2, 16)
    with pytest.raises(AttarError, match="token id 7, outside the student's vocabulary of 6 tokens"):
        parse_openai(_openai_answer(prompts, 2, lp), [3, 3], 2, 6)
    with pytest.raises(AttarError, match="1 completion choices, 2 prompts were sent"):
        parse_openai(_openai_answer(prompts[:1], 2, lp), [3, 3], 2, 16)


def test_short_answers_and_another_vocabulary_or_tokenizer_are_refused_by_name(byte_setup):
    _, data, served = byte_setup
    good = served.server.topk({"ids": [[1, 70, 71, 72]], "topk": 4})
    assert parse_attar(good, [4], 4, BYTE_VOCAB)[0][0].shape == (4, 4)
    short = json.loads(json.dumps(good))
    short["rows"][0]["logprobs"] = short["rows"][0]["logprobs"][:3]
    with pytest.raises(AttarError, match="top-k for 3 positions of row 0, 4 were asked"):
        parse_attar(short, [4], 4, BYTE_VOCAB)
    with pytest.raises(AttarError, match="returned 4 log-probs per token in row 0, 6 were asked"):
        parse_attar(good, [4], 6, BYTE_VOCAB)
    with pytest.raises(AttarError, match="vocabulary of 258 tokens, the student's has 300"):
        parse_attar(good, [4], 4, 300)
    client = ServedLMTeacher(served.url, k=4)
    with pytest.raises(AttarError, match="vocabulary of 258 tokens, the student's has 49152"):
        client.check(vocab_size=49152)
    with pytest.raises(AttarError, match="its tokenizer .* is not the student's"):
        client.check(vocab_size=BYTE_VOCAB, tokenizer="f" * 64)
    with pytest.raises(AttarError, match="k=300 but the server gives at most 258"):
        ServedLMTeacher(served.url, k=300)
    with pytest.raises(AttarError, match=r"raw \(T = 1\) log-probabilities, and the loss uses T = 2"):
        ServedLMTeacher(served.url, k=4, protocol="openai", temperature=2.0)
    with pytest.raises(AttarError, match="refused the request .*topk must be an integer"):
        lm_served.call(served.url + "/v1/topk", {"ids": [[1, 2]], "topk": 0})


def test_a_dead_server_is_named_and_a_distillation_stops_with_a_checkpoint(tmp_path, byte_setup, fast_retries):
    teacher, data, _ = byte_setup
    served = _serve(teacher, byte_tokenizer())
    client = ServedLMTeacher(served.url, k=8)
    url = served.url
    served.stop()
    with pytest.raises(InputUnavailable, match=f"served teacher at {url}/info did not answer after 2 tries"):
        ServedLMTeacher(url, k=8)
    with pytest.raises(InputUnavailable) as e:
        distill_lm(make_byte_lm(layers=1, d_model=16, heads=2, context=64), data, None, dict(steps=3, batch_size=8, eval_every=100), cache=client,
                   ckpt_dir=tmp_path / "ck", progress=False)
    assert url in str(e.value) and "step 0 with a checkpoint" in str(e.value)
    assert (tmp_path / "ck" / "step-00000000").is_dir()


def _recipe(tmp_path: Path, url: str, name: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts(96)))
    r = tmp_path / f"{name}.yaml"
    r.write_text(json.dumps({"name": name, "stages": [{"name": "student", "kind": "lm", "lm": {
        "student": {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 96}},
        "teacher": {"url": url, "topk": 16}, "data": {"name": str(corpus), "max_len": 80},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "alpha": 0.5}}}]}))
    return r


def test_a_server_killed_mid_run_stops_the_stage_with_a_checkpoint_and_resume_matches_an_unbroken_run(
        tmp_path, fast_retries):
    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe

    torch.manual_seed(0)
    make_byte_lm(tmp_path / "teacher", layers=1, d_model=32, heads=2, context=96)
    served = Served(serve_model(str(tmp_path / "teacher")))
    port, url = served.server.server_address[1], served.url
    ref = Pipeline(*load_recipe(_recipe(tmp_path, url, "ref")), home=tmp_path / "ref", log=lambda *a, **k: None).run()
    metrics = json.loads((ref / "student" / "lm-metrics.json").read_text())["metrics"]
    assert metrics["steps"] == 6 and math.isfinite(metrics["test_ppl"])

    answer = served.server.topk
    calls = []

    def dies_after_three(body):  # the fourth batch's request finds the server going down
        calls.append(1)
        if len(calls) > 3:
            threading.Thread(target=served.stop).start()
            raise RuntimeError("shutting down")
        return answer(body)

    served.server.topk = dies_after_three
    home = tmp_path / "home"
    with pytest.raises(AttarError) as e:
        Pipeline(*load_recipe(_recipe(tmp_path, url, "broken")), home=home, log=lambda *a, **k: None).run()
    msg = str(e.value)
    assert f"served teacher at {url}/v1/topk did not answer" in msg and "step 3 with a checkpoint" in msg, msg
    run = next(p for p in home.iterdir() if (p / "run.json").exists())
    assert (run / "student" / "checkpoints" / "step-00000003").is_dir()
    with pytest.raises(AttarError, match="did not answer"):  # still down: resume says so and keeps the checkpoint
        Pipeline(*load_recipe(run / "recipe.yaml"), home=home, log=lambda *a, **k: None).run(resume_dir=run)
    # a restarted server holding other weights (same tokenizer and vocabulary) is refused
    make_byte_lm(tmp_path / "other", layers=1, d_model=32, heads=2, context=96, seed=1)
    other = Served(serve_model(str(tmp_path / "other"), port=port))
    try:
        with pytest.raises(AttarError, match="now serves other weights"):
            Pipeline(*load_recipe(run / "recipe.yaml"), home=home, log=lambda *a, **k: None).run(resume_dir=run)
    finally:
        other.stop()
    back = Served(serve_model(str(tmp_path / "teacher"), port=port))
    try:
        Pipeline(*load_recipe(run / "recipe.yaml"), home=home, log=lambda *a, **k: None).run(resume_dir=run)
    finally:
        back.stop()
    a = load_file(ref / "student" / "model" / "model.safetensors")
    b = load_file(run / "student" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_fields_of_a_served_teacher_are_checked():
    from pydantic import ValidationError

    from attar.distill.lm_config import LMModelSpec, LMStageOptions

    assert LMModelSpec(url="http://127.0.0.1:1", protocol="openai", topk=8).topk == 8
    for bad, msg in (({"url": "127.0.0.1:8000"}, "http:// or https://"),
                     ({"hf": "x", "topk": 8}, "apply to a served teacher"),
                     ({"url": "http://h:1", "lora": {}}, "takes no prune or lora"),
                     ({"url": "http://h:1", "hf": "x"}, "exactly one of")):
        with pytest.raises(ValidationError, match=msg):
            LMModelSpec(**bad)
    with pytest.raises(ValidationError, match="on-policy rows are scored by a live teacher"):
        LMStageOptions(student={"byte": {"layers": 1}}, teacher={"url": "http://h:1"}, train={"on_policy": 0.5})
    with pytest.raises(ValidationError, match="student.url"):
        LMStageOptions(student={"url": "http://h:1"})


def test_attar_teacher_serve_serves_a_model_folder_until_stopped(tmp_path):
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    make_byte_lm(tmp_path / "teacher", layers=1, d_model=16, heads=2, context=32)
    proc = subprocess.Popen([sys.executable, "-m", "attar.cli", "teacher", "serve", "--model", str(tmp_path / "teacher"),
                             "--port", "0", "--topk", "16", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "258 tokens" in line and "top-k up to 16" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split(";")[0]
        info = lm_served.call(url + "/info", None, retries=0)
        assert info["protocol"] == "attar-teacher/1" and info["vocab_size"] == BYTE_VOCAB and info["max_topk"] == 16
        assert info["tokenizer"] == tokenizer_fingerprint(byte_tokenizer())
        got = ServedLMTeacher(url, k=16).info["context"]
        assert got == 32
    finally:
        proc.terminate()
        proc.wait(timeout=30)
