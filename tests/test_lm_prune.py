"""Depth pruning: a layer that passes its input through unchanged scores zero influence and is dropped first;
the pruned model generates, saves and reloads with plain transformers to the same logits."""

from __future__ import annotations

import pytest
import torch

from attar.errors import AttarError
from attar.text.lm_prune import decoder_layers, drop_layers, layer_importance, prune_depth


def _llama(layers=5):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_a_pass_through_layer_has_zero_influence_and_is_dropped_first():
    model = _llama()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: out = in
        decoder_layers(model)[2].self_attn.o_proj.weight.zero_()
        decoder_layers(model)[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(1, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 9:] = 0  # padding is not measured
    scores = layer_importance(model, ids, pad_id=0)
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and bool((scores[[0, 1, 3, 4]] > 1e-3).all())
    _, info = prune_depth(model, ids, 0, keep=4)
    assert info["dropped"] == [2] and model.config.num_hidden_layers == 4


def test_pruned_model_generates_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model = drop_layers(_llama(), [0, 3])
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2]
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(decoder_layers(again)) == 3
    assert torch.allclose(again(ids).logits, model(ids).logits)


def test_pruning_mistakes_are_refused():
    with pytest.raises(AttarError, match="leaves none"):
        drop_layers(_llama(2), [0, 1])
    with pytest.raises(AttarError, match="keep must be between 1 and 5"):
        prune_depth(_llama(), torch.ones(2, 4, dtype=torch.long), 0, keep=9)


# ------------------------------------------------------------------ width (MLP channels, key/value head groups)

def _qwen2(layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gemma3(layers=2):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              max_position_embeddings=64))


def _silence(model, dead_channels, dead_group):
    """Channels whose gate and up rows are zero write nothing; a KV group whose value rows are zero outputs zeros."""
    heads = model.config.num_attention_heads
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.mlp.gate_proj.weight[dead_channels] = 0
            layer.mlp.up_proj.weight[dead_channels] = 0
            layer.self_attn.v_proj.weight[dead_group * hd : (dead_group + 1) * hd] = 0
            if layer.self_attn.v_proj.bias is not None:
                layer.self_attn.v_proj.bias[dead_group * hd : (dead_group + 1) * hd] = 0


@pytest.mark.parametrize("make", [_llama, _qwen2, _gemma3], ids=["llama", "qwen2-bias", "gemma3"])
def test_width_pruning_of_silent_channels_and_heads_keeps_the_function_and_reloads(make, tmp_path):
    from transformers import AutoModelForCausalLM

    from attar.text.lm_width import prune_width, width_importance

    model = make().eval()
    dead = torch.arange(0, 64, 2)  # every other channel
    _silence(model, dead, dead_group=1)
    ids = torch.randint(1, 90, (4, 10), generator=torch.Generator().manual_seed(1))
    ids[2, 7:] = 0
    scores = width_importance(model, ids, pad_id=0)
    assert all(float(s[dead].abs().max()) == 0 and float(s[1::2].min()) > 0 for s in scores["mlp"])
    assert all(float(s[2:].abs().max()) == 0 and float(s[:2].min()) > 0 for s in scores["heads"])  # group 1 = heads 2, 3
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    pruned, info = prune_width(model, ids, 0, mlp=32, kv_heads=1)
    assert info["kept"][0] == {"mlp": list(range(1, 64, 2)), "kv_groups": [0]}
    assert (info["mlp_after"], info["heads_after"], info["kv_heads_after"]) == (32, 2, 1)
    with torch.no_grad():
        after = pruned(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in make().parameters())
    pruned.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=(ids != 0).long()).logits, before,
                                   atol=1e-5, rtol=1e-5)


def test_mlp_channel_importance_is_mean_absolute_activation_by_hand():
    from attar.text.lm_width import width_importance

    model = _llama(layers=1).eval()
    ids = torch.randint(1, 90, (3, 8), generator=torch.Generator().manual_seed(2))
    ids[0, 5:] = 0
    seen = {}
    mlp = decoder_layers(model)[0].mlp
    h = mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    scores = width_importance(model, ids, pad_id=0)
    h.remove()
    x = seen["x"][ids != 0]
    act = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().mean(0)
    torch.testing.assert_close(scores["mlp"][0], act.detach(), atol=1e-6, rtol=1e-5)


def test_width_pruning_bad_widths_and_architectures_are_refused():
    from attar.text.charlm import make_byte_lm
    from attar.text.lm_width import prune_width

    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(AttarError, match="keep 65 MLP channels of 64"):
        prune_width(_llama(2), ids, 0, mlp=65)
    with pytest.raises(AttarError, match="keep 3 key/value head groups of 2"):
        prune_width(_llama(2), ids, 0, kv_heads=3)
    with pytest.raises(AttarError, match="prune depth instead"):
        prune_width(make_byte_lm(layers=1, d_model=16, heads=2, context=16, seed=0), ids, 0, mlp=8)


def test_shrink_width_rebuilds_the_same_shape_from_the_record():
    """What a resumed lm stage does: the record's kept indices give a fresh copy the pruned shape and weights."""
    from attar.text.lm_width import prune_width, shrink_width

    ids = torch.randint(1, 90, (4, 10), generator=torch.Generator().manual_seed(1))
    pruned, info = prune_width(_qwen2(), ids, 0, mlp=40, kv_heads=1)
    again = shrink_width(_qwen2(), info["kept"])
    assert pruned.state_dict().keys() == again.state_dict().keys()
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.config.intermediate_size == 40 and again.config.num_attention_heads == 2
