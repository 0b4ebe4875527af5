"""Data modules: the CIFAR pickle reader on a fake copy, clear errors, device augmentation, shards."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import load_config
from trainer.cli import main
from trainer.config import ConfigError
from trainer.data import DeviceBatches, Split, build_datamodule, random_crop_flip

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_fake_cifar(root: Path, name: str = "cifar10", per_file: int = 12, seed: int = 0) -> dict:
    """A small copy of the python-pickle format: dicts with b'data' (N x 3072 uint8) and labels."""
    rng = np.random.default_rng(seed)
    sub, files, key, classes = (("cifar-10-batches-py", CIFAR10_FILES, b"labels", 10) if name == "cifar10"
                                else ("cifar-100-python", ["train", "test"], b"fine_labels", 100))
    (root / sub).mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        with open(root / sub / f, "wb") as fh:
            pickle.dump({b"batch_label": f.encode(), key: labels, b"data": data}, fh)
        written[f] = (data, labels)
    return written


def test_cifar10_reader_matches_the_written_batches(tmp_path):
    written = write_fake_cifar(tmp_path)
    cfg = load_config(None, ["data.name=cifar10", f"data.path={tmp_path}", "data.val_split=0"])
    dm = build_datamodule(cfg)
    dm.load()
    assert dm.num_classes == 10 and dm.in_channels == 3 and dm.image_size == 32
    assert len(dm.train_set) == 60 and len(dm.val_set) == 12
    data, labels = written["data_batch_2"]
    # row 3 of batch 2: red plane first, each plane row-major (the format's layout)
    img = dm.train_set.images[12 + 3]
    assert torch.equal(img[0], torch.as_tensor(data[3, :1024].reshape(32, 32)))
    assert torch.equal(img[2, 5], torch.as_tensor(data[3, 2048 + 5 * 32 : 2048 + 6 * 32]))
    assert dm.train_set.labels[12 + 3].item() == labels[3]
    assert dm.val_set.labels.tolist() == written["test_batch"][1]
    # the directory itself works as well as its parent
    cfg2 = load_config(None, ["data.name=cifar10", f"data.path={tmp_path / 'cifar-10-batches-py'}", "data.val_split=0"])
    dm2 = build_datamodule(cfg2)
    dm2.load()
    assert torch.equal(dm2.train_set.images, dm.train_set.images)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    written = write_fake_cifar(tmp_path, "cifar100", per_file=20)
    cfg = load_config(None, ["data.name=cifar100", f"data.path={tmp_path}", "data.val_split=0.25"])
    dm = build_datamodule(cfg)
    dm.load()
    assert dm.num_classes == 100 and len(dm.train_set) + len(dm.val_set) == 20
    assert sorted(dm.train_set.labels.tolist() + dm.val_set.labels.tolist()) == sorted(written["train"][1])


def test_normlab_train_on_fake_cifar(tmp_path, capsys):
    write_fake_cifar(tmp_path, per_file=16)
    argv = ["data.name=cifar10", f"data.path={tmp_path}", "data.val_split=0", "data.batch_size=8", "model.depth=8",
            "trainer.max_steps=3", "trainer.accelerator=cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(b"this is not a pickle"), "data_batch_3 is not a CIFAR python batch (unpickling"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})),
         "data_batch_3 is not a CIFAR python batch: expected keys 'data' and 'labels', found ['data']"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})),
         "'data' must be N x 3072"),
        (lambda p: p.unlink(), "has no data_batch_3"),
    ],
)
def test_malformed_or_missing_cifar_is_one_clear_line(tmp_path, capsys, damage, expected):
    write_fake_cifar(tmp_path)
    damage(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    assert main(["data.name=cifar10", f"data.path={tmp_path}", "data.val_split=0", "trainer.max_steps=1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("normlab train: data.path: ") and expected in err[0], err
    assert not Path("runs").exists() and not Path("mlflow.db").exists()


def test_labels_out_of_range_are_rejected(tmp_path):
    write_fake_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python").rename(tmp_path / "cifar-10-batches-py")  # 100-class labels named as cifar10
    batches = tmp_path / "cifar-10-batches-py"
    for f in CIFAR10_FILES:
        with open(batches / f, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 57]}, fh)
    dm = build_datamodule(load_config(None, ["data.name=cifar10", f"data.path={tmp_path}", "data.val_split=0"]))
    with pytest.raises(ConfigError, match="labels outside 0..9"):
        dm.load()


def test_crop_and_flip_are_per_sample_shifts_and_mirrors():
    """Each augmented image equals one of the (2p+1)^2 shifted crops of its padded input, maybe mirrored."""
    x = torch.randn(64, 3, 6, 6)
    p = 2
    out = random_crop_flip(x, p, True, torch.Generator().manual_seed(3))
    padded = F.pad(x, (p, p, p, p))
    shifts, flips = set(), 0
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 6, dx : dx + 6]))]
        assert matches, f"sample {i} is no crop of its input"
        shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(shifts) > 5 and 10 < flips < 54  # random, not constant
    same = random_crop_flip(x, p, True, torch.Generator().manual_seed(3))
    assert torch.equal(out, same)


def test_epoch_order_shards_and_batches():
    n = 103
    split = Split(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.arange(n))
    mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    epoch = {"e": 0}

    def batches(rank, world, train=True, bs=10):
        return DeviceBatches(split, mean, std, bs, train=train, seed=5, epoch_fn=lambda: epoch["e"], rank=rank,
                             world_size=world)

    def labels(loader):
        return [y.tolist() for _, y in loader]

    r0, r1 = batches(0, 2), batches(1, 2)
    assert len(r0) == len(r1) == 5  # 51 samples per rank, whole batches of 10 only
    a, b = labels(r0), labels(r1)
    assert all(len(batch) == 10 for batch in a + b)
    seen = sum(a, []) + sum(b, [])
    assert len(set(seen)) == len(seen) == 100  # disjoint shards
    assert labels(r0) == a  # the same epoch replays the same order
    epoch["e"] = 1
    assert labels(r0) != a
    epoch["e"] = 0
    assert sum(labels(batches(0, 1, bs=10)), []) != sum(a, [])  # one device: its own permutation of all 103
    v0, v1 = batches(0, 2, train=False, bs=20), batches(1, 2, train=False, bs=20)
    assert len(v0) == len(v1) == 3
    val = sum(labels(v0), []) + sum(labels(v1), [])
    assert set(val) == set(range(n)) and len(val) == 104  # padded by wrapping, like DistributedSampler


def test_digits_split_is_fixed_and_stratified():
    a = build_datamodule(load_config(None))
    b = build_datamodule(load_config(None, ["seed=7"]))
    a.load()
    b.load()
    assert torch.equal(a.val_set.labels, b.val_set.labels) and torch.equal(a.val_set.images, b.val_set.images)
    assert len(a.train_set) + len(a.val_set) == 1797 and abs(len(a.val_set) - 0.2 * 1797) < 10
    counts = torch.bincount(a.val_set.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
