"""Make the golden files that tests/test_merge_golden.py compares attar's merges against.

Run once (not in CI), from the repository root:

    python bench/merge_golden.py --mergekit-python /tmp/mkvenv/bin/python

It (1) builds tiny Llama models with attar's venv (a base and three
"fine-tunes" = base + seeded noise; float32, ~2k parameters each), saved with
``save_pretrained`` under tests/golden/merge/models/, and (2) runs each config
in tests/golden/merge/configs/ through mergekit, in a separate virtual
environment because mergekit pins its own dependency versions. Make that venv
with CPU torch first so pip never pulls a CUDA build:

    python3.11 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0   # the CPU wheel
    /tmp/mkvenv/bin/pip install mergekit==0.1.5

Outputs land in tests/golden/merge/mergekit/<config name>/model.safetensors
(config.json and the rest are dropped to keep the files tiny).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "merge"

CONFIGS: dict[str, str] = {
    "linear": """
merge_method: linear
models:
  - model: ft_a
    parameters: {weight: 0.5}
  - model: ft_b
    parameters: {weight: 0.3}
  - model: ft_c
    parameters: {weight: 0.2}
dtype: float32
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: ft_a
    parameters: {weight: 0.7}
  - model: ft_b
    parameters: {weight: 0.6}
parameters: {normalize: false}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - model: ft_a
    parameters: {weight: 0.6}
  - model: ft_b
    parameters: {weight: 0.4}
  - model: ft_c
    parameters: {weight: 0.3}
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - model: base
  - model: ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: ft_b
    parameters: {weight: 0.6, density: 0.3}
  - model: ft_c
    parameters: {weight: 0.8, density: 0.7}
parameters: {normalize: true, int8_mask: true}
dtype: float32
""",
    "ties_filtered": """
merge_method: ties
base_model: base
models:
  - model: ft_a
    parameters:
      weight: [{filter: mlp, value: 0.3}, {value: 1.0}]
      density: [0.2, 0.9]
  - model: ft_b
    parameters:
      weight: 0.7
      density: 0.5
parameters: {lambda: 1.2}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: base
models:
  - model: ft_a
    parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
  - model: ft_b
    parameters: {weight: 0.5, density: 0.4, gamma: 0.1}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: base
models:
  - model: base
  - model: ft_a
parameters: {t: 0.3}
dtype: float32
""",
    "slerp_gradient": """
slices:
  - sources:
      - model: base
        layer_range: [0, 3]
      - model: ft_a
        layer_range: [0, 3]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: [0.2, 0.8]
dtype: float32
""",
    "dare_linear": """
merge_method: dare_linear
base_model: base
models:
  - model: ft_a
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
""",
}


def make_models() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    models = GOLDEN / "models"
    shutil.rmtree(models, ignore_errors=True)
    base.save_pretrained(models / "base")
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"]):
        g = torch.Generator().manual_seed(100 + i)
        ft = LlamaForCausalLM(cfg)
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        ft.load_state_dict(sd)
        ft.save_pretrained(models / name)
    for d in models.iterdir():
        (d / "generation_config.json").unlink(missing_ok=True)


MERGEKIT_SCRIPT = r"""
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(cfg, sys.argv[2], options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
"""


def run_mergekit(python: str) -> None:
    out_root = GOLDEN / "mergekit"
    cfg_root = GOLDEN / "configs"
    shutil.rmtree(out_root, ignore_errors=True)
    shutil.rmtree(cfg_root, ignore_errors=True)
    cfg_root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(MERGEKIT_SCRIPT)
        for name, text in CONFIGS.items():
            (cfg_root / f"{name}.yaml").write_text(text.lstrip())
            out = Path(tmp) / name
            # mergekit resolves relative model paths from the working directory.
            subprocess.run([python, str(script), str(cfg_root / f"{name}.yaml"), str(out)], cwd=GOLDEN / "models", check=True)
            dest = out_root / name
            dest.mkdir(parents=True)
            shards = sorted(out.glob("*.safetensors"))
            if len(shards) != 1:
                raise SystemExit(f"{name}: expected one output shard, got {shards}")
            shutil.copy2(shards[0], dest / "model.safetensors")
            print(f"golden {name}: ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", required=True, help="python of a venv with mergekit 0.1.5 installed")
    ap.add_argument("--skip-models", action="store_true", help="reuse the existing input models")
    args = ap.parse_args()
    if not args.skip_models:
        make_models()
    run_mergekit(args.mergekit_python)


if __name__ == "__main__":
    sys.exit(main())
