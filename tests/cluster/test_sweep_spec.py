"""Sweep files: expansion, run keys, the executor block and bad input, without any cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import sweep_cli
from cluster.sweep import SweepError, load_sweep
from trainer.config import load_config, run_key

REPO = Path(__file__).resolve().parents[2]


def test_grid_zip_and_seeds_expand_to_their_product(write_sweep):
    path = write_sweep(
        "expand", {"model.norm": ["bn", "gn:groups=2"]}, {"kind": "local"},
        zip={"data.batch_size": [8, 32], "optim.lr": [0.05, 0.2]}, seeds=[0, 1, 2],
    )
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2 * 2 * 3
    combos = {(r.values["model.norm"], r.values["data.batch_size"], r.values["optim.lr"], r.values["seed"])
              for r in sweep.runs}
    assert ("gn:groups=2", 32, 0.2, 2) in combos and ("bn", 8, 0.05, 0) in combos
    assert not any(c[1] == 8 and c[2] == 0.2 for c in combos)  # zipped lists move together
    # Every run's key is the trainer's own run key of the config load_config builds for it.
    for run in sweep.runs[:3]:
        assert run.key == run_key(load_config(None, run.overrides))
        assert run.cfg.data.batch_size == run.batch_size
    assert len({r.key for r in sweep.runs}) == len(sweep.runs)
    # The experiment and the absolute tracking URI are pinned into every run.
    assert sweep.experiment == "expand" and sweep.tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    assert sweep.runs[0].cfg.tracking.experiment == "expand"


def test_plan_is_cached_and_follows_edits(write_sweep, capsys):
    path = write_sweep("cached", {"model.norm": ["bn", "frn"]}, {"kind": "local"})
    first = load_sweep(path)
    assert (first.folder / "plan.json").is_file()
    again = load_sweep(path)
    assert [r.key for r in again.runs] == [r.key for r in first.runs]
    # An edit to the file is a new plan, validated again.
    path.write_text(path.read_text().replace("frn", "gn:groups=3"))
    with pytest.raises(SweepError, match=r"run 1 \(model.norm=gn:groups=3\): model.norm"):
        load_sweep(path)
    assert sweep_cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run 1 (model.norm=gn:groups=3)" in err and "model.norm" in err


@pytest.mark.parametrize(
    "grid, executor, top, message",
    [
        ({"model.norm": ["bn"]}, {"kind": "local", "gpus": 1}, {}, "unknown executor key(s) gpus"),
        ({"model.norm": []}, {"kind": "local"}, {}, "expands to zero runs"),
        ({"model.norm": ["bn"]}, {"kind": "local"}, {"seeds": []}, "expands to zero runs"),
        ({"model.norm": ["bn"], "data.batch_size": [8, -4]}, {"kind": "local"}, {},
         "run 1 (model.norm=bn, data.batch_size=-4): data.batch_size"),
        ({"model.nrom": ["bn"]}, {"kind": "local"}, {}, "run 0 (model.nrom=bn): model.nrom"),
        ({"model.norm": ["bn"]}, {"kind": "cloud"}, {}, "executor.kind='cloud'"),
        ({"model.norm": ["bn"]}, {"kind": "local", "runs_per_job": 0}, {}, "executor.runs_per_job=0"),
        ({"model.norm": ["bn"]}, {"kind": "local"}, {"zip": {"optim.lr": [0.1, 0.2], "seed": [1]}},
         "equal lengths"),
    ],
)
def test_bad_sweeps_exit_2_with_one_line_and_submit_nothing(write_sweep, capsys, grid, executor, top, message):
    path = write_sweep("bad", grid, executor, **top)
    assert sweep_cli.main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (Path("runs") / "sweeps" / "bad" / "jobs.json").exists()
    assert not Path("runs").exists() or not any(p.name != "sweeps" for p in Path("runs").iterdir())


def test_multi_device_runs_need_slurm_with_one_task_per_device(write_sweep):
    path = write_sweep("ddp", {"model.norm": ["bn"]}, {"kind": "local"}, overrides={"trainer.devices": 2})
    with pytest.raises(SweepError, match="needs executor.kind: slurm"):
        load_sweep(path)
    path = write_sweep("ddp", {"model.norm": ["bn"]}, {"kind": "slurm", "tasks_per_node": 1},
                       overrides={"trainer.devices": 2})
    with pytest.raises(SweepError, match="tasks_per_node=1"):
        load_sweep(path)


def test_shipped_sweep_files_load(tmp_path):
    demo = load_sweep(REPO / "configs" / "sweeps" / "demo.yaml")
    assert len(demo.runs) == 54 and demo.executor.kind == "local"
    assert {r.norm.partition(":")[0] for r in demo.runs} == {"bn", "bgn", "brn", "gn", "frn", "none"}
    # the GN paper's protocol: one global batch, the statistics batch set by the virtual devices, one step budget
    configs = [r.cfg for r in demo.runs]
    assert {c.data.batch_size for c in configs} == {64} and {c.trainer.max_steps for c in configs} == {500}
    for norm in ("bn", "bgn", "brn"):
        per_device = {64 // r.cfg.trainer.virtual_devices for r in demo.runs if r.norm.startswith(norm)}
        assert per_device == {2, 4, 8, 16, 32}, norm
    # an MLP: each of bn's statistics is over the per-device batch alone
    assert {c.model.arch for c in configs} == {"mlp"}
    # without augmentation: the random shift kept the MLP from converging in the budget
    assert {c.data.augment for c in configs} == {False}
    # the budget check is the demo at twice the steps, same settings and seeds, nothing else changed
    check = load_sweep(REPO / "configs" / "sweeps" / "demo_budget_check.yaml")
    assert [(r.values, r.cfg.seed) for r in check.runs] == [(r.values, r.cfg.seed) for r in demo.runs]
    for ours, doubled in zip((r.cfg for r in demo.runs), (r.cfg for r in check.runs), strict=True):
        assert doubled.trainer.max_steps == 2 * ours.trainer.max_steps
        doubled.trainer.max_steps = ours.trainer.max_steps
        doubled.tracking.experiment = ours.tracking.experiment
        assert doubled == ours
    # The CIFAR sweeps name data/cifar10 under the current directory: give them the file names they check.
    cifar = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"")
    regimes = load_sweep(REPO / "configs" / "sweeps" / "batch_regimes.yaml")
    assert {r.batch_size for r in regimes.runs} >= {2, 1024} and regimes.executor.kind == "slurm"
    assert {"bn", "gn", "bgn", "frn", "brn", "ghost", "ln", "in"} <= {r.norm.partition(":")[0] for r in regimes.runs}
    stability = load_sweep(REPO / "configs" / "sweeps" / "lr_stability.yaml")
    values = sorted({r.values["optim.lr"] for r in stability.runs})
    assert values[-1] / values[0] >= 1000
