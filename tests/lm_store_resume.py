"""What the token-store tests share: an LM recipe run from a store, killed after its step-8 checkpoint (a SIGKILL
stand-in) in a second home that reuses the first one's cache, then resumed; the weights must equal the first run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file


class Kill(Exception):
    pass


def run_kill_resume(recipe: Path, tmp_path: Path, monkeypatch, check: Callable[[tuple, dict], None] | None = None) -> dict:
    """Run ``recipe`` whole, then killed and resumed; assert equal weights and that both runs used one token store.
    ``check(args, kwargs)`` sees the stage's ``distill_lm`` call. Returns the first run's metrics."""
    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe
    from attar.stages import lm as lm_stage

    logs: list[str] = []
    log = lambda *a, **k: logs.append(" ".join(map(str, a)))  # noqa: E731
    ref = Pipeline(*load_recipe(recipe), home=tmp_path / "home", log=log).run()
    stores = list((tmp_path / "home" / "cache" / "tokens").iterdir())
    assert len(stores) == 1 and any("token store built" in line for line in logs)
    real = lm_stage.distill_lm

    def killed(*a, **k):
        if check is not None:
            check(a, k)
        inner = k["on_metrics"]

        def on_metrics(step, rec):
            if step == 9:
                raise Kill  # after the step-8 checkpoint, like a SIGKILL
            if inner is not None:
                inner(step, rec)
        return real(*a, **(k | {"on_metrics": on_metrics}))

    logs.clear()
    home = tmp_path / "home2"
    home.mkdir()
    (home / "cache").symlink_to(tmp_path / "home" / "cache")  # the same cache folder: the store is reused
    with monkeypatch.context() as m:
        m.setattr(lm_stage, "distill_lm", killed)
        with pytest.raises(Kill):
            Pipeline(*load_recipe(recipe), home=home, log=log).run()
    assert any("token store reused" in line for line in logs)
    run_dir = next(p for p in home.iterdir() if (p / "run.json").exists())
    resumed = Pipeline(*load_recipe(recipe), home=home, log=log).run(resume_dir=run_dir)
    a = load_file(ref / "s" / "model" / "model.safetensors")
    b = load_file(resumed / "s" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"metrics": json.loads((ref / "s" / "lm-metrics.json").read_text())["metrics"], "store": stores[0]}
