"""Streaming merges on disk: HF folders (sharded), attar artifacts, plain files, LoRA adapters, and failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attar.checkpoint import load_model_artifact, save_model_artifact
from attar.errors import AttarError
from attar.merge import merge_state_dicts, open_source, run_merge
from attar.merge.writer import ShardWriter, parse_size


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def gpt2_config(vocab: int = 50, model_type_tweak: dict | None = None):
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=16, bos_token_id=0, eos_token_id=0, **(model_type_tweak or {}))


def make_gpt2(folder: Path, seed: int, *, base_sd=None, vocab: int = 50, shard: str = "6KB") -> dict[str, torch.Tensor]:
    """A tiny GPT-2 saved sharded; with ``base_sd`` it is a 'fine-tune' (base + seeded noise)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(vocab))
    if base_sd is not None:
        g = torch.Generator().manual_seed(seed)
        model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}, strict=False)
    model.save_pretrained(folder, max_shard_size=shard)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def gpt2s(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base = make_gpt2(root / "base", 0)
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    make_gpt2(root / "ft_a", 1, base_sd=base)
    make_gpt2(root / "ft_b", 2, base_sd=base)
    return root


# ---------------------------------------------------------------- Hugging Face folders


def test_streaming_hf_merge_loads_in_transformers_and_equals_in_memory(gpt2s, tmp_path):
    from transformers import AutoModelForCausalLM

    assert len(list((gpt2s / "base").glob("model-*.safetensors"))) > 1  # inputs really are sharded
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(gpt2s / "base"),
        "models": [
            {"model": str(gpt2s / "ft_a"), "parameters": {"weight": 0.7, "density": [0.3, 0.9]}},
            {"model": str(gpt2s / "ft_b"), "parameters": {"density": 0.5}},
        ],
        "parameters": {"lambda": 0.9},
        "seed": 3,
    }
    out = tmp_path / "merged"
    res = run_merge(cfg, out, shard_size="5KB", progress=False)
    assert res.shards > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert (out / "tokenizer_config.json").exists() and (out / "attar_merge.yaml").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    tensors = {n: saved_tensors(gpt2s / n) for n in ("base", "ft_a", "ft_b")}
    expected = merge_state_dicts(
        "dare_ties",
        [tensors["ft_a"], tensors["ft_b"]],
        base=tensors["base"],
        model_parameters=[cfg["models"][0]["parameters"], cfg["models"][1]["parameters"]],
        parameters=cfg["parameters"],
        seed=3,
        num_layers=2,
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    # the merge did something, and the density gradient reached the layers differently
    assert not torch.equal(expected["transformer.h.0.mlp.c_fc.weight"], tensors["base"]["transformer.h.0.mlp.c_fc.weight"])


def test_hf_output_dtype_option_updates_config(gpt2s, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(gpt2s / "ft_a")}, {"model": str(gpt2s / "ft_b")}], "dtype": "float16"}
    out = tmp_path / "bf16"
    run_merge(cfg, out, dtype="bfloat16", progress=False)
    tensors = saved_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = saved_tensors(gpt2s / "ft_a"), saved_tensors(gpt2s / "ft_b")
    for k in a:
        torch.testing.assert_close(tensors[k], ((a[k] + b[k]) / 2).to(torch.bfloat16))


# ---------------------------------------------------------------- attar artifacts and plain files


