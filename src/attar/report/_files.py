"""Small file helpers shared by the report writers."""

from __future__ import annotations

from pathlib import Path

from attar.checkpoint import atomic_write_bytes


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file + rename, so a viewer refreshing the report never sees half a file.

    The shared writer gives the file the user's umask mode, so a colleague sharing the runs folder can read it.
    """
    atomic_write_bytes(path, data)
