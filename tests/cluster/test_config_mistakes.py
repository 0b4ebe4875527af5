"""Config mistakes are one line and exit 2, at plan time for a sweep: no traceback, nothing created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster import report, sweep_cli
from trainer.cli import main as train_main

MISTAKES = [
    ("trainer.accelerator=tpu", "trainer.accelerator: 'tpu' is not one of"),
    ("trainer.strategy=nonsense", "trainer.strategy: 'nonsense' is not one of"),
    ("data.path=${oc.env:NOPE}", "data.path: KeyError raised while resolving interpolation"),
    ("optim.lr=${optim.lr}", "optim.lr: Recursive interpolation detected"),
]
if not torch.cuda.is_available():
    MISTAKES.append(("trainer.accelerator=gpu", "trainer.accelerator: gpu but this machine has no GPU"))


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("override, message", MISTAKES)
def test_train_refuses_with_one_line_and_exit_2(override, message, capsys):
    assert train_main([override]) == 2
    assert message in _one_line_error(capsys)
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


@pytest.mark.parametrize("grid, message", [
    ({"trainer.accelerator": ["tpu"]}, "trainer.accelerator: 'tpu' is not one of"),
    ({"optim.lr": ["${nope.x}"]}, "optim.lr: Interpolation key 'nope.x' not found"),
    ({"data.path": ["${oc.env:NOPE}"]}, "data.path: KeyError raised while resolving interpolation"),
    ({"trainer.strategy": ["nonsense"]}, "trainer.strategy: 'nonsense' is not one of"),
])
def test_a_sweep_with_a_mistake_fails_at_plan_time(grid, message, write_sweep, capsys):
    path = write_sweep("mistake", grid, {"kind": "local"})
    for command in ("plan", "submit"):
        assert sweep_cli.main([command, str(path)]) == 2
        assert message in _one_line_error(capsys)
    assert not Path("mlflow.db").exists()


def test_a_sweep_file_that_is_not_text(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    assert sweep_cli.main(["plan", str(path)]) == 2
    assert "not a text file" in _one_line_error(capsys)


def test_report_into_a_directory_that_cannot_be_written(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("exp")
    capsys.readouterr()  # MLflow's own lines while creating the store
    Path("a-file").write_text("")
    assert report.main(["exp", "--tracking-uri", uri, "--no-log", "--out", "a-file/report"]) == 2
    assert "cannot write the report to a-file/report" in _one_line_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert report.main(["exp", "--tracking-uri", uri, "--no-log", "--out", str(locked)]) == 2
        assert "is not writable" in _one_line_error(capsys)


@pytest.mark.parametrize("override, named", [
    ("output.root=a-file/runs", "output.root: cannot write in a-file/runs"),
    ("tracking.uri=sqlite:///a-file/mlflow.db", "a-file is a file, not a directory"),
    ("tracking.uri=file://{cwd}/a-file/mlruns", "a-file is a file, not a directory"),
])
def test_a_directory_that_cannot_be_written_is_one_line_and_nothing_is_created(override, named, capsys):
    Path("a-file").write_text("")
    assert train_main(["model.depth=8", override.format(cwd=Path.cwd())]) == 2
    assert named in _one_line_error(capsys)
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["a-file"]  # no mlflow.db, no runs/, no mlruns/


def test_submit_into_an_output_root_that_cannot_be_written(write_sweep, capsys):
    Path("a-file").write_text("")
    path = write_sweep("unwritable", {"model.norm": ["bn"]}, {"kind": "local"}, overrides={"output.root": "a-file/r"})
    assert sweep_cli.main(["submit", str(path)]) == 2
    assert "cannot write in" in _one_line_error(capsys)
    assert not Path("mlflow.db").exists()
