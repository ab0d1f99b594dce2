"""A run's lifetime: one process per run folder (a lock file), and a clean stop on SIGTERM or Ctrl-C.

Why a lock: a run killed with SIGKILL (or by the out-of-memory killer) cannot record that it stopped,
so its store row would say ``running`` forever, and two processes resuming one run folder would write
the same checkpoints. ``<run>/run.lock`` holds the owner's PID, host and start time and is held with
``flock`` for the whole run; the kernel drops the lock when the process dies, however it dies. So
"row says running but nobody holds the lock" means the process is gone (:func:`lock_state`), and a
second process that finds the lock held is refused, naming the PID holding it (:func:`run_lock`).

Why a signal handler: SIGTERM (what ``kill``, schedulers and container runtimes send) would otherwise end
the process at once, losing the work since the last checkpoint and leaving the row ``running``. Under
:func:`stop_on_signals` the first SIGTERM or Ctrl-C asks the trainer to stop at the next step boundary
(:func:`graceful_stop` marks where it polls :func:`stop_requested`), where it writes a checkpoint and
raises :class:`RunInterrupted`; resuming from that checkpoint is exact because it holds the same state as
any periodic one. Outside a training loop, and on a second signal, :class:`RunInterrupted` is raised at
once, like Ctrl-C always did.

This module imports neither torch nor the store, so `attar runs list` stays fast.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from attar.errors import AttarError

LOCK_NAME = "run.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # some network file systems
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------- the run lock


def _read_holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    pid = info.get("pid", "?")
    host = info.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    since = f" (since {info['started']})" if info.get("started") else ""
    return f"process {pid}{where}{since}"


@contextmanager
def run_lock(run_dir: str | Path, wait_s: float = 1.0) -> Iterator[dict]:
    """Hold ``<run_dir>/run.lock`` until the block ends; AttarError naming the holder if another process has it.

    Waits up to ``wait_s`` first, so that a `runs list` probing the lock at the same instant does not refuse
    a legitimate resume. The file stays after the run (deleting it would let two processes lock two
    different files of the same name); only the ``flock`` on it says whether someone is running.
    """
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in _NO_FLOCK:  # a file system without locks: run unguarded, as before the lock existed
                    break
                if not isinstance(e, BlockingIOError):
                    raise
                if time.monotonic() >= deadline:
                    raise AttarError(
                        f"The run folder {run_dir} is in use by {_describe(_read_holder(path))}: its lock file "
                        f"{path} is held. Two processes must not run or resume one run at once, since they would "
                        "write the same checkpoints; wait for that process to finish, or stop it (`kill PID`, which "
                        "saves a checkpoint) and then resume."
                    ) from None
                time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield info
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def lock_state(run_dir: str | Path) -> bool | None:
    """True while a process holds the run's lock, False when none does, None when that cannot be told
    (the lock file exists but cannot be opened, e.g. another user's run folder without read access).

    A folder without a lock file counts as not held: every run since the lock existed takes it before its
    store row says ``running``, so such a row comes from a process that is gone.
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def lock_holder(run_dir: str | Path) -> dict | None:
    """The lock file's ``{pid, host, started}`` while it is held, else None."""
    return _read_holder(Path(run_dir) / LOCK_NAME) if lock_state(run_dir) else None


# ---------------------------------------------------------------- run folders


def read_run_json(run_dir: str | Path) -> dict:
    """A run folder's ``run.json`` (``run_id``, ``recipe``), or AttarError saying why the folder is not a run."""
    run_dir = Path(run_dir)
    hint = "Pass the folder of a run that `attar run` started (runs/<id>; `attar runs list` shows them)."
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise AttarError(f"Cannot resume {run_dir}: it {what}. {hint}")
    path = run_dir / "run.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AttarError(f"Cannot resume {run_dir}: it has no run.json, so it is not an attar run folder. {hint}") from None
    except (OSError, ValueError) as e:
        raise AttarError(f"Cannot resume {run_dir}: its {path.name} cannot be read ({e}). {hint}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("run_id"), str):
        raise AttarError(f"Cannot resume {run_dir}: {path} has no run_id, so it is not an attar run.json. {hint}")
    return meta


class DiskFullError(AttarError):
    """No space left while writing an artifact, checkpoint or store row; nothing was replaced."""


def no_space_error(path: str | Path | None, run_dir: str | Path | None = None) -> DiskFullError:
    where = f" while writing {path}" if path else ""
    resume = f" then resume with `attar run --resume {run_dir}`" if run_dir else " then run again"
    return DiskFullError(
        f"No space left on the device{where}. Every file is written to a temporary name and renamed only when "
        "complete, so nothing was replaced: the last good checkpoint and all earlier files are kept. Free some "
        f"space (or point ATTAR_HOME / --home at a larger disk),{resume}."
    )


# ---------------------------------------------------------------- SIGTERM and Ctrl-C


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or Ctrl-C. A KeyboardInterrupt, so ``except Exception`` never swallows it.

    ``checkpoint`` is the checkpoint written on the way out (None if none was), ``run_dir`` is filled in by
    the pipeline; ``exit_code`` is the shell convention 128 + signal number (143 for SIGTERM, 130 for Ctrl-C).
    """

    def __init__(self, signum: int, checkpoint: str | Path | None = None):
        super().__init__(signum)
        self.signum = signum
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.run_dir: str | None = None

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        saved = f"; checkpoint {self.checkpoint} saved" if self.checkpoint else ""
        return f"stopped by {self.signal_name}{saved}"


_state = {"installed": 0, "graceful": 0, "pending": None}


def _handler(signum, frame) -> None:
    if _state["graceful"] and _state["pending"] is None:
        _state["pending"] = signum  # the training loop stops at its next step boundary, after a checkpoint
        return
    raise RunInterrupted(signum)  # no loop to stop cleanly, or a second signal: stop now


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop the run cleanly while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _state["installed"] += 1
    try:
        yield
    finally:
        _state["installed"] -= 1
        for s, h in old.items():
            signal.signal(s, h)
        if not _state["installed"]:
            _state["pending"] = None


@contextmanager
def graceful_stop() -> Iterator[None]:
    """Mark a loop that polls :func:`stop_requested` at safe points (the trainer's step boundaries).

    A signal that arrives while the loop is inside is deferred to its next poll. If the block ends with a
    request still pending (it came after the last poll), the run stops right after the block.
    """
    _state["graceful"] += 1
    try:
        yield
    finally:
        _state["graceful"] -= 1
    if _state["pending"] is not None and not _state["graceful"]:
        raise RunInterrupted(_state["pending"])


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["pending"]
