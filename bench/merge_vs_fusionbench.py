"""attar's RegMean, RegMean++ and AdaMerging against FusionBench 0.2.33's, on tiny models; writes the test fixture.

    .venv/bin/python bench/merge_vs_fusionbench.py            # build inputs, run FusionBench in its venv, compare, write
    .venv/bin/python bench/merge_vs_fusionbench.py --check    # compare only (fixture already written)

FusionBench runs in its own environment (never an attar dependency)::

    python3 -m venv bench/.venvs/fusion-bench
    bench/.venvs/fusion-bench/bin/pip install torch==2.13.0
    bench/.venvs/fusion-bench/bin/pip install fusion-bench==0.2.33 safetensors

What runs on the FusionBench side (``--fusionbench``, inside that venv, torch and safetensors only besides it):

* RegMean: ``fusion_bench.method.regmean.regmean.regmean_merging``, its whole pipeline (forward hooks on every
  ``nn.Linear``, Gram averaging, ``reduce_non_diagonal_ratio``, inverse, averaging of the rest), driven with
  stand-in trainers that yield each model's own batches.
* RegMean++: ``RegMeanAlgorithmPlusPlus.run`` with the model hooks its CLIP subclass fills in (embedding,
  layers, layer forward) written for the tiny model, and the CLIP subclass's own ``get_regmean_weights``.
* AdaMerging: ``LayerWiseMergedModel`` / ``TaskWiseMergedModel`` and ``entropy_loss`` in the loop of
  ``LayerWiseAdaMergingAlgorithm.test_time_adaptation`` (Adam, per-task backward, ``merge_weights`` after each
  step), fed the same batches attar sees.

Outputs ``tests/golden/fusionbench/{inputs,expected}.safetensors`` (tiny: a few KB); ``tests/test_merge_regmean.py``
checks attar against ``expected`` without FusionBench installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "fusionbench"
FB_PYTHON = ROOT / "bench" / ".venvs" / "fusion-bench" / "bin" / "python"
K, N, BS, D_IN, HID, CLASSES = 3, 64, 16, 6, 12, 4  # models, rows per model, batch, sizes
ALPHA, ADA_STEPS, ADA_LR, ADA_BS = 0.95, 25, 1e-2, 16


class MLP(nn.Module):
    """The 2-layer MLP classifier RegMean and AdaMerging are checked on."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D_IN, HID), nn.ReLU(), nn.Linear(HID, CLASSES)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Affine(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.scale + self.shift


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Tower(nn.Module):
    """A tiny transformer-like stack for RegMean++: a non-linear 'embedding', residual blocks, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = Affine(D_IN)
        self.layers = nn.ModuleList([Block(D_IN), Block(D_IN)])
        self.head = nn.Linear(D_IN, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_inputs() -> dict[str, torch.Tensor]:
    """Pretrained models, 'fine-tuned' copies (pretrained + a seeded perturbation), each model's own data."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for arch, cls in (("mlp", MLP), ("tower", Tower)):
        torch.manual_seed(1)
        pre = cls()
        for k, v in pre.state_dict().items():
            out[f"{arch}.pre.{k}"] = v
        for i in range(K):
            for k, v in pre.state_dict().items():
                out[f"{arch}.ft{i}.{k}"] = v + 0.2 * torch.randn(v.shape, generator=g)
    for i in range(K):  # each task's inputs: its own mean and scale per feature, so the Grams differ
        mu = 2 * torch.randn(D_IN, generator=g)
        scale = torch.rand(D_IN, generator=g) + 0.3
        out[f"data{i}"] = mu + scale * torch.randn(N, D_IN, generator=g)
    for i in range(K):  # AdaMerging: the batches of every step (and one more for the final entropy), per task
        out[f"ada{i}"] = torch.stack([out[f"data{i}"][torch.randperm(N, generator=g)[:ADA_BS]] for _ in range(ADA_STEPS + 1)])
    return {k: v.contiguous() for k, v in out.items()}


