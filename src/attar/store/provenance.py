"""Where runs live and what identifies one: run ids and folders, timestamps, content hashes, the git commit and
the environment a run was made in (recorded with every run, so a number can be traced to what produced it)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import secrets
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attar.errors import AttarError
from attar.paths import home as runs_home
from attar.paths import nearest_existing
from attar.store.schema import DB_NAME


def default_db_path(home: str | Path | None = None) -> Path:
    return runs_home(home) / DB_NAME


def check_home(home: str | Path) -> Path:
    """``home`` itself, or AttarError when it (or a folder above it) is a file, so no store can live there."""
    home = Path(home)
    p = nearest_existing(home)
    if not p.is_dir():
        raise AttarError(
            f"The runs folder {home} (ATTAR_HOME or --home) cannot be used: {p} is a file, not a folder. "
            "Point ATTAR_HOME or --home at a folder (it is created if missing), or move the file away."
        )
    return home


def now_iso() -> str:
    """UTC timestamp with seconds precision: sorts as text and reads well in a table."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(when: datetime | None = None) -> str:
    """``YYYYMMDD-HHMM-xxxx``: sorts by start time, short enough to type, unique enough with 4 hex."""
    when = when or datetime.now()
    return f"{when:%Y%m%d-%H%M}-{secrets.token_hex(2)}"


def make_run_dir(home: str | Path) -> tuple[str, Path]:
    """A new run id and its freshly created folder ``<home>/<id>``.

    Why the folder before the store row: the run takes its lock in the folder before its row says
    ``running``, so `attar runs list` never sees a running row without a lock (see attar.lifecycle).
    ``mkdir`` without ``exist_ok`` is the atomic test that no other run has the id.
    """
    check_home(home)
    for _ in range(50):
        rid = new_run_id()
        try:
            (Path(home) / rid).mkdir(parents=True)
        except FileExistsError:
            continue
        return rid, Path(home) / rid
    raise AttarError(f"Could not find a free run id in {home}.")  # pragma: no cover


def _sha256_file(path: Path, h: Any | None = None) -> tuple[str, int]:
    h = h or hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _is_temp_leftover(rel: Path) -> bool:
    # attar.checkpoint's atomic writes leave ".name.XXXX.tmp" only after a crash; never part of the artifact.
    return any(p.startswith(".") and p.endswith(".tmp") for p in rel.parts)


def hash_path(path: str | Path) -> tuple[str, int]:
    """sha256 and total bytes of a file, or of a folder's files.

    A folder's digest covers each regular file's relative POSIX path and content
    hash in sorted order, so it is the same on every machine and filesystem order.
    """
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    if not path.is_dir():
        raise AttarError(f"Artifact path {path} does not exist; the stage must write it before recording it.")
    outer = hashlib.sha256()
    total = 0
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and not p.is_symlink() and not _is_temp_leftover(p.relative_to(path))
    )
    for rel, p in files:
        digest, n = _sha256_file(p)
        total += n
        outer.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return outer.hexdigest(), total


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current ``HEAD`` commit, or None outside a git checkout or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """What a reader needs to reproduce a number: versions, platform, cores (and GPUs if torch is loaded)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "attar": _version("attar"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # never import torch just for this: it costs a second or more
    if torch is not None:
        try:
            if torch.cuda.is_available():
                env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken driver must not stop the run from being recorded
            pass
    return env
