"""Run by tests/test_ddp.py under torchrun: a DDP model trained a few steps, then left as cyclic garbage at exit
(as the Trainer leaves its wrapper once ``fit`` returns). The process must exit 0; only torch and attar's rank
helpers are imported, so each launch is quick."""

import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from attar.train import distributed as dist


def main(steps: int) -> None:
    dist.maybe_init()
    torch.manual_seed(0)
    ddp = DDP(nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)))
    ddp.cycle = [ddp]  # only the collector frees it
    opt = torch.optim.AdamW(ddp.parameters(), 1e-3)
    for _ in range(steps):
        ddp(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    print(f"teardown rank {dist.rank()} done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
