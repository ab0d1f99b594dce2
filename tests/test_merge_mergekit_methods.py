"""mergekit's other methods and config shapes (model_stock, della, nuslerp, multislerp, karcher, sce, nearswap,
passthrough with layer slices, SLERP's ignored weight, tokenizer padding, chat templates), each against a
formula computed here, independently of attar's method code, on tiny stand-in models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from attar.errors import AttarError
from attar.merge import merge_state_dicts, run_merge
from attar.merge.config import load_merge_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

SHAPES = {"model.layers.0.w": (3, 4), "model.layers.1.w": (3, 4), "model.norm.b": (5,)}


def rand_sd(seed: int, scale: float = 1.0, like: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if like is not None:
        return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in like.items()}
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1)]


def cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


# ---------------------------------------------------------------- model_stock


def test_model_stock_formula_per_tensor_and_filter_wise():
    base = rand_sd(0)
    fts = [rand_sd(i, 0.1, base) for i in (1, 2, 3)]
    out = merge_state_dicts("model_stock", fts, base=base)
    k = 3
    for name in base:
        taus = [[x - y for x, y in zip(flat(f[name]), flat(base[name]))] for f in fts]
        c = sum(cos(taus[i], taus[j]) for i in range(k) for j in range(i + 1, k)) / 3
        t = k * c / (1 + (k - 1) * c)
        avg = [sum(v) / k for v in zip(*(flat(f[name]) for f in fts))]
        want = [t * a + (1 - t) * b for a, b in zip(avg, flat(base[name]))]
        torch.testing.assert_close(out[name].reshape(-1), torch.tensor(want), rtol=1e-5, atol=1e-6)
    out = merge_state_dicts("model_stock", fts[:2], base=base, parameters={"filter_wise": True})
    w = "model.layers.0.w"
    for r in range(3):  # one ratio per row
        ta, tb = [flat(f[w][r] - base[w][r]) for f in fts[:2]]
        c = cos(ta, tb)
        t = 2 * c / (1 + c)
        want = t * (fts[0][w][r] + fts[1][w][r]) / 2 + (1 - t) * base[w][r]
        torch.testing.assert_close(out[w][r], want, rtol=1e-5, atol=1e-6)


def test_model_stock_identical_finetunes_return_them():
    base = rand_sd(0)
    ft = rand_sd(1, 0.1, base)
    out = merge_state_dicts("model_stock", [ft, {k: v.clone() for k, v in ft.items()}], base=base)
    for k in ft:
        torch.testing.assert_close(out[k], ft[k], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- nuslerp / multislerp / karcher


def slerp_ref(t: float, a: list[float], b: list[float]) -> list[float]:
    om = math.acos(max(-1.0, min(1.0, cos(a, b))))
    return [(math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om) for x, y in zip(a, b)]


def test_nuslerp_flattened_rows_and_columns_with_and_without_base():
    a, b, base = rand_sd(1), rand_sd(2), rand_sd(3)
    mp = [{"weight": 0.6}, {"weight": 0.4}]
    t = 0.4 / 1.0
    out = merge_state_dicts("nuslerp", [a, b], model_parameters=mp)
    for k in a:
        torch.testing.assert_close(out[k].reshape(-1), torch.tensor(slerp_ref(t, flat(a[k]), flat(b[k]))), rtol=1e-5, atol=1e-6)
    out = merge_state_dicts("nuslerp", [a, b], base=base, model_parameters=mp, parameters={"nuslerp_flatten": False})
    w = "model.layers.1.w"
    for r in range(3):
        want = slerp_ref(t, flat(a[w][r] - base[w][r]), flat(b[w][r] - base[w][r]))
        torch.testing.assert_close(out[w][r], base[w][r] + torch.tensor(want), rtol=1e-5, atol=1e-6)
    out = merge_state_dicts("nuslerp", [a, b], model_parameters=mp, parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    for col in range(4):
        want = slerp_ref(t, flat(a[w][:, col]), flat(b[w][:, col]))
        torch.testing.assert_close(out[w][:, col], torch.tensor(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights, end", [((1.0, 0.0), 0), ((0.0, 1.0), 1)])
def test_nuslerp_endpoints(weights, end):
    a, b, base = rand_sd(1), rand_sd(2), rand_sd(3)
    for kw in ({}, {"base": base}):
        out = merge_state_dicts("nuslerp", [a, b], model_parameters=[{"weight": weights[0]}, {"weight": weights[1]}], **kw)
        for k in a:
            torch.testing.assert_close(out[k], (a, b)[end][k], rtol=1e-5, atol=1e-5)


def test_multislerp_formula():
    ms, base = [rand_sd(i) for i in (1, 2, 3)], rand_sd(4)
    w = [0.5, 0.3, 0.2]
    out = merge_state_dicts("multislerp", ms, base=base, model_parameters=[{"weight": x} for x in w])
    for k in base:
        v = [[x - y for x, y in zip(flat(m[k]), flat(base[k]))] for m in ms]
        norms = [math.sqrt(sum(x * x for x in vi)) for vi in v]
        u = [[x / n for x in vi] for vi, n in zip(v, norms)]
        mean = [sum(wi * ui[j] for wi, ui in zip(w, u)) for j in range(len(u[0]))]
        mn = math.sqrt(sum(x * x for x in mean))
        mean = [x / mn for x in mean]
        tang = [0.0] * len(mean)
        for wi, ui in zip(w, u):
            d = sum(x * y for x, y in zip(ui, mean))
            tang = [tj + wi * (x - d * m) for tj, x, m in zip(tang, ui, mean)]
        tn = math.sqrt(sum(x * x for x in tang))
        r = [math.cos(tn) * m + math.sin(tn) * x / tn for m, x in zip(mean, tang)]
        scale = sum(wi * n for wi, n in zip(w, norms))
        want = torch.tensor([scale * x for x in r]) + base[k].reshape(-1)
        torch.testing.assert_close(out[k].reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_karcher_one_model_and_two_model_midpoint():
    a, b = rand_sd(1), rand_sd(2)
    out = merge_state_dicts("karcher", [a])
    for k in a:
        assert torch.equal(out[k], a[k])
    out = merge_state_dicts("karcher", [a, b], parameters={"max_iter": 50, "tol": 1e-7})
    for k in a:  # the spherical mean of two directions is their normalised bisector; the norm is the mean norm
        ua, ub = a[k].reshape(-1) / a[k].norm(), b[k].reshape(-1) / b[k].norm()
        mid = (ua + ub) / (ua + ub).norm()
        torch.testing.assert_close(out[k].reshape(-1), mid * (a[k].norm() + b[k].norm()) / 2, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- sce, nearswap


def test_sce_select_calculate_erase():
    base = {"w": torch.zeros(2, 3)}
    t1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t2 = torch.tensor([[2.0, 1.0, 0.5], [-1.0, 3.0, 1.0]])
    out = merge_state_dicts("sce", [{"w": t1}, {"w": t2}], base=base, parameters={"select_topk": 0.5},
                            model_parameters=[{"weight": 5.0}, None])  # weight is ignored by sce
    a, b = flat(t1), flat(t2)
    var = [((x - y) / 2) ** 2 for x, y in zip(a, b)]
    nz = sum(v > 0 for v in var)
    keep = sorted(range(6), key=lambda i: -var[i])[: int(nz * 0.5)]
    a = [x if i in keep else 0.0 for i, x in enumerate(a)]
    b = [x if i in keep else 0.0 for i, x in enumerate(b)]
    ea, eb = sum(x * x for x in a) / 6, sum(x * x for x in b) / 6
    wa, wb = ea / (ea + eb), eb / (ea + eb)
    want = []
    for x, y in zip(a, b):
        sign = 1 if x + y >= 0 else -1
        ka, kb = (x != 0 and (x > 0) == (sign > 0)), (y != 0 and (y > 0) == (sign > 0))
        den = wa * ka + wb * kb
        want.append((wa * ka * x + wb * kb * y) / max(den, 1e-6))
    torch.testing.assert_close(out["w"].reshape(-1), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_nearswap_takes_close_values_and_steps_toward_far_ones():
    a = torch.tensor([0.0, 1.0, 2.0, -1.0])
    b = torch.tensor([0.05, 1.5, 2.0, 1.0])
    out = merge_state_dicts("nearswap", [{"w": b}], base={"w": a}, parameters={"t": 0.1})["w"]
    want = []
    for x, y in zip(a.tolist(), b.tolist()):
        w = 1.0 if abs(x - y) <= 0.1 else 0.1 / abs(x - y)
        want.append(w * y + (1 - w) * x)
    torch.testing.assert_close(out, torch.tensor(want))


# ---------------------------------------------------------------- della (random: in distribution)


def test_della_keeps_density_on_average_favours_large_entries_and_matches_l1():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(64, 256)}
    delta = torch.randn(64, 256, generator=g)
    out = merge_state_dicts("della_linear", [{"w": delta}], base=base,
                            parameters={"density": 0.5, "epsilon": 0.3, "rescale": False})["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[ranks < 64].float().mean().item(), kept[ranks >= 192].float().mean().item()
    # expected keep rates: 0.2..0.35 in the lowest quarter (mean ~0.275), 0.65..0.8 in the highest (~0.725)
    assert abs(low - 0.275) < 0.03 and abs(high - 0.725) < 0.03
    assert torch.equal(out[kept], delta[kept])
    out = merge_state_dicts("della_linear", [{"w": delta}], base=base, parameters={"density": 0.5, "epsilon": 0.3})["w"]
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)  # rescale: true matches L1
    two = merge_state_dicts("della", [{"w": delta}, {"w": -delta}], base=base, parameters={"density": 0.5, "epsilon": 0.1})["w"]
    assert ((two == 0) | (two.sign() == delta.sign()) | (two.sign() == -delta.sign())).all()
    with pytest.raises(AttarError, match="epsilon"):
        merge_state_dicts("della", [{"w": delta}], base=base, parameters={"density": 0.9, "epsilon": 0.2})


# ---------------------------------------------------------------- config shapes on disk


def hf_folder(path, sd, layers=2, vocab=None, tokens=None, template=None):
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers}
    if vocab:
        cfg["vocab_size"] = vocab
    (path / "config.json").write_text(json.dumps(cfg))
    if tokens:
        vocab_map = {f"t{i}": i for i in range(tokens)}
        (path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab_map, "merges": []}, "added_tokens": []}))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if template:
            tc["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


def layered(seed: int, layers: int = 3, vocab: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, 4, generator=g), "lm_head.weight": torch.randn(vocab, 4, generator=g),
          "model.norm.weight": torch.randn(4, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(4, 4, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(4, 4, generator=g)
    return sd


def test_passthrough_slices_stack_and_renumber_layers(tmp_path):
    a, b = layered(1), layered(2)
    hf_folder(tmp_path / "a", a, layers=3)
    hf_folder(tmp_path / "b", b, layers=3)
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                                      {"sources": [{"model": "b", "layer_range": [1, 3]}]}]}
    run_merge(cfg, tmp_path / "out", base_dir=tmp_path, progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    for k, (src, j) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for part in ("self_attn.o_proj", "mlp.up_proj"):
            assert torch.equal(out[f"model.layers.{k}.{part}.weight"], src[f"model.layers.{j}.{part}.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"]) and torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    assert len(out) == 3 + 4 * 2
    scaled = {"merge_method": "passthrough", "models": [{"model": "a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 2}]}}]}
    run_merge(scaled, tmp_path / "scaled", base_dir=tmp_path, progress=False)
    out = load_file(str(tmp_path / "scaled" / "model.safetensors"))
    assert not out["model.layers.1.self_attn.o_proj.weight"].any()
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], 2 * a["model.layers.1.mlp.up_proj.weight"])


def test_slerp_slices_partial_range_with_gradient(tmp_path):
    a, b = layered(1), layered(2)
    hf_folder(tmp_path / "a", a, layers=3)
    hf_folder(tmp_path / "b", b, layers=3)
    cfg = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": [0.0, 1.0]},
           "slices": [{"sources": [{"model": "a", "layer_range": [1, 3]}, {"model": "b", "layer_range": [0, 2]}]}]}
    run_merge(cfg, tmp_path / "out", base_dir=tmp_path, progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    w = "mlp.up_proj.weight"
    assert torch.equal(out[f"model.layers.0.{w}"], a[f"model.layers.1.{w}"])  # t = 0 at the slice's first layer
    torch.testing.assert_close(out[f"model.layers.1.{w}"], b[f"model.layers.1.{w}"])  # t = 1 at its last


def test_slerp_weight_is_ignored_with_a_note_and_weight_notes_elsewhere(tmp_path):
    base, ft = rand_sd(0), rand_sd(1)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    plain = {"merge_method": "slerp", "base_model": "base.safetensors", "parameters": {"t": 0.3},
             "models": [{"model": "base.safetensors"}, {"model": "ft.safetensors"}]}
    weighted = json.loads(json.dumps(plain))
    for m, w in zip(weighted["models"], (0.6, 0.4)):
        m["parameters"] = {"weight": w}
    res = run_merge(weighted, tmp_path / "w", base_dir=tmp_path, progress=False)
    assert any("takes no weight" in n for n in res.notes)
    run_merge(plain, tmp_path / "p", base_dir=tmp_path, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(load_file(str(tmp_path / "w" / "model.safetensors")).values(),
                                                 load_file(str(tmp_path / "p" / "model.safetensors")).values()))
    cfg = load_merge_config({"merge_method": "model_stock", "base_model": "b", "models": [
        {"model": "x", "parameters": {"weight": 0.6}}, {"model": "y", "parameters": {"weight": 0.4}}]})
    assert any("model_stock takes no weight" in n for n in cfg.notes)
    with pytest.raises(AttarError, match="no parameter 'densty'"):
        load_merge_config({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "x", "parameters": {"densty": 1}}]})


def test_pad_to_multiple_of_and_chat_template(tmp_path):
    a, b = layered(1, vocab=6), layered(2, vocab=6)
    hf_folder(tmp_path / "a", a, layers=3, vocab=6, tokens=6)
    hf_folder(tmp_path / "b", b, layers=3, vocab=6, tokens=6, template="{{ messages[0]['content'] }} from b")
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.25}}, {"model": "b", "parameters": {"weight": 0.75}}],
           "tokenizer": {"source": "base", "pad_to_multiple_of": 4}, "chat_template": "chatml"}
    run_merge(cfg, tmp_path / "out", base_dir=tmp_path, progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[k].shape == (8, 4)
        merged = 0.25 * a[k] + 0.75 * b[k]
        torch.testing.assert_close(out[k][:6], merged)
        for row in (6, 7):  # each input's new rows are the mean of its own rows; the merge averages those
            torch.testing.assert_close(out[k][row], 0.25 * a[k].mean(0) + 0.75 * b[k].mean(0))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 8
    assert "<|im_start|>" in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    cfg = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "chat_template": "auto"}
    run_merge(cfg, tmp_path / "auto", base_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())["chat_template"].endswith("from b")
    c = layered(3, vocab=6)
    hf_folder(tmp_path / "c", c, layers=3, vocab=6, tokens=5)  # its tokenizer lacks t5: row 5 is unused
    run_merge({"merge_method": "linear", "models": [{"model": "a"}, {"model": "c"}], "tokenizer_source": "union"},
              tmp_path / "union", base_dir=tmp_path, progress=False)
    out = load_file(str(tmp_path / "union" / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # t5 is a's alone, so it keeps a's row
        torch.testing.assert_close(out[k], torch.cat([(a[k][:5] + c[k][:5]) / 2, a[k][5:]]))
    with pytest.raises(AttarError, match="chat_template 'vicuna'"):
        run_merge({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "chat_template": "vicuna"},
                  tmp_path / "bad2", base_dir=tmp_path, progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
