"""Names that become paths, and deletes that must stay inside the run's own folder.

Why: a stage name is a folder under the run, and finishing a stage replaces or deletes folders under it.
A name such as ``/home/me/thesis`` or ``../..`` (or a symlink planted inside the run folder) would turn
those deletes loose on the user's files. Names are checked when a recipe loads; every delete or replace
inside a run goes through :func:`confined` / :func:`remove_tree`, which resolve the path and refuse
anything that lands outside the root.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from attar.errors import AttarError

def home(explicit: str | Path | None = None) -> Path:
    """Where runs, ``runs.db`` and shared caches live: ``explicit`` (``--home``), else ``$ATTAR_HOME``, else ``./runs``.

    The one reader of ``ATTAR_HOME``, so every command agrees on it."""
    return Path(explicit) if explicit else Path(os.environ.get("ATTAR_HOME") or "runs")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a file-system name, or None when it can.

    Allowed: 1-64 characters of letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit
    (so no separators, no ``..``, no hidden names, nothing a shell or another OS reads specially)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} cannot be used as a folder name: use 1-64 letters, digits, '_', '.' or '-', starting with "
                "a letter or digit, with no '/' and no '..' (e.g. teacher, student_kd, merge-1)")
    return None


def confined(root: str | Path, path: str | Path, what: str = "path") -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies inside ``root`` (also resolved)."""
    root_r = Path(root).resolve()
    path_r = Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise AttarError(
            f"{what} {path} resolves to {path_r}, outside {root_r}; attar only writes and deletes inside the run's "
            "own folder. Remove the symlink (or the odd name) that leads out of it."
        )
    return path_r


def check_no_symlinks(root: str | Path, path: str | Path) -> None:
    """Refuse when ``path`` or anything inside it is a symlink (attar never makes any in a run folder)."""
    path = Path(path)
    confined(root, path)
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise AttarError(f"{path} is a symlink; attar will not write through it. Remove it and resume.")
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                raise AttarError(f"{p} is a symlink inside the run folder; attar will not write or delete through it. "
                                 "Remove it and resume.")


def remove_tree(path: str | Path, root: str | Path) -> None:
    """``shutil.rmtree(path)`` only when ``path`` is a real folder inside ``root``; missing is fine."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise AttarError(f"{path} is a symlink; attar will not delete through it. Remove the link and retry.")
    confined(root, path)
    shutil.rmtree(path)


def nearest_existing(path: str | Path) -> Path:
    """``path`` or its closest ancestor that exists: where creating ``path`` (``mkdir -p``) would start."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists())


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be created: the path or a parent is a file."""
    path = Path(path)
    p = nearest_existing(path)
    if not p.is_dir():
        where = "is a file" if p == path else f"lies under {p}, which is a file"
        raise AttarError(f"{what} {path} {where}, so no output folder can be made there; choose another path.")
    if not os.access(p, os.W_OK | os.X_OK):
        raise AttarError(f"{what} {path}: you cannot write in {p}; choose a folder you can write to.")
    return path
