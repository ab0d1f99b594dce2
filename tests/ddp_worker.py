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


if __name__ == "__main__":
    main(Path(sys.argv[1]), resume=len(sys.argv) > 2 and sys.argv[2] == "resume")