def models(inputs: dict, arch: str) -> tuple[nn.Module, list[nn.Module]]:
    cls = MLP if arch == "mlp" else Tower

    def load(prefix: str) -> nn.Module:
        m = cls()
        m.load_state_dict({k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)})
        return m

    return load(f"{arch}.pre."), [load(f"{arch}.ft{i}.") for i in range(K)]


# ---------------------------------------------------------------- FusionBench side (its own venv)


def run_fusionbench(inputs: dict) -> dict[str, torch.Tensor]:
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.method.regmean.regmean import regmean_merging
    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel

    out: dict[str, torch.Tensor] = {}
    data = [inputs[f"data{i}"] for i in range(K)]

    # RegMean: the whole function, hooks included; a 'trainer' yields the model's own batches as model(**inputs).
    class Trainer:
        _train_batch_size = BS

        def __init__(self, x):
            self.x = x

        def get_train_dataloader(self):
            return [{"x": self.x[i : i + BS]} for i in range(0, len(self.x), BS)]

        def _prepare_inputs(self, batch):
            return batch

    _, fts = models(inputs, "mlp")
    for alpha in (ALPHA, 1.0, 0.0):
        merged = regmean_merging(fts, [Trainer(x) for x in data], exclude_param_names_regex=[],
                                 nums_regmean_examples=[N] * K, reduce_non_diagonal_ratio=alpha)
        out.update({f"regmean.{alpha}.{k}": v.detach().clone() for k, v in merged.items()})

    # RegMean++: the algorithm's run(); the model-specific hooks as its CLIP subclass writes them.
    class Pool(BaseModelPool):
        def load_train_dataset(self, name, *a, **kw):
            return data[int(name[-1])]

    class TowerRegMeanPlusPlus(RegMeanAlgorithmPlusPlus):
        fabric = type("NoFabric", (), {"setup": staticmethod(lambda m: m)})()
        get_regmean_weights = RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights

        def merge_embedding_layer(self, models_to_merge_dict):
            sds = [m.state_dict() for m in models_to_merge_dict.values()]
            return {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0] if k.startswith("embed.")}

        def get_input_for_first_layer(self, model, train_dataset):
            return [model.embed(train_dataset[i : i + BS]).detach() for i in range(0, self.num_regmean_examples, BS)]

        def get_layers(self, model):
            return model.layers

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            merged_params_dict.update({f"layers.{layer_idx}.{k}": v for k, v in new_merged_params.items()})
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            return [layer(b).detach() for b in batches_input]

    pre, fts = models(inputs, "tower")
    pool = Pool({"_pretrained_": pre, **{f"m{i}": m for i, m in enumerate(fts)}})
    algo = TowerRegMeanPlusPlus(num_regmean_examples=N, exclude_param_names_regex=[], reduce_non_diagonal_ratio=ALPHA,
                                weight_transpose=True)
    merged = algo.run(pool)
    out.update({f"regmean_plusplus.{k}": v.detach().clone() for k, v in merged.state_dict().items()})

    # AdaMerging: FusionBench's wrappers and loss in its test-time adaptation loop, on the fixture's batches.
    for mode in ("layer", "task"):
        pre, fts = models(inputs, "mlp")
        n_params = len([p for p in pre.parameters() if p.requires_grad])
        if mode == "layer":
            module = LayerWiseMergedModel(get_layer_wise_weights(K, n_params, 0.3), pre, fts, clamp_weights=False,
                                          tie_weights=True, strict=False)
        else:
            module = TaskWiseMergedModel(torch.full((K,), 0.3), pre, fts, clamp_weights=False, tie_weights=True, strict=False)
        opt = torch.optim.Adam([module.merge_weight], lr=ADA_LR)
        module.train()
        module.merge_weights()
        losses = []
        for step in range(ADA_STEPS):
            total = 0.0
            for t in range(K):
                loss = entropy_loss(module(inputs[f"ada{t}"][step]))
                loss.backward(retain_graph=True)
                total += float(loss.detach())
            losses.append(total)
            opt.step()
            opt.zero_grad()
            module.merge_weights()
        out[f"adamerging.{mode}.lambdas"] = module.merge_weight.detach().clone()
        out[f"adamerging.{mode}.losses"] = torch.tensor(losses)
        final = module.merge_and_unload(copy=True)
        out.update({f"adamerging.{mode}.{k}": v.detach().clone() for k, v in final.state_dict().items()})
    return out


