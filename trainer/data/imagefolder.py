"""``imagefolder``: ImageNet-style JPEG folders, decoded with Pillow in DataLoader workers.

``data.path`` holds ``train/`` and ``val/``, each with one folder of images per class (the layout
of ImageNet after the usual ``valprep`` step); class indices follow the sorted folder names of
``train/``. The transforms are the standard ones of the ResNet papers (He et al. 2016; Goyal et
al. 2017; Wu & He 2018), with ``S = data.image_size`` (224):

- training: RandomResizedCrop — a box covering a fraction ``s ~ U(0.08, 1)`` of the image area
  with aspect ratio ``r``, ``log r ~ U(log 3/4, log 4/3)`` (ten tries, else the central crop of
  the whole image clamped to that ratio range), resized to ``S x S`` — then a horizontal flip
  with probability 1/2;
- validation: the shorter side resized to ``round(S * 256 / 224)``, then the central ``S x S``;

then ``(x / 255 - mean) / std`` per channel with ImageNet's mean and std. Pillow decodes and
resizes (bilinear); the random draws, flip and normalisation are torch ops, drawn from torch's
generator, which DataLoader seeds per worker and per epoch. Under DDP Lightning puts a
``DistributedSampler`` on these loaders, so each device reads its own shard; the per-device
batch is ``data.batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from trainer.data.files import ImageFolderFiles
from trainer.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_box(width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, box width, box height) of a RandomResizedCrop on a ``width x height`` image."""
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        draws = torch.rand(2, generator=generator).tolist()
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * draws[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * draws[1])
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, w, h
    # fall back to the whole image, cut to the nearest allowed aspect ratio
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)


def normalize(x: Tensor) -> Tensor:
    """uint8 (3, H, W) to float32 normalised with ImageNet's per-channel mean and std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def train_transform(image: Image.Image, size: int, generator: torch.Generator | None = None) -> Tensor:
    """RandomResizedCrop(size) and a random horizontal flip, normalised."""
    left, top, w, h = random_resized_box(image.width, image.height, generator)
    # crop first: a resize with box= would let the filter read pixels outside the box
    crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    x = to_tensor(crop)
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(2)
    return normalize(x)


def val_transform(image: Image.Image, size: int) -> Tensor:
    """Shorter side to round(size * 256 / 224), then the central size x size, normalised."""
    short = round(size * 256 / 224)
    scale = short / min(image.width, image.height)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    x = to_tensor(image.resize((w, h), Image.BILINEAR))
    top, left = (h - size) // 2, (w - size) // 2
    return normalize(x[:, top : top + size, left : left + size])


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image under ``root/<class>/``, and the class names (sorted)."""
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in classes:
        folder = root / name
        if folder.is_dir():
            samples += [(str(p), index[name]) for p in sorted(folder.iterdir())
                        if p.suffix.lower() in IMAGE_SUFFIXES]
    return samples, classes


class FolderImages(Dataset):
    """Images decoded on access (in the DataLoader worker), transformed for training or validation."""

    def __init__(self, samples: list[tuple[str, int]], size: int, train: bool):
        self.samples, self.size, self.train = samples, size, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"data.path: {path} is not a readable image ({type(e).__name__}); "
                              f"remove it or replace it") from None
        x = train_transform(image, self.size) if self.train else val_transform(image, self.size)
        return x, label


class ImageFolderDataModule(ImageFolderFiles, pl.LightningDataModule):
    """``data.name=imagefolder``; the same interface as the in-memory modules of :mod:`trainer.data.memory`."""

    def __init__(self, cfg: DictConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train_set: FolderImages | None = None
        self.val_set: FolderImages | None = None
        self.num_classes = 0

    def load(self) -> None:
        """List the files (not read them); raise :class:`ConfigError` when a split has no images."""
        if self.train_set is not None:
            return
        root = Path(self.cfg.path).expanduser()
        train, classes = scan(root / "train")
        if not train:
            raise ConfigError(f"data.path: {root / 'train'} has no images (.jpg, .jpeg, .png) in class folders")
        extra = sorted({p.name for p in (root / "val").iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise ConfigError(f"data.path: {root / 'val'} has class folders not in train/: {', '.join(extra[:5])}")
        val, _ = scan(root / "val", classes)
        if not val:
            raise ConfigError(f"data.path: {root / 'val'} has no images (.jpg, .jpeg, .png) in class folders")
        self.num_classes = len(classes)
        self.train_set = FolderImages(train, self.cfg.image_size, train=True)
        self.val_set = FolderImages(val, self.cfg.image_size, train=False)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _loader(self, dataset: FolderImages, batch_size: int, train: bool) -> DataLoader:
        workers = self.cfg.num_workers
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=pin)

    def train_batches(self, epoch_fn: Callable[[], int] | None = None, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
        """A loader of training batches (the runner takes its first one for a preflight forward pass)."""
        self.load()
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.cfg.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.cfg.val_batch_size, train=False)

    def check_batch_size(self, world_size: int) -> None:
        self.load()
        per_rank = len(self.train_set) // world_size
        if per_rank < self.cfg.batch_size:
            raise ConfigError(f"data.batch_size: {self.cfg.batch_size} is more than the {per_rank} training "
                              f"images per device; lower it")
