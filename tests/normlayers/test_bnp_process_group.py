"""BNP over a gloo process group: two ranks holding 3 and 5 samples of each batch of 8 keep the
statistics of the whole batch and take exactly the steps of one process; without a group each rank
keeps the statistics of its own slice."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("normlab_bnp_case", HERE / "bnp_case.py")
case = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(case)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_a_group_equal_one_process_and_without_keep_their_own(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    procs = [subprocess.Popen([sys.executable, str(HERE / "bnp_ddp_worker.py"), str(rank), "2", str(port),
                               str(tmp_path / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    whole = case.train(case.batches())
    for rank in ranks:
        for a, b in zip(rank["synced"]["params"], whole["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for name, (mu, var) in whole["stats"].items():
            torch.testing.assert_close(rank["synced"]["stats"][name][0], mu, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(rank["synced"]["stats"][name][1], var, rtol=1e-12, atol=1e-14)

    # local statistics: rank r's first-layer statistics are those of a process seeing only its slice
    for r, rank in enumerate(ranks):
        own = case.train(case.rank_slices(r))
        torch.testing.assert_close(rank["local"]["stats"]["0"][0], own["stats"]["0"][0], rtol=1e-12, atol=1e-14)
        assert not torch.allclose(rank["local"]["stats"]["0"][1], whole["stats"]["0"][1])
