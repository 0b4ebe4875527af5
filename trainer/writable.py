"""Whether a directory can be made and written, asked before anything is created in it."""

from __future__ import annotations

import os
from pathlib import Path


def cannot_write(folder: Path) -> str | None:
    """Why ``folder`` (existing or to be created) cannot be written (one phrase), else None; creates nothing."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def store_folder(uri: str) -> Path | None:
    """The local directory a SQLite or file:// tracking store writes in, else None (a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri:
        return Path(uri)
    return None
