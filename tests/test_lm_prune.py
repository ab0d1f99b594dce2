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
