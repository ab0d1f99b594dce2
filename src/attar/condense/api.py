"""Condensing a data set: :func:`condense` and the checks it runs first (:func:`check_request`); the evaluation
protocol is in :mod:`attar.condense.evaluate`, the PNG grid in :mod:`attar.condense.render`.

Everything that can be checked before work starts is checked first (method name and parameters,
IPC against the smallest class, at least two classes, image data for image models, the output
folder), so a bad call fails in seconds with an :class:`~attar.errors.AttarError`.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from attar.condense.base import (
    CONDENSERS,
    DEFAULT_MODEL,
    CondenseContext,
)
from attar.data import load_data
from attar.data.artifact import SyntheticSet, data_hash, save_synthetic
from attar.errors import AttarError
from attar.specs import DataSpec, ModelSpec
from attar.condense.schedule import fmt_duration, plan_schedule
from attar.train.progress import StepProgress, progress_mode
from attar.train.trainer import resolve_device


def _stderr_log(progress: bool | None) -> Callable[[str], None]:
    """Plan and ETA lines to stderr whenever progress would show (a bar or lines), else nowhere."""
    import sys

    if progress_mode(None, progress) == "off":
        return lambda s: None

    def write(s: str) -> None:
        try:
            sys.stderr.write(s + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    return write


def _as_data_spec(data: DataSpec | dict | str) -> DataSpec:
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, str):
        return DataSpec(name=data) if not Path(data).is_dir() else DataSpec(imagefolder=data)
    try:
        return DataSpec.model_validate(data)
    except Exception as e:  # pydantic ValidationError
        raise AttarError(f"invalid data spec {data!r}: {e}") from None


def _as_model_spec(model: ModelSpec | dict | None) -> ModelSpec:
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, ModelSpec):
        return model
    try:
        return ModelSpec.model_validate(model)
    except Exception as e:
        raise AttarError(f"invalid model spec {model!r}: {e}") from None


def check_request(method: str, ipc: int, y: torch.Tensor, classes: list[str], data_name: str,
                  params: dict[str, Any] | None = None, init: str = "real"):
    """Validate a condensation request before any work; returns the configured method object."""
    cls = CONDENSERS.get(method)  # unknown method: lists the known ones
    condenser = cls(params)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise AttarError(f"ipc (images per class) must be a positive integer, got {ipc!r}.")
    if init not in ("real", "noise"):
        raise AttarError(f"init must be 'real' (start from real samples) or 'noise', got {init!r}.")
    if len(classes) < 2:
        raise AttarError(
            f"data set {data_name!r} has {len(classes)} class(es); condensation learns a set that separates classes, "
            "so it needs at least two. Check label_column, or the folder layout (one sub-folder per class)."
        )
    counts = torch.bincount(y[y >= 0], minlength=len(classes))
    smallest = int(counts.min())
    if ipc > smallest:
        which = classes[int(counts.argmin())]
        raise AttarError(
            f"ipc={ipc} is larger than the smallest class of {data_name!r} (class {which!r} has {smallest} labeled "
            f"training rows); use ipc <= {smallest}, or add data to that class."
        )
    return condenser


def condense(
    data: DataSpec | dict | str,
    method: str,
    ipc: int,
    out_dir: str | Path,
    iterations: int | None = None,
    seed: int = 0,
    *,
    model: ModelSpec | dict | None = None,
    init: str = "real",
    params: dict[str, Any] | None = None,
    soft_labels: str | Path | None = None,
    flip: bool = False,
    zca: bool = False,
    zca_eps: float = 0.1,
    overwrite: bool = False,
    progress: bool | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    device: str = "auto",
    budget: str | float | None = None,
    paper_schedule: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Condense ``data`` into ``ipc`` images per class with ``method`` and write the artifact to ``out_dir``.

    ``model`` is the network the method matches through (default ConvNet width 128, depth 3);
    ``init`` starts learned images from real samples (``real``) or Gaussian noise with the data's
    statistics (``noise``); ``params`` are the method's own fields (``attar methods condense``).
    ``soft_labels`` names a model artifact (a teacher trained on the real data) whose logits on the
    final images are stored as soft labels. Plug-ins for methods that learn images: ``flip`` (FYI,
    flip-aware synthesis: the matching loss sees every synthetic image and its horizontal flip) and
    ``zca`` (the method runs in ZCA-whitened space, regularised by ``zca_eps``; the learned images are
    mapped back to pixel space before saving, see :mod:`attar.condense.zca`). Returns the artifact folder.

    How long a learned method runs (:mod:`attar.condense.schedule`): ``iterations``, a wall-time ``budget``
    (``"10m"``, ``"90s"`` or seconds; checked between iterations, the run ends within it), or
    ``paper_schedule`` (the paper's count); with none of them, the paper's count on a GPU and a
    :data:`~attar.condense.schedule.CPU_BUDGET_S` wall budget on a CPU. The plan is said through ``log``
    (default: stderr while progress shows) before work starts, and the ETA after the first iteration.
    ``device``: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
    """
    spec = _as_data_spec(data)
    mspec = _as_model_spec(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AttarError(f"{out_dir} already exists and is not empty; choose another --out or pass overwrite.")
    cls = CONDENSERS.get(method)  # unknown method: fails here, listing the known ones, before data is read
    cls(params)  # bad method parameters: likewise
    bundle = load_data(spec)
    condenser = check_request(method, ipc, bundle.train.y, bundle.classes, bundle.name, params, init)
    if not bundle.is_image and mspec.arch != "mlp":
        raise AttarError(f"data set {bundle.name!r} is not images (shape {bundle.input_shape}); use model {{arch: mlp}}.")
    dev = resolve_device(device)
    plan = plan_schedule(cls.learns_images, cls.default_iterations, iterations, budget, paper_schedule, dev.type)
    iterations = plan.iterations
    for name, on in (("flip", flip), ("zca", zca)):
        if on and not cls.learns_images:
            raise AttarError(f"{name} is a plug-in for methods that learn images (dm, datadam, dc, dsa, mtt); "
                             f"{method!r} selects real rows, so drop {name}.")
        if on and not bundle.is_image:
            raise AttarError(f"{name} needs image data [N, C, H, W]; {bundle.name!r} has inputs of shape {bundle.input_shape}.")
    teacher = None
    if soft_labels is not None and getattr(condenser.p, "soft_labels", False):
        raise AttarError(f"method {method!r} learns its own soft labels (params soft_labels: true); drop one of the two: "
                         f"the soft-label teacher {soft_labels} or that parameter.")
    if soft_labels is not None and getattr(cls, "relabels", False):
        raise AttarError(f"method {method!r} relabels its images with its own teacher (params teacher/teachers); "
                         f"drop the soft-label teacher {soft_labels}, or pass it as the method's teacher.")
    if soft_labels is not None:
        from attar.models import load_model

        teacher, info = load_model(soft_labels)
        if int(info["num_classes"]) != len(bundle.classes) or tuple(info["input_shape"]) != tuple(bundle.input_shape):
            raise AttarError(
                f"soft-label teacher {soft_labels} predicts {info['num_classes']} classes on inputs {tuple(info['input_shape'])}, "
                f"but {bundle.name!r} has {len(bundle.classes)} classes and inputs {tuple(bundle.input_shape)}."
            )
    n_iter = iterations if cls.learns_images else 1
    say = log if log is not None else _stderr_log(progress)
    say(f"condense {method} ipc {ipc} on {bundle.name} ({dev.type}): {plan.describe()}")
    t0 = time.perf_counter()
    deadline = time.monotonic() + plan.budget_s if plan.budget_s else None
    train_hash = data_hash(bundle.train.x, bundle.train.y)
    condenser.preflight(model=mspec, data_name=bundle.name, data_hash=train_hash, input_shape=tuple(bundle.input_shape),
                        num_classes=len(bundle.classes), zca_eps=zca_eps if zca else None)
    x_ctx, mean_ctx, std_ctx, whitening = bundle.train.x, bundle.mean, bundle.std, None
    if zca:
        from attar.condense.zca import ZCA

        whitening = ZCA.fit(bundle.train.x, bundle.mean, bundle.std, zca_eps)
        x_ctx = torch.cat([whitening.whiten(bundle.train.x[i:i + 8192]) for i in range(0, len(bundle.train.x), 8192)])
        mean_ctx, std_ctx = torch.zeros_like(bundle.mean), torch.ones_like(bundle.std)
    left = (deadline - time.monotonic()) if deadline else None
    with StepProgress(f"condense {method} ipc {ipc}", n_iter, enabled=progress, unit="iterations",
                      budget_s=left) as bar:
        def step(i: int, m: dict[str, float]) -> None:
            if i == 0 and n_iter > 1:
                per = time.monotonic() - (ctx.loop_started or time.monotonic())
                eta = per * (n_iter - 1)
                if deadline:
                    eta = min(eta, max(0.0, deadline - time.monotonic()))
                say(f"  first iteration {per:.2f}s; ETA {fmt_duration(eta)}"
                    + (f" ({n_iter} iterations would take {fmt_duration(per * n_iter)})" if deadline and
                       per * n_iter > eta + per else ""))
            bar.update(1, **m)
            if on_step is not None:
                on_step(i, m)

        ctx = CondenseContext(
            x=x_ctx, y=bundle.train.y, num_classes=len(bundle.classes), ipc=ipc,
            iterations=iterations if cls.learns_images else 0, seed=seed, model=mspec,
            mean=mean_ctx, std=std_ctx, init=init, device=dev, on_step=step,
            flip=flip, data_name=bundle.name, data_hash=train_hash, zca=whitening, deadline=deadline,
        )
        out = condenser.run(ctx)
        if whitening is not None:
            out.x = whitening.unwhiten(out.x)
        if not cls.learns_images:
            bar.update(1)
    seconds = time.perf_counter() - t0
    soft = out.soft
    if teacher is not None:
        from attar.train.trainer import predict

        soft = predict(teacher, out.x).float()
    meta = {
        "method": method,
        "ipc": ipc,
        "seed": seed,
        "iterations": ctx.done if cls.learns_images else 0,
        **(plan.meta() | {"stopped_by_budget": ctx.stopped_by_budget} if cls.learns_images else {}),
        "init": init if cls.learns_images else "real",
        "params": condenser.p.model_dump(mode="json"),
        "model": mspec.model_dump(mode="json", exclude_none=True),
        "data_spec": spec.model_dump(mode="json"),
        "data_name": bundle.name,
        "data_hash": train_hash,
        "classes": list(bundle.classes),
        "input_shape": list(bundle.input_shape),
        "mean": bundle.mean.flatten().tolist(),
        "std": bundle.std.flatten().tolist(),
        "soft_label_teacher": str(soft_labels) if soft_labels is not None else None,
        "flip": bool(flip),
        "zca": whitening.info() if whitening is not None else None,
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(seconds / max(1, ctx.done if cls.learns_images else 1), 4),
        "torch": torch.__version__,
        "host": platform.node(),
        **({"selected_rows": out.extra["rows"]} if "rows" in out.extra else {}),
        **out.extra.get("meta", {}),
    }
    return save_synthetic(out_dir, SyntheticSet(out.x.float(), out.y.long(), meta, soft), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Evaluation protocol
# ----------------------------------------------------------------------------------------------
