"""What the MLflow UI shows: run names read from the sweep cell, distinct within a sweep (also within a
packed job), and experiments tagged as model training so MLflow 3 opens them on their runs."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from cluster import demo
from cluster.run_names import cell_run_name, sweep_run_names
from cluster.sweep import SweepRun, load_sweep
from trainer import tracking
from trainer.cli import main as train_main


def test_a_packed_local_sweep_names_its_runs_by_cell(write_sweep, capsys):
    path = write_sweep("names", {"model.norm": ["bn", "gn:groups=2"]},
                       {"kind": "local", "runs_per_job": 2, "array_parallelism": 1, "cpus_per_task": 2},
                       seeds=[0, 1])
    assert demo.main(["--sweep", str(path), "--out", "report"]) == 0, capsys.readouterr().err
    sweep = load_sweep(path)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name("names")
    # the demo's link opens the runs table in the model-training view
    assert (f"open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
            in capsys.readouterr().out)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_EXPERIMENT_KIND
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "run_key" in r.data.tags]
    assert len(runs) == 4
    names = {r.data.tags["run_key"]: r.info.run_name for r in runs}
    assert sorted(names.values()) == sorted(f"{norm} b16 s{seed}" for norm in ("bn", "gn:groups=2")
                                            for seed in (0, 1))
    assert len(set(names.values())) == 4
    for run in sweep.runs:
        assert names[run.key] == f"{run.norm} b{run.batch_size} s{run.values['seed']}"


def test_cell_names_show_lr_seed_and_other_axes_and_stay_unique():
    assert cell_run_name("bn", 2, {"model.norm": "bn", "optim.lr": 0.1, "seed": 0}) == "bn b2 lr0.1 s0"
    assert cell_run_name("gn:groups=8", 4, {"model.depth": 20, "seed": 1}) == "gn:groups=8 b4 s1 depth=20"
    # two cells differing only in a value the name shortens alike get their index
    runs = [SweepRun(0, {"x.tag": "a b"}, [], "k0", "bn", 2), SweepRun(1, {"y.tag": "a b"}, [], "k1", "bn", 2)]
    assert sweep_run_names(runs) == {"k0": "bn b2 tag=a b #0", "k1": "bn b2 tag=a b #1"}


def test_an_existing_experiment_is_marked_and_a_marked_kind_is_kept(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plain = client.create_experiment("plain")
    assert tracking.ensure_experiment(client, "plain") == plain
    assert client.get_experiment(plain).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_EXPERIMENT_KIND
    genai = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(client, "genai")
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_single_training_run_marks_the_experiment_it_creates(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["model.depth=8", "model.width=4", "data.batch_size=16", "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            f"tracking.uri={uri}", "tracking.experiment=single", f"output.root={tmp_path / 'runs'}"]
    assert train_main(argv) == 0, capsys.readouterr().err
    experiment = MlflowClient(uri).get_experiment_by_name("single")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_EXPERIMENT_KIND
