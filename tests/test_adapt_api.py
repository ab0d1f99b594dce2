"""MeZO, the finetune API and the `attar finetune` sub-app, on a tiny random BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attar.adapt import MeZO, finetune
from attar.cli.finetune import app
from attar.errors import AttarError
from attar.text.hf import load_hf_classifier

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------- MeZO


def test_mezo_regenerates_z_and_restores_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    theta = [p.detach().clone() for p in lin.parameters()]
    seen = []
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def closure():
        seen.append([p.detach().clone() for p in lin.parameters()])
        loss = nn.functional.cross_entropy(lin(x), y)
        assert not loss.requires_grad  # no autograd graph
        return loss

    opt = MeZO(lin.parameters(), lr=0.1, eps=1e-2)
    loss, g = opt.step(closure, seed=123)
    gen = torch.Generator().manual_seed(123)
    z = [torch.randn(t.shape, generator=gen) for t in theta]
    for t, zp, zm, zz in zip(theta, seen[0], seen[1], z):
        assert torch.allclose(zp, t + 1e-2 * zz, atol=1e-6) and torch.allclose(zm, t - 1e-2 * zz, atol=1e-6)
    for p, t, zz in zip(lin.parameters(), theta, z):
        assert torch.allclose(p.detach(), t - 0.1 * g * zz, atol=1e-5)
        assert p.grad is None


def test_mezo_descends():
    torch.manual_seed(0)
    lin = nn.Linear(10, 2)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long()
    opt = MeZO(lin.parameters(), lr=0.05, eps=1e-3)
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(lin(x), y))
    for s in range(300):
        opt.step(lambda: nn.functional.cross_entropy(lin(x), y), seed=s)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(lin(x), y)) < 0.8 * first


def _peak_above(fn) -> float:
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return rss("VmHWM") - base


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_mezo_peak_memory_is_inference_level():
    """A 32 MB model: a backprop AdamW step adds gradients + two moments (~96 MB); MeZO only one z at a time."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
    x, y = torch.randn(4, 1024), torch.randint(0, 1024, (4,))
    loss = lambda: nn.functional.cross_entropy(net(x), y)  # noqa: E731
    with torch.no_grad():
        infer = _peak_above(loss)
    opt = MeZO(net.parameters(), lr=1e-4)
    mezo = _peak_above(lambda: opt.step(loss, seed=0))

    def backprop():
        adam = torch.optim.AdamW(net.parameters(), lr=1e-4)
        loss().backward()
        adam.step()

    bp = _peak_above(backprop)
    # glibc may keep a few freed 4 MB z buffers resident, hence the 20 MB allowance
    assert bp > 80 and mezo < 20 and mezo < bp / 5, (infer, mezo, bp)


# ---------------------------------------------------------------- finetune API


def test_finetune_lora_writes_model_and_peft_adapter(sentiment_files, tmp_path):
    res = finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv"), "max_length": 12},
                   {"name": "lora", "rank": 4, "targets": [".*dense", "query", "value"]},
                   {"epochs": 5, "batch_size": 8, "lr": 1e-2}, tmp_path / "out", seed=1)
    assert res.metrics["test_accuracy"] > 0.9
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    back = load_hf_classifier(tmp_path / "out" / "model")
    assert back.classes == ["neg", "pos"]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["trainable_params"] == res.metrics["trainable_params"] < m["total_params"]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ids = torch.tensor([[2, 20, 46, 36, 3]])
    want = back.eval()(ids)
    # the PEFT adapter holds the trained head, so any base with the same encoder reproduces the model
    base = AutoModelForSequenceClassification.from_pretrained(str(sentiment_files / "bert"), num_labels=2)
    got = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_finetune_resume_reproduces_the_run(sentiment_files, tmp_path):
    args = (sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv"), "max_length": 12, "train_limit": 48}, {"name": "lora", "init": "pissa"},
            {"epochs": 2, "batch_size": 16, "lr": 1e-2})
    a = finetune(*args, tmp_path / "o", seed=3)
    b = finetune(*args, tmp_path / "o", seed=3, resume=True)  # starts from the final checkpoint: nothing left to do
    assert b.history == a.history and b.metrics["test_accuracy"] == a.metrics["test_accuracy"]
    ids = torch.tensor([[2, 20, 46, 36, 3]])
    assert torch.equal(a.model(ids), b.model(ids))


def test_finetune_mezo_and_ssf_run(sentiment_files, tmp_path):
    r = finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv"), "max_length": 12, "train_limit": 64}, "head",
                 {"epochs": 1, "batch_size": 16, "lr": 1e-3}, seed=0, optimizer="mezo", mezo={"eps": 1e-3})
    assert r.metrics["optimizer"] == "mezo" and r.metrics["steps"] == 4
    r = finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv"), "max_length": 12, "train_limit": 64}, "ssf",
                 {"epochs": 1, "batch_size": 16}, seed=0)
    assert 0 < r.metrics["trainable_params"] < r.metrics["total_params"]


def test_finetune_errors_come_before_training(sentiment_files, tmp_path):
    with pytest.raises(AttarError, match="matches no Linear module"):
        finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv")}, {"name": "lora", "targets": ["q_proj"]})
    with pytest.raises(AttarError, match="no text column 'body'"):
        finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv"), "text_column": "body"}, "lora")
    with pytest.raises(AttarError, match="Invalid training settings"):
        finetune(sentiment_files / "bert", {"csv": str(sentiment_files / "t.csv")}, "lora", {"epoch": 1})
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- CLI


def test_cli_run_adapters_and_errors(sentiment_files, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(sentiment_files / "bert"), "--data", str(sentiment_files / "t.csv"), "--adapter", "lora",
                            "--set", "rank=2", "--set", "targets=[query, value]", "--epochs", "1", "--lr", "0.01",
                            "--max-length", "12", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and (tmp_path / "o" / "model" / "config.json").exists()
    r = runner.invoke(app, ["apply-peft", str(sentiment_files / "bert"), str(tmp_path / "o" / "adapter"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    from attar.cli import app as attar_app

    r = runner.invoke(attar_app, ["methods", "adapters"])
    assert r.exit_code == 0 and "lora" in r.output and "magnitude" in r.output
    r = runner.invoke(attar_app, ["methods", "adapters", "lora"])
    assert r.exit_code == 0 and "rank" in r.output
    r = runner.invoke(app, ["run", str(sentiment_files / "bert"), "--data", str(sentiment_files / "t.csv"), "--text-column", "body",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "no text column 'body'" in " ".join(r.output.split())
    r = runner.invoke(app, ["run", str(sentiment_files / "bert"), "--data", "nothing.txt", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "neither a built-in" in " ".join(r.output.split())


def test_check_finetune_validates_without_training(sentiment_files):
    from attar.adapt.api import check_finetune

    ok = {"model": str(sentiment_files / "bert"), "data": {"csv": str(sentiment_files / "t.csv")}, "adapter": {"name": "lora", "init": "eva"}}
    assert check_finetune(ok).adapter["init"] == "eva"
    with pytest.raises(AttarError, match="'q_proj' matches no Linear module"):
        check_finetune(ok | {"adapter": {"name": "lora", "targets": ["q_proj"]}})
    with pytest.raises(AttarError, match="matches no Linear/LayerNorm module"):
        check_finetune(ok | {"adapter": {"name": "ssf", "targets": ["nothing_here"]}})
    with pytest.raises(AttarError, match="no text column 'body'"):
        check_finetune(ok | {"data": {"csv": str(sentiment_files / "t.csv"), "text_column": "body"}})
