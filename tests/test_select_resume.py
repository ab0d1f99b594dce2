"""A run with a stateful selector, interrupted and resumed from its checkpoint, ends exactly where an
uninterrupted run does (weights and selector state), and the selector's accounting carries over."""

import pytest
import torch
from torch import nn

from attar.train.config import TrainConfig
from attar.select import build_selector
from attar.train.trainer import Trainer
from tiny_task import CE, digits

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    pass


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def _stop_at(step_to_stop):
    def cb(step, metrics):
        if step == step_to_stop:
            raise Stop

    return cb


SPECS = [
    {"name": "uds", "keep": 0.5, "buffer": 64},  # memory buffer checkpointed
    {"name": "prune", "keep": 0.5, "score": "forgetting", "probe_epochs": 1},  # kept rows checkpointed, no re-probe
    {"name": "efficienttrain", "keep": 0.8, "max_shift": 2},  # position- and RNG-dependent transform
]


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_resume_with_selector_matches_uninterrupted(tmp_path, spec):
    x, y = digits(images=True)
    cfg = TrainConfig(epochs=2, batch_size=32, checkpoint_every=7, lr=3e-3)
    ref_sel = build_selector(spec)
    ref = Trainer(_model(), CE(), x, y, cfg, seed=4, selector=ref_sel).fit()

    first = Trainer(_model(), CE(), x, y, cfg, seed=4, ckpt_dir=tmp_path, on_metrics=_stop_at(20),
                    selector=build_selector(spec))
    with pytest.raises(Stop):
        first.fit()  # stops at step 20; the newest checkpoint is step 14
    sel = build_selector(spec)
    res = Trainer(_model(), CE(), x, y, cfg, seed=4, ckpt_dir=tmp_path, selector=sel).fit(resume=True)

    assert res.steps == ref.steps
    for p, q in zip(ref.model.parameters(), res.model.parameters()):
        assert torch.equal(p, q)
    for k, v in ref_sel.state_tensors().items():
        assert torch.equal(v, sel.state_tensors()[k]), k
    # accounting continues from the checkpoint: same totals as the uninterrupted run
    for k in ("candidate_rows", "trained_rows", "scoring_forward_rows", "probe_train_rows"):
        if k in ref.selection:
            assert res.selection[k] == ref.selection[k], k
