"""At most one job trains a run key: a lease per run key, and one submit of a sweep at a time.

The lease is ``<output.root>/<run_key>/lease.json`` (the run directory is the key's, whichever sweep
trains it), naming its holder: host, pid and job id. It is taken and checked under an ``flock`` of
``<run_dir>/lease.lock``, so two jobs cannot both take it. The holder refreshes the file's mtime every
``HEARTBEAT_S`` seconds while it holds it. A crashed holder cannot keep it: the lease is free again when
its process is gone (same host) or its heartbeat is older than ``STALE_S`` (another host: a killed
node, a job killed by Slurm).

``submit`` of one sweep is serialised by an ``flock`` of ``<sweep folder>/submit.lock`` held from
reading the sweep's state to recording the jobs, so two submits at the same moment never queue a run
twice; the job's lease covers the rest (two sweeps sharing a point, a submit while a job still runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from trainer.locks import file_lock

LEASE_FILE, LOCK_FILE = "lease.json", "lease.lock"
SUBMIT_LOCK = "submit.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_holder(run_dir: Path) -> str | None:
    """Who holds the lease of ``run_dir`` now (one phrase), or None: for ``sweep status``, which takes nothing."""
    holder = RunLease(run_dir, "")._holder()
    return None if holder is None else f"job {holder.get('job')} (pid {holder.get('pid')} on {holder.get('host')})"


class RunLease:
    """The lease of one run directory, held by this process for ``job``."""

    def __init__(self, run_dir: Path, job: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _holder(self) -> dict | None:
        """The live holder other than this process, or None."""
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        if holder.get("host") == self.me["host"]:
            if holder.get("pid") == self.me["pid"] or not _pid_alive(int(holder.get("pid", -1))):
                return None
            return holder
        return holder if age < STALE_S else None

    def acquire(self) -> str | None:
        """Take the lease; None when taken, else who holds it (one phrase)."""
        with file_lock(self.run_dir / LOCK_FILE):
            holder = self._holder()
            if holder is not None:
                return f"job {holder.get('job')} (pid {holder.get('pid')} on {holder.get('host')})"
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(self.me))
            partial.replace(self.path)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        with file_lock(self.run_dir / LOCK_FILE):
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return
            if holder == self.me:
                self.path.unlink()
