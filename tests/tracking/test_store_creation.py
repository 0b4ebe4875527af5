"""Two processes creating a new SQLite tracking store at the same moment both succeed (MLflow's schema
migration would otherwise race: "duplicate column name")."""

from __future__ import annotations

import subprocess
import sys

CREATE = "import sys; from cluster.tracking import ensure_experiment; ensure_experiment(sys.argv[1], sys.argv[2])"


def test_two_first_creations_of_a_store_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    for attempt in range(1):
        store = f"{uri[:-3]}{attempt}.db"
        procs = [subprocess.Popen([sys.executable, "-c", CREATE, store, f"sweep-{n}"], stderr=subprocess.PIPE,
                                  text=True) for n in range(2)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e[-600:] for e in errors]
