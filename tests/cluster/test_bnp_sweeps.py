"""The BNP study files plan: bnp (norm none + precondition bnp), bn, gn and none at every batch size,
from 1 (online learning) up to 128, and `normlab report` labels the bnp runs apart from none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cluster.report import norm_label
from cluster.sweep import load_sweep
from cluster.sweep_cli import main as sweep_cli

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
_spec = importlib.util.spec_from_file_location("normlab_study_sweeps", Path(__file__).parent / "test_study_sweeps.py")
studies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(studies)


@pytest.mark.parametrize("name,runs,batches", [
    ("bnp_batch_regimes.yaml", 96, [1, 2, 4, 8, 16, 32, 64, 128]),
    ("bnp_digits.yaml", 20, [1, 4, 16, 64, 128]),
])
def test_bnp_sweeps_plan_every_method_at_every_batch(name, runs, batches, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR10_DIR", str(studies.fake_cifar10(tmp_path / "cifar10")))
    assert sweep_cli(["plan", str(SWEEPS / name)]) == 0, capsys.readouterr().err
    assert f"\n{runs} runs in sweep '{name.removesuffix('.yaml')}'" in capsys.readouterr().out
    sweep = load_sweep(SWEEPS / name)
    labels = {}
    for run in sweep.runs:
        params = {"optim.precondition": run.cfg.optim.precondition, "model.norm_placement": "all"}
        labels.setdefault(norm_label(str(run.cfg.model.norm), params), set()).add(run.cfg.data.batch_size)
    assert labels == {label: set(batches) for label in ("bnp", "bn", "gn:groups=4" if "digits" in name
                                                          else "gn:groups=8", "none")}


def test_report_labels():
    assert norm_label("none", {"optim.precondition": "bnp"}) == "bnp"
    assert norm_label("bn", {"optim.precondition": "bnp"}) == "bn+bnp"
    assert norm_label("none", {"optim.precondition": "none"}) == "none"
    assert norm_label("none", {}) == "none"  # runs from before the option


def test_normlab_norms_lists_bnp_with_its_options(capsys):
    from cluster.norms_cli import main

    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("bnp ")]
    assert "Batch Normalization Preconditioning" in lines[at] and "optim.precondition=bnp" in lines[at]
    assert lines[at + 1].split("options: ")[1] == "optim.bnp_momentum=0.1, optim.bnp_eps=0.1, optim.bnp_skip=()"
