"""The ImageNet-style folder data module: transforms against a direct computation, a real
two-step run through `normlab train` on a fake folder of JPEGs, and its one-line errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cluster.cli import main as normlab
from trainer.data.imagefolder import random_resized_box, train_transform, val_transform

MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def fake_imagenet(root, classes=3, train_per_class=6, val_per_class=2):
    """JPEGs of assorted sizes and aspect ratios, each class a different dominant colour."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (36, 52), (48, 48), (64, 40)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(c + i) % len(sizes)]
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    return root


def reference_normalised(pixels_hwc):
    """(x / 255 - mean) / std, written out with numpy."""
    return (pixels_hwc.transpose(2, 0, 1).astype(np.float64) / 255.0 - MEAN) / STD


@pytest.fixture
def photo():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_train_transform_is_crop_resize_flip_normalise(photo):
    size = 32
    flips = set()
    for seed in range(12):
        out = train_transform(photo, size, torch.Generator().manual_seed(seed))
        left, top, w, h = random_resized_box(photo.width, photo.height, torch.Generator().manual_seed(seed))
        # the same draws in the same order: the box, then the flip coin
        gen = torch.Generator().manual_seed(seed)
        random_resized_box(photo.width, photo.height, gen)
        flipped = torch.rand(1, generator=gen).item() < 0.5
        flips.add(flipped)
        cropped = Image.fromarray(np.asarray(photo)[top : top + h, left : left + w])
        expected = np.asarray(cropped.resize((size, size), Image.BILINEAR))
        if flipped:
            expected = expected[:, ::-1]
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), reference_normalised(expected), atol=1e-5)
    assert flips == {True, False}
    lo = ((0 - MEAN) / STD).min()
    hi = ((1 - MEAN) / STD).max()
    assert lo - 1e-5 <= out.min() and out.max() <= hi + 1e-5


def test_random_resized_box_follows_the_scale_and_ratio_ranges():
    gen = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(400):
        left, top, w, h = random_resized_box(200, 150, gen)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        areas.append(w * h / (200 * 150))
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    assert 0.4 < float(np.mean(areas)) < 0.6  # U(0.08, 1) has mean 0.54; large boxes rarely fit
    # a tall strip: every try fails, the fallback is the centred box at ratio 3/4
    assert random_resized_box(10, 400, gen) == (0, 193, 10, 13)


def test_val_transform_is_resize_256_center_crop_normalise(photo):
    size = 32
    out = val_transform(photo, size)
    short = round(size * 256 / 224)  # 37 for 32, 256 for 224
    w, h = round(64 * short / 48), short
    resized = np.asarray(photo.resize((w, h), Image.BILINEAR))
    top, left = (h - size) // 2, (w - size) // 2
    expected = reference_normalised(resized[top : top + size, left : left + size])
    assert out.shape == (3, size, size)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    assert math.isclose(round(224 * 256 / 224), 256)


def test_normlab_train_on_an_image_folder(tmp_path, capsys):
    root = fake_imagenet(tmp_path / "imagenet")
    # GN paper rule on one device: lr 0.1 * N / 32 is optim.lr=0.1 scaled linearly from a base batch of 32
    rc = normlab(["train", "data.name=imagefolder", f"data.path={root}", "data.image_size=32", "data.num_workers=1",
                  "data.batch_size=4", "data.val_batch_size=6", "model.arch=resnet", "model.depth=18",
                  "model.width=8", "model.norm=gn:groups=4", "optim.lr=0.1", "optim.lr_scaling=linear",
                  "optim.base_batch_size=32", "optim.warmup_epochs=0", "optim.schedule=constant",
                  "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.accelerator=cpu",
                  "trainer.log_every_n_steps=1", "probes.every_n_steps=0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "finished" in out.out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    assert float(run.data.params["derived.effective_lr"]) == pytest.approx(0.1 * 4 / 32)
    assert run.data.metrics["lr"] == pytest.approx(0.1 * 4 / 32)
    assert 0.0 <= run.data.metrics["val_acc"] <= 1.0 and math.isfinite(run.data.metrics["val_loss"])
    assert run.data.tags["batch_size"] == "4"


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist (expected train/ and val/"),
    ("no_val", "has no val/"),
    ("empty", "train has no images"),
    ("unset", "imagefolder needs the directory holding train/ and val/"),
])
def test_imagefolder_mistakes_are_one_line(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    if layout == "no_val":
        (root / "train" / "a").mkdir(parents=True)
    if layout == "empty":
        for split in ("train", "val"):
            (root / split / "a").mkdir(parents=True)
        (root / "train" / "a" / "notes.txt").write_text("not an image")
    path = [] if layout == "unset" else [f"data.path={root}"]
    rc = normlab(["train", "data.name=imagefolder", *path, "model.arch=resnet", "model.depth=18"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_an_unreadable_image_stops_training_with_one_line(tmp_path, capsys):
    root = fake_imagenet(tmp_path / "imagenet", train_per_class=2)
    broken = root / "train" / "n01" / "img0.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc = normlab(["train", "data.name=imagefolder", f"data.path={root}", "data.image_size=32", "data.num_workers=1",
                  "data.batch_size=2", "model.arch=resnet", "model.depth=18", "model.width=8",
                  "model.norm=gn:groups=4", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                  "probes.every_n_steps=0"])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [line for line in err.splitlines() if line.startswith("normlab train:")]
    assert f"{broken} is not a readable image" in line and "Traceback" not in err, err


def test_imagefolder_under_ddp_gives_each_device_its_shard(tmp_path):
    """Two gloo processes: 18 training images, 9 per device, so batches of 4 make 2 steps an epoch (not 4)."""
    root = fake_imagenet(tmp_path / "imagenet")
    normlab_cmd = Path(sys.executable).parent / "normlab"  # a script of its own: DDP re-runs sys.argv per rank
    proc = subprocess.run(
        [str(normlab_cmd), "train", "data.name=imagefolder", f"data.path={root}", "data.image_size=32",
         "data.num_workers=1", "data.batch_size=4", "data.val_batch_size=6", "model.arch=resnet", "model.depth=18",
         "model.width=8", "model.norm=bn", "trainer.sync_norm=true", "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.accelerator=cpu", "trainer.max_epochs=1", "probes.every_n_steps=0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    assert (run.data.tags["world_size"], run.data.tags["global_batch_size"]) == ("2", "8")
    (train_loss,) = client.get_metric_history(run.info.run_id, "train_loss")
    assert train_loss.step == 1  # logged at the epoch's last step: 2 steps, so each rank read 9 images
