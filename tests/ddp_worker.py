"""Run by tests/test_ddp.py under `torchrun --nproc_per_node=2`: train on digits with the real Trainer."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

from attar.train.objective import Objective
from attar.train.config import TrainConfig
from attar.train import distributed as dist
from attar.train.trainer import Trainer


class CE(Objective):
    def forward(self, batch, logits):
        return {"loss": nn.functional.cross_entropy(logits, batch.y)}


def main(out: Path, resume: bool) -> None:
    dist.maybe_init()
    out.mkdir(parents=True, exist_ok=True)  # the test kills the workers by pid: torchrun starts them in sessions of their own
    (out / f"pid{dist.rank()}").write_text(str(os.getpid()))
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    cfg = TrainConfig(epochs=6, batch_size=16, checkpoint_every=10, lr=1e-3)
    res = Trainer(model, CE(), x, y, cfg, seed=5, val=(x, y), ckpt_dir=out / "ckpt").fit(resume=resume)
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, str(out / f"rank{dist.rank()}.safetensors"))
    print(f"rank {dist.rank()} world {dist.world_size()} steps {res.steps} acc {res.history[-1]['val_accuracy']:.3f}")


def main_lm(out: Path) -> None:
    """Token KD between two byte-level GPT-2s, each rank on its shard of every batch (the LM task under DDP)."""
    from attar.distill.lm import distill_lm
    from attar.text.charlm import byte_tokenizer, lm_data, make_byte_lm

    dist.maybe_init()
    out.mkdir(parents=True, exist_ok=True)
    texts = [f"line {i}: the {w} of {v} is {u}." for i, (w, v, u) in
             enumerate(zip(["sea", "sky", "sun", "moon"] * 16, ["time", "salt", "wind", "rain"] * 16, "abcdefgh" * 8))]
    data = lm_data(texts, byte_tokenizer(), prompt_len=6, max_len=40, seed=0)
    teacher = make_byte_lm(layers=1, d_model=32, heads=2, context=64, seed=0)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1)
    res = distill_lm(student, data, teacher, steps=8, batch_size=8, lr=5e-3, eval_every=4, alpha=0.5,
                     checkpoint_every=4, progress=False, ckpt_dir=out / "ckpt")
    save_file({k: v.clone() for k, v in res.model.state_dict().items()}, str(out / f"rank{dist.rank()}.safetensors"))
    print(f"lm rank {dist.rank()} world {dist.world_size()} steps {res.metrics['steps']} "
          f"ppl {res.history[0]['val_ppl']:.2f}->{res.history[-1]['val_ppl']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "lm":
        main_lm(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), resume=len(sys.argv) > 2 and sys.argv[2] == "resume")