# ---------------------------------------------------------------- attar side


def run_attar(inputs: dict) -> dict[str, torch.Tensor]:
    from attar.merge.methods import adamerging_merge, input_grams, regmean_merge, regmean_plusplus_merge

    out: dict[str, torch.Tensor] = {}
    data = [inputs[f"data{i}"] for i in range(K)]
    _, fts = models(inputs, "mlp")
    grams = [input_grams(m, x, batch_size=BS, max_examples=N) for m, x in zip(fts, data)]
    for alpha in (ALPHA, 1.0, 0.0):
        res = regmean_merge([m.state_dict() for m in fts], grams, alpha=alpha)
        out.update({f"regmean.{alpha}.{k}": v for k, v in res.state_dict.items()})
    _, fts = models(inputs, "tower")
    res = regmean_plusplus_merge(fts, data, alpha=ALPHA, examples=N, batch_size=BS, blocks=["layers"])
    out.update({f"regmean_plusplus.{k}": v for k, v in res.state_dict.items()})
    for mode in ("layer", "task"):
        pre, fts = models(inputs, "mlp")
        res = adamerging_merge(pre, pre.state_dict(), [m.state_dict() for m in fts],
                               [iter(inputs[f"ada{t}"]) for t in range(K)], mode=mode, init=0.3, lr=ADA_LR,
                               steps=ADA_STEPS, batch_size=ADA_BS)
        out[f"adamerging.{mode}.lambdas"] = torch.tensor(res.info["lambdas"])
        out[f"adamerging.{mode}.losses"] = torch.tensor(res.info["entropy"][:-1])
        out.update({f"adamerging.{mode}.{k}": v for k, v in res.state_dict.items()})
    return out


def compare(expected: dict, got: dict) -> dict[str, float]:
    """Max |difference| per group; FusionBench's RegMean++ keeps the pretrained head (attar merges it), so the head
    is left out there."""
    groups: dict[str, float] = {}
    for k, v in expected.items():
        if k.startswith("regmean_plusplus.head."):
            continue
        group = ".".join(k.split(".")[:2]) if not k.startswith("regmean.") else ".".join(k.split(".")[:3])
        diff = float((got[k].float() - v.float()).abs().max())
        groups[group] = max(groups.get(group, 0.0), diff)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fusionbench", action="store_true", help="(internal) run FusionBench's side on the inputs")
    ap.add_argument("--check", action="store_true", help="compare with the stored fixture only")
    args = ap.parse_args()
    if args.fusionbench:
        fb = run_fusionbench(load_file(GOLDEN / "inputs.safetensors"))
        save_file({k: v.contiguous() for k, v in fb.items()}, GOLDEN / "expected.safetensors")
        return
    if not args.check:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        save_file(build_inputs(), GOLDEN / "inputs.safetensors")
        if not FB_PYTHON.exists():
            sys.exit(f"FusionBench's venv is missing: {FB_PYTHON} (see this file's docstring)")
        subprocess.run([str(FB_PYTHON), __file__, "--fusionbench"], check=True)
        version = subprocess.run([str(FB_PYTHON), "-c", "import importlib.metadata as m; print(m.version('fusion-bench'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        (GOLDEN / "README.md").write_text(f"Made by `bench/merge_vs_fusionbench.py` with fusion-bench {version} and "
                                          f"torch {torch.__version__}: inputs (tiny models, each model's data, AdaMerging's "
                                          "batches) and FusionBench's merged tensors.\n")
    inputs, expected = load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "expected.safetensors")
    diffs = compare(expected, run_attar(inputs))
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}, indent=1))
    worst = max(diffs.values())
    print(f"worst max |attar - FusionBench| = {worst:.2e} ({'within' if worst <= 1e-5 else 'OUTSIDE'} 1e-5)")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    main()
