"""Writing files and folders so a kill at any instant leaves the old version or the whole new one.

Why one module: every artifact attar writes (checkpoints, models, reports, merged shards, caches) needs the
same three properties: atomic (temp name, fsync, rename), readable by others as the user's umask allows
(never mkstemp's 0600), and the path named when the disk is full. Folders are staged beside their destination
and renamed into place (:func:`staged_folder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_name(parent: Path, prefix: str, suffix: str, create) -> Path:
    for _ in range(100):
        p = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(p)
            return p
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name like {prefix}*{suffix} in {parent}")


def make_temp_file(parent: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """``tempfile.mkstemp`` with the mode every artifact should have: ``0o666 & ~umask``.

    Why: mkstemp creates files 0600 and a rename keeps that mode, so reports and models written
    through a temp file were unreadable to anyone sharing the runs folder. ``os.open(..., 0o666)``
    lets the kernel apply the umask (and default ACLs); nothing reads or changes the process umask.
    Returns an open write descriptor and the path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    fds: list[int] = []
    path = _fresh_name(Path(parent), prefix, suffix, lambda p: fds.append(os.open(p, flags, 0o666)))
    return fds[0], path


def make_temp_dir(parent: str | Path, prefix: str, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` with mode ``0o777 & ~umask`` instead of 0700 (see :func:`make_temp_file`)."""
    return _fresh_name(Path(parent), prefix, suffix, lambda p: os.mkdir(p, 0o777))


def apply_umask(*paths: str | Path) -> None:
    """Give ``paths`` (folders: with everything in them) the modes a plain write would:
    files ``0o666 & ~umask``, folders ``0o777 & ~umask``.

    Why: third-party writers (safetensors' ``save_file``, hence ``save_pretrained``) create files 0600
    through their own temp files. Call this on what they wrote, before a staging folder is renamed into place.
    The modes come from a probe file and folder made beside the first path, so the umask is never changed.
    """
    if not paths:
        return
    first = Path(paths[0])
    where = first if first.is_dir() else first.parent
    fd, probe = make_temp_file(where, ".umask-probe.")
    os.close(fd)
    try:
        file_mode = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    probe = make_temp_dir(where, ".umask-probe.")
    try:
        dir_mode = probe.stat().st_mode & 0o777
    finally:
        probe.rmdir()
    for top in map(Path, paths):
        for p in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else ())]:
            if not p.is_symlink():
                os.chmod(p, dir_mode if p.is_dir() else file_mode)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The file gets the user's umask mode (:func:`make_temp_file`), like a plain ``open(path, "wb")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write (e.g. disk full) says which file it was writing
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




@contextlib.contextmanager
def staged_folder(dest: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``dest``; when the block succeeds it becomes ``dest`` (an existing
    ``dest`` is replaced only with ``replace``), when it fails it is removed. Readers never see a half folder.

    The old ``dest`` is first renamed aside and deleted only after the new one is in place, so a kill in
    between leaves at most a hidden ``.old`` folder, never a missing or torn ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        yield tmp
        apply_umask(tmp)  # third-party writers inside may have made 0600 files
        commit_folder(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_folder(tmp: Path, dest: Path, replace: bool = True) -> Path:
    """Rename the finished staging folder ``tmp`` (a sibling of ``dest``) into place: the step that makes a
    staged folder (:func:`staged_folder`, a streamed merge's shards) appear whole. An existing ``dest`` is renamed
    aside first and deleted only once the new one is in place."""
    _fsync_dir(tmp)
    if dest.exists():
        if not replace:
            raise FileExistsError(f"{dest} exists")
        trash = make_temp_dir(dest.parent, prefix=f".{dest.name}.", suffix=".old")
        os.replace(dest, trash / "old")
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest
