"""The study sweep files pass `normlab sweep plan` (with fake data where they need data, a one-line
data.path error without it), and the ResNet-50 file gives the GN paper's lr = 0.1 x N/32."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.sweep import load_sweep
from cluster.sweep_cli import main as sweep_cli
from trainer.module import effective_lr

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
RUN_COUNTS = {
    "batch_regimes_resnet50.yaml": 30,
    "understanding_bn_resnet110.yaml": 36,
    "final_placement.yaml": 30,
    "batch_regimes_digits.yaml": 40,
    "understanding_bn_digits.yaml": 36,
    "final_placement_digits.yaml": 30,
    "bn_init_scale_digits.yaml": 12,
}
DATA_ENV = {"batch_regimes_resnet50.yaml": "IMAGENET_DIR", "understanding_bn_resnet110.yaml": "CIFAR10_DIR",
            "final_placement.yaml": "CIFAR10_DIR"}


def fake_imagenet(root: Path) -> Path:
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"n0{c}").mkdir(parents=True)
            Image.fromarray(np.full((20, 24, 3), 60 * c, np.uint8)).save(root / split / f"n0{c}" / "a.JPEG")
    return root


def fake_cifar10(root: Path) -> Path:
    """The python version's layout (cifar-10-batches-py/) with a handful of images per batch."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (batches / name).write_bytes(pickle.dumps(batch))
    return root


@pytest.fixture
def data_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(fake_imagenet(tmp_path / "imagenet")))
    monkeypatch.setenv("CIFAR10_DIR", str(fake_cifar10(tmp_path / "cifar10")))
    return tmp_path


@pytest.mark.parametrize("name", list(RUN_COUNTS))
def test_study_sweep_plans(name, data_dirs, capsys):
    rc = sweep_cli(["plan", str(SWEEPS / name)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"\n{RUN_COUNTS[name]} runs in sweep '{name.removesuffix('.yaml')}'" in out.out
    sweep = load_sweep(SWEEPS / name)
    if name.endswith("_digits.yaml"):
        assert sweep.executor.kind == "local" and all(run.cfg.trainer.accelerator == "cpu" for run in sweep.runs)
    if name in DATA_ENV:  # the data path comes from the environment variable
        folder = {"IMAGENET_DIR": "imagenet", "CIFAR10_DIR": "cifar10"}[DATA_ENV[name]]
        assert {str(run.cfg.data.path) for run in sweep.runs} == {str(data_dirs / folder)}


@pytest.mark.parametrize("name, message", [
    ("batch_regimes_resnet50.yaml", "data.path: data/imagenet does not exist (expected train/ and val/"),
    ("understanding_bn_resnet110.yaml", "data.path: data/cifar10 does not exist"),
    ("final_placement.yaml", "data.path: data/cifar10 does not exist"),
])
def test_study_sweep_without_its_data_says_so(name, message, monkeypatch, capsys):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    rc = sweep_cli(["plan", str(SWEEPS / name)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_resnet50_sweep_follows_the_gn_protocol(data_dirs):
    sweep = load_sweep(SWEEPS / "batch_regimes_resnet50.yaml")
    ex = sweep.executor
    assert (ex.kind, ex.gpus_per_node, ex.tasks_per_node, ex.nodes) == ("slurm", 8, 8, 1)
    seen = set()
    for run in sweep.runs:
        cfg = run.cfg
        devices = cfg.trainer.devices * cfg.trainer.num_nodes
        assert devices == 8 and cfg.model.arch == "resnet" and cfg.model.depth == 50
        assert cfg.data.name == "imagefolder" and cfg.data.image_size == 224
        n = cfg.data.batch_size
        # the GN paper: lr = 0.1 x N / 32 for N images per GPU
        assert effective_lr(cfg.optim, n * devices) == pytest.approx(0.1 * n / 32, rel=1e-12)
        seen.add((run.norm, bool(cfg.trainer.sync_norm), n))
    norms = {("bn", False), ("bn", True), ("gn", False), ("bgn", False), ("frn", False), ("brn", False)}
    assert seen == {(norm, sync, n) for norm, sync in norms for n in (32, 16, 8, 4, 2)}


def test_digits_batch_regimes_hold_the_sgd_batch_and_budget_fixed():
    """The laptop-scale file on the GN protocol: one global batch and one step budget for every run,
    the statistics batch set by virtual devices alone."""
    sweep = load_sweep(SWEEPS / "batch_regimes_digits.yaml")
    configs = [run.cfg for run in sweep.runs]
    assert {c.data.batch_size for c in configs} == {64} and {c.trainer.max_steps for c in configs} == {1000}
    assert {effective_lr(c.optim, c.data.batch_size) for c in configs} == {0.2}
    for norm in ("bn", "bgn", "brn"):
        per_device = {64 // run.cfg.trainer.virtual_devices for run in sweep.runs if run.norm.startswith(norm)}
        assert per_device == {2, 4, 8, 16, 32, 64}, norm


def test_linear_lr_scaling_from_a_base_batch_of_32_is_the_gn_rule():
    """`optim.lr_scaling=linear` with `optim.base_batch_size=32` on one device: 0.1 x N/32 as well."""
    from trainer.config import load_config

    for n in (32, 16, 8, 4, 2):
        cfg = load_config(None, ["optim.lr=0.1", "optim.lr_scaling=linear", "optim.base_batch_size=32",
                                 f"data.batch_size={n}"])
        assert effective_lr(cfg.optim, n) == pytest.approx(0.1 * n / 32, rel=1e-12)
    cfg = load_config(None, ["optim.lr=0.1", "data.batch_size=4"])  # lr_scaling none: lr as given
    assert effective_lr(cfg.optim, 4 * 8) == 0.1


def test_cached_plan_follows_the_environment(tmp_path, monkeypatch, capsys):
    """A sweep file that takes its data path from the environment: the cached plan is not reused once
    the variable points elsewhere (new run keys), nor once the data is gone (the one-line data error)."""
    sweep = SWEEPS / "understanding_bn_resnet110.yaml"
    monkeypatch.setenv("CIFAR10_DIR", str(fake_cifar10(tmp_path / "first")))
    first = {run.key for run in load_sweep(sweep).runs}
    monkeypatch.setenv("CIFAR10_DIR", str(fake_cifar10(tmp_path / "second")))
    second = {run.key for run in load_sweep(sweep).runs}
    assert first.isdisjoint(second)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "missing"))
    assert sweep_cli(["plan", str(sweep)]) == 2
    assert "data.path" in capsys.readouterr().err
