"""Expert-trajectory store for trajectory matching (MTT and its descendants).

``K`` expert networks are trained on the real training data with plain SGD (as MTT's
``buffer.py``: lr 0.01, no momentum, no weight decay, batch 256, optional per-sample DSA), and every
expert's parameters are saved, flattened, after every epoch (epoch 0 = the initialisation). Layout::

    STORE/experts.json               metadata (format attar-experts/1): identity, training settings,
                                     parameter layout, and per expert its file, sha256 and seconds
    STORE/expert-000.safetensors     "trajectory": float32 [epochs + 1, P]
    STORE/expert-001.safetensors     ...

Every file is written atomically (temporary name, fsync, rename) and ``experts.json`` is rewritten
after each expert, so an interrupted build keeps the finished experts and resumes with the next; the
expert in training is an ordinary Trainer run that checkpoints into ``STORE/.expert-KKK.partial``, so
it resumes where it stopped and ends with the trajectory of an uninterrupted build. Loading verifies
each file's sha256 against the metadata.

Reuse: :func:`open_store` reads ``experts.json`` first. A store trained on a different
*identity* (architecture, data set / data hash, input shape, classes, input space (ZCA or pixels))
or with different *training settings* (epochs, lr, batch size, DSA, seed) is refused with an
:class:`~attar.errors.AttarError` naming every field that differs, before any work; a store with
fewer experts than asked for is extended (the missing experts are trained and appended), one with
more is used as it is.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attar.checkpoint import (
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
)
from attar.condense.augment import DSA
from attar.condense.base import CondenseContext, gen, seed_of
from attar.data.artifact import data_hash
from attar.errors import AttarError
from attar.models import build_model
from attar.paths import home
from attar.train.callbacks import Trajectory
from attar.train.config import TrainConfig
from attar.train.objective import CE
from attar.train.trainer import Trainer

FORMAT = "attar-experts/1"
META = "experts.json"

#: fields that say *what* the experts learned; a mismatch means the store is for something else
IDENTITY = ("architecture", "data", "data_hash", "input_shape", "num_classes", "input_space")
#: fields that say *how* they were trained
SETTINGS = ("epochs", "lr", "batch_size", "dsa", "seed")


@dataclass(frozen=True)
class ExpertConfig:
    num_experts: int = 5
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 256
    dsa: bool = True
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "dsa": self.dsa, "seed": self.seed}


def identity(model, data_name: str, data_hash: str, input_shape, num_classes: int,
             zca_eps: float | None = None) -> dict[str, Any]:
    """What an expert store must agree on with the run using it: architecture, data and input space."""
    return {"architecture": model.model_dump(mode="json", exclude_none=True), "data": data_name or "(unnamed)",
            "data_hash": data_hash, "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes),
            "input_space": "pixels" if zca_eps is None else f"zca(eps={float(zca_eps)})"}


def store_identity(ctx: CondenseContext) -> dict[str, Any]:
    """:func:`identity` of a context (hashing its real rows when the caller did not give ``data_hash``)."""
    if not ctx.data_hash:
        ctx.data_hash = data_hash(ctx.x, ctx.y)
    return identity(ctx.model, ctx.data_name, ctx.data_hash, ctx.input_shape, ctx.num_classes,
                    None if ctx.zca is None else ctx.zca.eps)


def param_layout(model: torch.nn.Module) -> tuple[list[str], list[list[int]]]:
    names, shapes = [], []
    for n, p in model.named_parameters():
        names.append(n)
        shapes.append(list(p.shape))
    return names, shapes


@dataclass
class ExpertStore:
    """An opened store: metadata plus lazily loaded, verified trajectories."""

    folder: Path
    meta: dict[str, Any]
    #: experts trained by the call that opened the store (empty when everything was reused)
    trained: list[int] = field(default_factory=list)
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_experts(self) -> int:
        return len(self.meta["experts"])

    @property
    def epochs(self) -> int:
        return int(self.meta["epochs"])

    @property
    def param_names(self) -> list[str]:
        return list(self.meta["param_names"])

    @property
    def param_shapes(self) -> list[list[int]]:
        return [list(s) for s in self.meta["param_shapes"]]

    def trajectory(self, k: int) -> torch.Tensor:
        """Expert ``k``'s parameters after every epoch: float32 ``[epochs + 1, P]`` (row 0 = initialisation)."""
        if k not in self._cache:
            e = self.meta["experts"][k]
            t = load_safetensors(self.folder / e["file"], e["sha256"])["trajectory"]
            if tuple(t.shape) != (self.epochs + 1, int(self.meta["num_params"])):
                raise AttarError(f"{self.folder / e['file']} holds a trajectory of shape {tuple(t.shape)}, expected "
                                 f"{(self.epochs + 1, self.meta['num_params'])}; rebuild the store (delete the folder).")
            self._cache[k] = t
        return self._cache[k]


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise AttarError(f"{path} is not valid JSON ({e}); delete the folder to rebuild the expert store.") from None
    if meta.get("format") != FORMAT:
        raise AttarError(f"{path} is not an attar expert store (format {meta.get('format')!r}, expected {FORMAT!r}); "
                         "point expert_dir at another folder.")
    return meta


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:40] + "…" + s[-12:]


