"""TensorBoard event files of a stage's metrics: the numbers the run store records, where TensorBoard reads them.

Why a metric sink and not a loop callback: every route (train, distill, fine-tune, LM) already hands its metrics to
one sink, ``on_metrics(step, {name: value})`` (losses, learning rate and throughput every 10 steps; the epoch's
train loss, seconds and validation metrics; the test metrics at the end), and the run store records exactly those.
Writing the same calls to TensorBoard gives the same tags at the same steps for every route, with no loop of its
own. The caller (the run recorder) only writes on the main process, so a DDP run writes one set of files.

``tensorboard`` is an optional extra (``pip install 'attar[tensorboard]'``): :func:`require_tensorboard` says so in
one paragraph, and the pipeline calls it before a run folder exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from attar.errors import AttarError

INSTALL = "pip install 'attar[tensorboard]'"


def require_tensorboard(why: str) -> None:
    """Raise an :class:`AttarError` naming the install command unless TensorBoard's writer can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise AttarError(
            f"{why} asks for TensorBoard logging, but the `tensorboard` package is not installed ({e}). Install it "
            f"with `{INSTALL}` (or `pip install tensorboard` into attar's environment) and run again, or drop "
            "`log_to: [tensorboard]` / `--tensorboard`. Nothing was written."
        ) from None


class TensorBoardSink:
    """``sink(step, {tag: value})`` adds each value as a scalar at ``step`` to event files in ``folder``.

    A tag given twice at one step keeps the later value, as in the run store (at an epoch's last step the trainer
    reports the step's ``train_loss`` and then the epoch's mean): values wait until the step changes or the sink
    closes. The folder and its writer are made on the first write, so nothing is written before the stage starts.
    A resumed stage appends a new event file; the steps it replays since its last checkpoint are dropped by
    TensorBoard's reader (it purges the older events at a step it sees again).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._writer: Any = None
        self._step: int | None = None
        self._pending: dict[str, float] = {}

    def __call__(self, step: int, values: Mapping[str, Any]) -> None:
        if int(step) != self._step:
            self._flush()
            self._step = int(step)
        self._pending.update({tag: float(v) for tag, v in values.items()})

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder))
        for tag, value in self._pending.items():
            self._writer.add_scalar(tag, value, self._step)
        self._pending.clear()

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()  # flushes the file
            self._writer = None
