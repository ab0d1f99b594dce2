"""Run by tests/test_ddp.py under `torchrun --nproc_per_node=2`: train on digits with the real Trainer."""

import faulthandler
import os
import sys
import time
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


def main_sharded(out: Path, mode: str) -> None:
    """A tiny Llama (tied embeddings, 2 decoder layers) trained by the Trainer's LM task, DDP or FSDP2.

    ``mode``: ``ddp`` | ``fsdp`` | ``fsdp-crash`` (the workers die right after step 5, a checkpoint at 4) |
    ``fsdp-resume`` (continue the crashed run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attar.distill.lm_task import LMLoss, LMTask
    from attar.text.charlm import LMSplit
    from attar.train.callbacks import Callback

    dist.maybe_init()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{dist.rank()}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         tie_word_embeddings=True))
    ids = torch.randint(1, 97, (64, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    split = LMSplit(ids, mask, torch.ones(len(ids), dtype=torch.long))
    task = LMTask(split, pad_id=-1, eos_id=None, alpha=1.0, divergence_name="kl", temperature=1.0, divergence_args={},
                  teacher=None, cache=None, vmap=None, chunk_tokens=None)

    if dist.rank() == 0:
        save_file({k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(out / "init.safetensors"))

    class Crash(Callback):
        def on_step_end(self, trainer, step):
            if step == 1:  # what the model holds while it trains: shards (DTensor) under FSDP
                (out / f"param-type{dist.rank()}").write_text(type(next(trainer.model.parameters())).__name__)
            if mode == "fsdp-crash" and step == 5:
                os._exit(3)  # a crash of the node: no checkpoint at 5, the one at 4 stays

    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, weight_decay=0.0, checkpoint_every=4, eval_every=10**9,
                      fsdp=mode != "ddp")
    res = Trainer(model, LMLoss(1.0, "kl", 1.0, {}, None), ids, split.prompt_len, cfg, seed=3, task=task,
                  callbacks=[Crash()], ckpt_dir=out / "ckpt", progress=False).fit(resume=mode == "fsdp-resume")
    sd = res.model.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values()), "the trained model is handed back unsharded"
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight, "tied weights stay tied"
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, str(out / f"rank{dist.rank()}.safetensors"))
    print(f"{mode} rank {dist.rank()} world {dist.world_size()} steps {res.steps}")


def main_unavailable(out: Path, resume: bool) -> None:
    """A task that reads from outside the process (``external_input``): while ``out/down`` exists, rank 1's input
    is missing from step 5 on. Both ranks must stop at step 5's checkpoint (rank 0 though its own input came);
    a resume once the input is back finishes with the weights of an uninterrupted run."""
    from attar.train.task import Classification
    from attar.train.trainer import InputUnavailable

    class Flaky(Classification):
        external_input = True

        def batch(self, trainer, rows, epoch, micro):
            if trainer.rank == 1 and (out / "down").exists() and epoch * trainer.steps_per_epoch + micro >= 5:
                raise InputUnavailable("the served teacher at http://127.0.0.1:9 did not answer.")
            return super().batch(trainer, rows, epoch, micro)

    if int(os.environ.get("RANK", "0")) == 1:  # rank 1 reaches the stop late, after rank 0 wrote the checkpoint:
        slow = Trainer._unavailable  # it must still join the save's barrier, not skip it on seeing the folder

        def late(self, *args):
            time.sleep(1.0)
            return slow(self, *args)

        Trainer._unavailable = late
    dist.maybe_init()
    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x, y = torch.tensor(d.data[:512], dtype=torch.float32) / 16, torch.tensor(d.target[:512])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2)
    try:
        res = Trainer(model, CE(), x, y, cfg, seed=5, ckpt_dir=out / "ckpt", task=Flaky()).fit(resume=resume)
    except InputUnavailable as e:
        (out / f"stopped{dist.rank()}").write_text(str(e))
        dist.barrier()  # both ranks leave together: a rank tearing gloo down while its peer still talks aborts
        return
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, str(out / f"rank{dist.rank()}.safetensors"))
    print(f"unavailable rank {dist.rank()} steps {res.steps}")
    dist.barrier()


def main_recipe(out: Path) -> None:
    """``attar run``'s pipeline on a causal-LM ``train`` stage with packed text under torchrun: rank 0 builds the
    token store once (each build prints its rank), both ranks train, rank 0 records the run."""
    import attar.text.token_store as token_store
    from attar.pipeline import run_recipe

    build = token_store._build

    def counted(*a, **k):
        print(f"store built by rank {dist.rank()}", flush=True)
        return build(*a, **k)

    token_store._build = counted
    run = run_recipe(out.parent / "recipe.yaml", home=out)
    print(f"recipe rank {dist.rank()} world {dist.world_size()} run {run.name}", flush=True)


if __name__ == "__main__":
    # a worker killed by a signal (an abort in gloo) writes where it was to OUT/fault<rank> (the test shows it)
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    _fault = open(Path(sys.argv[1]) / f"fault{os.environ.get('RANK', '0')}", "w")
    faulthandler.enable(file=_fault, all_threads=True)
    if len(sys.argv) > 2 and sys.argv[2] == "recipe":
        main_recipe(Path(sys.argv[1]))
    elif len(sys.argv) > 2 and sys.argv[2] in ("ddp", "fsdp", "fsdp-crash", "fsdp-resume"):
        main_sharded(Path(sys.argv[1]), sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[2] in ("unavailable", "unavailable-resume"):
        main_unavailable(Path(sys.argv[1]), resume=sys.argv[2] == "unavailable-resume")
    elif len(sys.argv) > 2 and sys.argv[2] == "lm":
        main_lm(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), resume=len(sys.argv) > 2 and sys.argv[2] == "resume")