def check_store(folder: str | Path, ident: dict[str, Any], cfg: ExpertConfig) -> dict[str, Any] | None:
    """Read a store's metadata and refuse a mismatch (naming each differing field); None when there is no store."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        return None
    want = ident | cfg.settings()
    keys = [k for k in IDENTITY + SETTINGS if meta.get(k) != want[k]]
    if "data" in keys and "data_hash" not in keys:
        keys.remove("data")  # the same tensors under another name: harmless
    diffs = [f"{k}: store has {_short(meta.get(k))}, this run needs {_short(want[k])}" for k in keys]
    if diffs:
        what = "architecture or data" if any(d.split(":")[0] in IDENTITY for d in diffs) else "training settings"
        raise AttarError(
            f"expert store {folder} was built for a different {what} — " + "; ".join(diffs) + ". Point expert_dir at "
            "another folder (or leave it unset for the automatic per-setting cache), delete the folder to rebuild it, "
            "or run with the store's settings (model / data / expert_* params)."
        )
    return meta


def train_expert(ctx: CondenseContext, cfg: ExpertConfig, k: int, log: Callable[[str], None] | None = None,
                 ckpt_dir: Path | None = None) -> torch.Tensor:
    """Train expert ``k`` on ``ctx``'s labeled rows; returns its trajectory ``[epochs + 1, P]`` (CPU, float32).

    An ordinary Trainer run (SGD without momentum or weight decay, constant lr, every row once per epoch in an
    order of ``(seed, "expert", k, epoch)``) with a :class:`~attar.train.callbacks.Trajectory` callback that
    snapshots the parameters after every epoch; with ``ckpt_dir`` an interrupted expert resumes where it stopped.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(cfg.seed, "expert", k))
        net = build_model(ctx.model, ctx.input_shape, ctx.num_classes, ctx.mean, ctx.std).to(ctx.device)
    dsa = DSA(mean=ctx.mean, std=ctx.std) if cfg.dsa and ctx.x.dim() == 4 else None
    n = int((ctx.y >= 0).sum())
    traj = Trajectory(net)
    train = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="sgd", lr=cfg.lr, momentum=0.0,
                        weight_decay=0.0, schedule="constant")

    def epoch_line(step: int, m: dict[str, float]) -> None:
        if log and "epoch" in m:
            log(f"expert {k} epoch {int(m['epoch'])}/{cfg.epochs}: train loss {m['train_loss']:.3f}")

    Trainer(net, CE(), ctx.x, ctx.y, train, seed=seed_of(cfg.seed, "expert", k), ckpt_dir=ckpt_dir,
            on_metrics=epoch_line, augment=dsa, name=f"expert {k}", num_classes=ctx.num_classes,
            callbacks=[traj], order=lambda e: torch.randperm(n, generator=gen(cfg.seed, "expert", k, e)),
            drop_last=False, inner=True).fit(resume=True)
    return traj.stack()


def open_store(folder: str | Path, ctx: CondenseContext, cfg: ExpertConfig,
               log: Callable[[str], None] | None = None) -> ExpertStore:
    """Load the store in ``folder``, training (and appending) whatever experts it lacks; refuse a mismatch.

    ``store.trained`` lists the experts this call trained (empty when the store was reused as it is).
    """
    folder = Path(folder)
    ident = store_identity(ctx)
    meta = check_store(folder, ident, cfg)
    if meta is None:
        template = ctx.fresh_model("expert-layout")
        names, shapes = param_layout(template)
        meta = {"format": FORMAT, **ident, **cfg.settings(), "optimizer": "sgd, momentum 0, weight decay 0",
                "param_names": names, "param_shapes": shapes, "num_params": sum(int(torch.Size(s).numel()) for s in shapes),
                "experts": [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    else:
        names, _ = param_layout(ctx.fresh_model("expert-layout"))
        if names != meta["param_names"]:
            raise AttarError(f"expert store {folder} has parameters {meta['param_names'][:3]}…, but the network built "
                             f"here has {names[:3]}…; rebuild the store (delete the folder) or point expert_dir elsewhere.")
    store = ExpertStore(folder, meta)
    for k in range(len(meta["experts"]), cfg.num_experts):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / META).exists():  # the folder's identity is fixed before any expert checkpoint lands in it
            atomic_write_json(folder / META, meta)
        t0 = time.perf_counter()
        partial = folder / f".expert-{k:03d}.partial"  # the expert's Trainer checkpoints while it trains
        traj = train_expert(ctx, cfg, k, log, ckpt_dir=partial)
        fname = f"expert-{k:03d}.safetensors"
        sha = atomic_save_safetensors({"trajectory": traj.float().contiguous()}, folder / fname,
                                      metadata={"format": FORMAT, "expert": str(k)})
        meta["experts"].append({"file": fname, "sha256": sha, "seconds": round(time.perf_counter() - t0, 2)})
        atomic_write_json(folder / META, meta)  # rewritten after every expert: an interrupted build resumes here
        shutil.rmtree(partial, ignore_errors=True)
        store._cache[k] = traj.float()
        store.trained.append(k)
    return store


def default_store_dir(ident: dict[str, Any], cfg: ExpertConfig) -> Path:
    """``$ATTAR_HOME/cache/experts-<hash>``: one folder per (identity, training settings), so runs share experts."""
    import hashlib

    key = json.dumps(ident | cfg.settings(), sort_keys=True, default=str)
    root = home() / "cache"
    return root / f"experts-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
