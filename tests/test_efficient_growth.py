"""G_stack growth: the big model's blocks are the small model's stacked copies, and it then trains."""

import pytest
import torch

from attar.errors import AttarError
from attar.text.charlm import byte_tokenizer, lm_data, make_byte_lm
from attar.train.growth import block_list, g_stack

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

TEXTS = [f"{w} is the {a} of {b}; so it goes." for w, a, b in
         zip(["Time", "Love", "Code", "Rain", "Salt", "Wind"] * 6, ["friend", "enemy", "mother", "end", "root", "art"] * 6,
             ["all", "most", "none", "some", "many", "each"] * 6)]


def _lm(layers, seed):
    return make_byte_lm(layers=layers, d_model=16, heads=2, context=64, seed=seed)


def test_g_stack_copies_blocks_in_order_and_everything_else_as_is():
    small, big = _lm(2, 0), _lm(4, 1)
    assert block_list(small)[0] == "transformer.h" and len(block_list(big)[1]) == 4
    g_stack(small, big, factor=2)
    sd_s, sd_b = small.state_dict(), big.state_dict()
    for i in range(4):  # block i of the big model is block i mod 2 of the small one: [0, 1, 0, 1]
        for k, v in small.transformer.h[i % 2].state_dict().items():
            assert torch.equal(big.transformer.h[i].state_dict()[k], v)
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert torch.equal(sd_b[k], sd_s[k])
    assert big.transformer.h[0].attn.c_attn.weight.data_ptr() != big.transformer.h[2].attn.c_attn.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 12))
    # G_stack does not preserve the function: each block now runs twice
    assert not torch.allclose(small(ids).logits, big(ids).logits, atol=1e-3)


def test_grown_model_keeps_training():
    from attar.distill.lm import train_lm

    data = lm_data(TEXTS, byte_tokenizer(), prompt_len=8, max_len=40, val_fraction=0.15, test_fraction=0.15, seed=0)
    small = train_lm(_lm(1, 0), data, steps=30, batch_size=8, lr=3e-3, eval_every=30, progress=False).model
    big = g_stack(small, _lm(2, 1), 2)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    res = train_lm(big, data, steps=10, batch_size=8, lr=1e-3, eval_every=5, progress=False)
    assert res.metrics["steps"] == 10 and res.metrics["best_val_ppl"] is not None
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())


def test_growth_refuses_mismatched_models_by_name():
    with pytest.raises(AttarError, match="factor 2 makes 4, but the stage's model has 3"):
        g_stack(_lm(2, 0), _lm(3, 0), 2)
    wide = make_byte_lm(layers=4, d_model=32, heads=2, context=64, seed=0)
    with pytest.raises(AttarError, match="differ only in depth"):
        g_stack(_lm(2, 0), wide, 2)
    from attar.models import build_model

    with pytest.raises(AttarError, match="no list of identical blocks"):
        block_list(build_model({"arch": "convnet", "width": 8, "depth": 3}, (1, 28, 28), 10))


def test_recipe_growth_from_must_name_an_earlier_stage():
    from attar.recipe import Recipe

    stage = {"name": "big", "kind": "train", "model": {"arch": "mlp"},
             "train": {"growth": {"method": "g_stack", "from": "small", "factor": 2}}}
    with pytest.raises(Exception, match="refers to 'small', which is no stage"):
        Recipe.model_validate({"data": {"name": "digits"}, "stages": [stage]})
    ok = Recipe.model_validate({"data": {"name": "digits"}, "stages": [
        {"name": "small", "kind": "train", "model": {"arch": "mlp"}}, stage]})
    assert ok.stages[1].train.growth.from_ == "small"
