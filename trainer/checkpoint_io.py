"""Checkpoints that a kill cannot damage, and a damaged one that does not stop the run.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temp file
under ``$TMPDIR`` and are *moved* into place, which across filesystems (node-local ``$TMPDIR``, the
usual cluster set-up) is a copy: killed during it, ``last.ckpt`` is left truncated. Here the temp
file lies beside the checkpoint (same filesystem), is fsynced, and is renamed over it; before that
the previous checkpoint is kept as ``<name>.prev`` (a hard link: the rename never leaves a moment
without a complete checkpoint).

On resume, :func:`resumable` picks the newest checkpoint that loads: ``last.ckpt``, else its
``.prev``; a damaged one is named in one line and never reaches Lightning's 40-line traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

PREVIOUS_SUFFIX = ".prev"
PARTIAL_SUFFIX = ".partial"


def previous_of(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write temp-beside, fsync, keep the previous as ``.prev``, rename (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: Lightning's way
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if path.is_file():
                previous, linked = previous_of(path), path.with_name(f".{path.name}.{os.getpid()}.prev-link")
                with contextlib.suppress(FileNotFoundError):
                    linked.unlink()
                os.link(path, linked)
                os.replace(linked, previous)
            os.replace(partial, path)
            _fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            with contextlib.suppress(FileNotFoundError):
                previous_of(Path(path)).unlink()


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (one short phrase), or None if it loads."""
    if path.stat().st_size == 0:
        return "it is empty"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, garbage bytes, EOF: all mean the same to the run
        reason = str(error).strip().splitlines()
        return f"{type(error).__name__}: {reason[0][:120] if reason else 'unreadable'}"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "it is not a Lightning checkpoint"
    return None


def resumable(path: Path, who: str = "normlab train") -> Path | None:
    """The checkpoint to resume from: ``path`` if it loads, else its ``.prev`` if that does, else None.

    A damaged checkpoint is reported in one line on stderr and moved aside (``<name>.damaged``), so
    that the next save does not keep it as the previous good one."""
    for stale in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):  # a save that was killed
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    candidates = [p for p in (path, previous_of(path)) if p.is_file()]
    for n, candidate in enumerate(candidates):
        reason = _unreadable(candidate)
        if reason is None:
            return candidate
        rest = candidates[n + 1:]
        then = f"resuming from {rest[0]}" if rest else "starting the run again from the beginning"
        print(f"{who}: checkpoint {candidate} is unreadable ({reason}); {then}", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):  # another rank of the run moved it first
            os.replace(candidate, candidate.with_name(candidate.name + ".damaged"))
    return None