def _artifact(folder: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    save_model_artifact(folder, model, {"spec": {"arch": "mlp", "hidden": [8]}, "input_shape": [4], "num_classes": 3})
    return model


def test_attar_artifact_in_artifact_out(tmp_path):
    a, b = _artifact(tmp_path / "a", 1), _artifact(tmp_path / "b", 2)
    out = tmp_path / "soup"
    res = run_merge({"merge_method": "linear", "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]}, out, progress=False)
    assert res.format == "attar"
    tensors, info = load_model_artifact(out)  # verifies the manifest hashes
    assert info["spec"]["arch"] == "mlp" and info["merge"]["method"] == "linear"
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if v.is_floating_point():
            torch.testing.assert_close(tensors[k], (v + sb[k]) / 2)
        else:
            assert torch.equal(tensors[k], v)  # BatchNorm's num_batches_tracked comes from the reference


def test_attar_artifact_hash_is_checked(tmp_path):
    _artifact(tmp_path / "a", 1)
    data = bytearray((tmp_path / "a" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "a" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AttarError, match="does not match its manifest"):
        open_source(tmp_path / "a")


def test_plain_safetensors_files(tmp_path):
    save_file({"w": torch.ones(2, 2), "b": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": 3 * torch.ones(2, 2), "b": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n")
    out = tmp_path / "out"
    res = run_merge(tmp_path / "merge.yaml", out, progress=False)  # relative paths: next to the config
    assert res.format == "safetensors"
    t = load_file(str(out / "model.safetensors"))
    assert torch.equal(t["w"], 2 * torch.ones(2, 2)) and torch.equal(t["b"], 0.5 * torch.ones(2))


def test_shard_writer_plans_and_checks_order(tmp_path):
    plan = [("a", (3, 3), torch.float32), ("b", (), torch.float32), ("c", (5,), torch.bfloat16), ("d", (2,), torch.int64)]
    with ShardWriter(tmp_path / "o", plan, fmt="safetensors", max_shard_bytes=40) as w:
        w.write("a", torch.arange(9.0).reshape(3, 3))
        with pytest.raises(RuntimeError, match="expected b"):
            w.write("c", torch.zeros(5, dtype=torch.bfloat16))
        w.write("b", torch.tensor(7.0))
        w.write("c", torch.ones(5, dtype=torch.bfloat16))
        w.write("d", torch.tensor([1, 2]))
        w.commit()
    t = saved_tensors(tmp_path / "o")
    assert t["b"].item() == 7.0 and t["c"].dtype == torch.bfloat16 and t["d"].tolist() == [1, 2]
    assert torch.equal(t["a"], torch.arange(9.0).reshape(3, 3))
    assert len(list((tmp_path / "o").glob("model-*.safetensors"))) == 2
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123


# ---------------------------------------------------------------- LoRA adapters


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_matches_peft_merge_and_unload(gpt2s, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = gpt2s / "base"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True, init_lora_weights=False,
        modules_to_save=["ln_f"], alpha_pattern={"h.1.mlp.c_fc": 2}, use_rslora=rslora,
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.base_model.model.transformer.ln_f.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == base_dir  # so the folder alone finds its base
    expected = peft_model.merge_and_unload().state_dict()

    src = open_source(tmp_path / "adapter")
    for name in src.names():
        torch.testing.assert_close(src.get(name), expected[name], rtol=1e-5, atol=1e-6)

    out = tmp_path / "merged"
    run_merge({"merge_method": "linear", "models": [{"model": f"{base_dir}+{tmp_path / 'adapter'}"}]}, out, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in src.names():
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-5, atol=1e-6)


def test_lora_adapter_for_another_model_is_refused(gpt2s, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file(
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 7),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(48, 2),
        },
        str(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    with pytest.raises(AttarError, match="base_model_name_or_path|not a local folder"):
        open_source(tmp_path / "adapter")
    with pytest.raises(AttarError, match="c_attn.weight.*shape"):
        open_source(f"{gpt2s / 'base'}+{tmp_path / 'adapter'}")


# ---------------------------------------------------------------- validation and failure


def test_missing_tensor_names_the_model_and_tensor(tmp_path):
    save_file({"w": torch.ones(2), "v": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "a.safetensors")}, {"model": str(tmp_path / "b.safetensors")}]}
    with pytest.raises(AttarError, match=r"b\.safetensors lacks 1 tensor.*\['v'\]"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_model_and_tensor(tmp_path):
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(3, 2)}, str(tmp_path / "b.safetensors"))
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "a.safetensors"), "models": [{"model": str(tmp_path / "b.safetensors")}]}
    with pytest.raises(AttarError, match=r"tensor 'w' has shape \(3, 2\) in .*b\.safetensors but \(2, 3\)"):
        run_merge(cfg, tmp_path / "out", progress=False)


def test_vocab_mismatch_gets_its_own_message(gpt2s, tmp_path):
    make_gpt2(tmp_path / "big_vocab", 3, vocab=52)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(gpt2s / "base"), "models": [{"model": str(tmp_path / "big_vocab")}]}
    with pytest.raises(AttarError, match=r"vocabulary size differs: tensor 'transformer\.wte\.weight' has 50 rows .* 52"):
        run_merge(cfg, tmp_path / "out", progress=False)


def test_architecture_mismatch(gpt2s, tmp_path):
    import shutil

    shutil.copytree(gpt2s / "ft_a", tmp_path / "other")
    cfg_path = tmp_path / "other" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["GPT2ForSequenceClassification"]
    cfg_path.write_text(json.dumps(cfg))
    merge = {"merge_method": "linear", "base_model": str(gpt2s / "base"), "models": [{"model": str(tmp_path / "other")}]}
    with pytest.raises(AttarError, match="architectures"):
        run_merge(merge, tmp_path / "out", progress=False)


def test_failed_merge_leaves_no_output_folder(gpt2s, tmp_path):
    from attar.merge.methods import MERGE_METHODS

    method = MERGE_METHODS.get("linear")
    calls = {"n": 0}
    real = method.fn

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk on fire")
        return real(x)

    object.__setattr__(method, "fn", flaky)  # MergeMethod is a frozen dataclass
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_merge({"merge_method": "linear", "models": [{"model": str(gpt2s / "ft_a")}, {"model": str(gpt2s / "ft_b")}]},
                      tmp_path / "out", shard_size="2KB", progress=False)
    finally:
        object.__setattr__(method, "fn", real)
    assert calls["n"] == 10
    assert os.listdir(tmp_path) == []  # neither the output nor a temp folder


def test_existing_output_and_output_inside_input(gpt2s, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(gpt2s / "ft_a")}, {"model": str(gpt2s / "ft_b")}]}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(AttarError, match="already exists"):
        run_merge(cfg, tmp_path / "out", progress=False)
    run_merge(cfg, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    with pytest.raises(AttarError, match="is \\(or contains\\) the input"):
        run_merge(cfg, gpt2s / "ft_a", overwrite=True, progress=False)
    assert (gpt2s / "ft_a" / "config.json").exists()


def test_unreadable_inputs(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "model.bin")
    with pytest.raises(AttarError, match="never unpickles"):
        open_source(tmp_path / "model.bin")
    with pytest.raises(AttarError, match="does not exist here"):
        open_source("meta-llama/Llama-3-8B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttarError, match="not a model attar can read"):
        open_source(tmp_path / "empty")


def test_ft_transfer_streaming_with_old_base_path(tmp_path):
    for name, v in {"new": 10.0, "old": 1.0, "old_ft": 1.5}.items():
        save_file({"w": torch.full((3,), v)}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "t.yaml").write_text(
        "merge_method: ft_transfer\nbase_model: new.safetensors\nmodels:\n  - model: old_ft.safetensors\n"
        "parameters: {old_base: old.safetensors}\n"
    )
    run_merge(tmp_path / "t.yaml", tmp_path / "out", progress=False)
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].tolist() == [10.5, 10.5, 10.5]


def test_sigterm_during_cli_merge_leaves_no_folder(gpt2s, tmp_path):
    import signal

    import yaml

    from attar.cli.merge import merge_command
    from attar.merge.methods import MERGE_METHODS

    method = MERGE_METHODS.get("linear")
    real = method.fn
    calls = {"n": 0}

    def killed(x):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's timeout would
        return real(x)

    cfg = tmp_path / "cfg" / "m.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(gpt2s / "ft_a")}, {"model": str(gpt2s / "ft_b")}]}))
    object.__setattr__(method, "fn", killed)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_command(cfg, tmp_path / "out" / "m", shard_size="2KB", quiet=True)
    finally:
        object.__setattr__(method, "fn", real)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
