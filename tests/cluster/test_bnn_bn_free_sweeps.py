"""The BN-free binary study files chain up: every step-1 run names (``with:``) the teacher run of the
teacher file, every step-2 run the step-1 run it starts from; a step whose predecessor is not trained
is refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.sweep import SweepError, load_sweep
from trainer.checkpoints import resolve_checkpoint
from trainer.config import load_config

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"


def configs(sweep) -> dict[str, object]:
    """Each run's config by key, from the sweep's base file and the run's overrides (as a job builds it)."""
    return {r.key: load_config(sweep.base, r.overrides) for r in sweep.runs}


def fake_checkpoints(keys: set[str], root: Path) -> None:
    """Stand-ins for trained runs: the keys a checkpoint needs, no weights."""
    for key in keys:
        (root / key / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}}, root / key / "checkpoints" / "last.ckpt")


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    for sub, files in (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
                       ("cifar-100-python", ["train", "test"])):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for name in files:
            (tmp_path / "data" / sub / name).write_bytes(b"")
    monkeypatch.setenv("CIFAR_ROOT", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("prefix, teachers, students", [("bnn_bn_free", 2, 12), ("bnn_bn_free_digits", 1, 6)])
def test_teacher_step1_step2_chain(prefix, teachers, students, cifar_root):
    runs = Path("runs")
    teacher = load_sweep(SWEEPS / f"{prefix}_teacher.yaml")
    teacher_keys = {r.key for r in teacher.runs}
    assert len(teacher.runs) == len(teacher_keys) == teachers
    with pytest.raises(SweepError, match="model.teacher: .* is run [0-9a-f]{12}, which has no .*; train it first"):
        load_sweep(SWEEPS / f"{prefix}_step1.yaml")
    fake_checkpoints(teacher_keys, runs)
    step1 = configs(load_sweep(SWEEPS / f"{prefix}_step1.yaml"))
    assert len(step1) == students
    assert {resolve_checkpoint(c.model.teacher, c, "teacher").parts[-3] for c in step1.values()} == teacher_keys
    assert {c.model.binary for c in step1.values()} == {"activations"}
    assert {(c.model.norm, c.model.weight_std, c.trainer.gradient_clip_algorithm) for c in step1.values()} \
        == {("bn", "none", "norm"), ("none", "scaled_ws", "agc"), ("none", "none", "norm")}
    with pytest.raises(SweepError, match="model.init_from: .* which has no"):
        load_sweep(SWEEPS / f"{prefix}_step2.yaml")
    fake_checkpoints(set(step1), runs)
    step2 = configs(load_sweep(SWEEPS / f"{prefix}_step2.yaml"))
    starts = {key: resolve_checkpoint(c.model.init_from, c, "init_from").parts[-3] for key, c in step2.items()}
    assert set(starts.values()) == set(step1) and len(starts) == students
    for key, c in step2.items():  # each starts from the step-1 run of its own dataset, variant and seed
        origin = step1[starts[key]]
        assert (c.seed, c.data.name, c.model.norm, c.model.weight_std, c.model.teacher) == \
            (origin.seed, origin.data.name, origin.model.norm, origin.model.weight_std, origin.model.teacher)
        assert c.model.binary == "weights_and_activations" and c.optim.weight_decay == 0
