"""Random-kill soak: `normlab train` killed with SIGKILL at random points N times, then let finish, ends as
one MLflow run with every metric step logged exactly once and the final weights of the uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from trainer import load_config, train

KILLS = 4  # N: kept small for CI (each restart pays the start-up of torch and Lightning)
ARGS = ["model.arch=cifar_resnet", "model.depth=8", "model.width=4", "data.batch_size=32", "trainer.accelerator=cpu",
        "trainer.max_epochs=8", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
        "trainer.deterministic=true", "probes.every_n_steps=3", "trainer.log_every_n_steps=2"]


def test_random_kills_then_finish_equal_the_uninterrupted_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole = train(load_config(None, [*ARGS, f"tracking.uri={uri}", "tracking.experiment=whole",
                                     f"output.root={tmp_path / 'whole'}"]))
    args = [*ARGS, f"tracking.uri={uri}", "tracking.experiment=soak", f"output.root={tmp_path / 'soak'}"]
    run_dir = tmp_path / "soak" / whole.run_key
    # kills land inside the run at any machine speed: each waits for its process to reach training, then
    # sleeps a random share of the uninterrupted run's own MLflow run time (its fit, without start-up)
    info = MlflowClient(uri).get_run(whole.run_id).info
    duration = (info.end_time - info.start_time) / 1000
    normlab = Path(sys.executable).with_name("normlab")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process run above (tests/conftest.py): same kernels
    rng = random.Random(int(os.environ.get("NORMLAB_SOAK_SEED", "0")))
    kills = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([str(normlab), "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stderr), daemon=True)
        reader.start()
        fresh = not (run_dir / "mlflow_run_id").exists()

        def training(fresh=fresh, lines=lines) -> bool:
            # a new run has its MLflow run id once training starts; a resumed one says it is resuming
            return (run_dir / "mlflow_run_id").exists() if fresh else any("resuming run" in line for line in lines)

        deadline = time.monotonic() + 240
        while not training() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the kill falls inside training, not its start-up
        time.sleep(rng.uniform(0.05, 0.35) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        reader.join(timeout=60)
        if (run_dir / "result.json").exists():
            break
    final = subprocess.run([str(normlab), "train", *args], capture_output=True, text=True, timeout=300, env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 2, kills

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("soak").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["normlab.status"] == "finished"
    reference = client.get_run(whole.run_id).data.metrics
    assert set(runs[0].data.metrics) == set(reference)
    for name in reference:
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, name)]
        expected = [m.step for m in client.get_metric_history(whole.run_id, name)]
        assert len(steps) == len(set(steps)) and sorted(steps) == sorted(expected), (name, steps, expected)
    a = torch.load(Path(whole.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
