"""Data modules: small image sets held as tensors on the training device.

``digits`` (scikit-learn's bundled 8x8 digits, a fixed stratified train/val split), ``cifar10``
and ``cifar100`` (the standard python-pickle batches at ``data.path``) and ``synthetic``
(class-dependent Gaussian images, for tests and benchmarks); ``imagefolder`` (JPEG folders
decoded in DataLoader workers) is in :mod:`trainer.data.imagefolder`. Whole sets live on the device;
batches are gathered by index and augmented there (random crop by padding and shifting, random
horizontal flip) on the whole batch at once, so no per-sample Python runs per step.

Reproducibility: the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` and the
augmentation of rank ``r`` from ``(seed, e, r)``, so a run resumed from an epoch-end checkpoint
sees exactly the batches an uninterrupted run sees. Under DDP every rank takes its own shard
(``perm[rank::world_size]``) and the per-device batch is ``data.batch_size``: what the norm layers
see. Training drops the last incomplete batch (a batch statistic from a handful of samples
would be a different experiment); validation pads its shards by wrapping, as torch's
``DistributedSampler`` does, so every rank runs the same number of batches.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from trainer.data.files import CIFAR_FILES, CifarFiles, DataFiles, cifar_dir
from trainer.data.imagefolder import ImageFolderDataModule
from trainer.errors import ConfigError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes and Python versions)."""
    return int(hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).hexdigest()[:15], 16)


@dataclass
class Split:
    """Images (N, C, H, W; uint8 or float) and int64 labels."""

    images: Tensor
    labels: Tensor

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)


def random_crop_flip(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-sample random crop (zero padding, shifts up to ``padding``) and horizontal flip, batched."""
    n, c, h, w = x.shape
    dev = x.device
    if padding:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    if flip:
        mirrored = torch.rand(n, generator=generator, device=dev) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    return x


class DeviceBatches:
    """The batches of one split for one rank; each ``iter()`` is one epoch (asks ``epoch_fn`` which)."""

    def __init__(self, split: Split, mean: Tensor, std: Tensor, batch_size: int, *, train: bool, seed: int,
                 epoch_fn: Callable[[], int], rank: int = 0, world_size: int = 1, padding: int = 0,
                 flip: bool = False):
        self.split, self.mean, self.std = split, mean, std
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.epoch_fn, self.rank, self.world_size = epoch_fn, rank, world_size
        self.padding, self.flip = padding, flip

    def _shard_size(self) -> int:
        n = len(self.split)
        return n // self.world_size if self.train else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.train else math.ceil(size / self.batch_size)

    def _indices(self, epoch: int) -> Tensor:
        n = len(self.split)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            order = order[: self._shard_size() * self.world_size]
        else:
            order = torch.arange(n)
            order = torch.cat([order, order[: self._shard_size() * self.world_size - n]])
        return order[self.rank :: self.world_size].to(self.split.labels.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch_fn()
        idx = self._indices(epoch)
        device = self.split.labels.device
        gen = None
        if self.train and (self.padding or self.flip):
            gen = torch.Generator(device=device).manual_seed(derive_seed(self.seed, epoch, self.rank, 1))
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = (self.split.images[sel].float() - self.mean) / self.std
            if gen is not None:
                x = random_crop_flip(x, self.padding, self.flip, gen)
            yield x, self.split.labels[sel]


class InMemoryDataModule(pl.LightningDataModule):
    """Base of every data module here: ``load()`` fills ``train_set``/``val_set`` on the CPU
    (raising :class:`~trainer.config.ConfigError` on unusable data), ``setup()`` moves them to the device."""

    default_padding = 4
    default_flip = True

    def __init__(self, cfg: DictConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train_set: Split | None = None
        self.val_set: Split | None = None
        self.num_classes = 0

    # -- what subclasses provide -------------------------------------------------------------------
    def read(self) -> tuple[Split, Split | None, int]:
        """(training set, separate test set or None, number of classes) on the CPU."""
        raise NotImplementedError

    # -- loading and shape ---------------------------------------------------------------------
    def load(self) -> None:
        if self.train_set is not None:
            return
        train, test, self.num_classes = self.read()
        if self.cfg.val_split > 0:
            train, test = _split(train, self.cfg.val_split)
        self.train_set, self.val_set = train, test
        x = train.images.float()
        self.mean = x.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
        self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).reshape(1, -1, 1, 1)

    @property
    def in_channels(self) -> int:
        self.load()
        return self.train_set.images.shape[1]

    @property
    def image_size(self) -> int:
        self.load()
        return self.train_set.images.shape[-1]

    @property
    def padding(self) -> int:
        if not self.cfg.augment:
            return 0
        return self.default_padding if self.cfg.crop_padding is None else self.cfg.crop_padding

    @property
    def flip(self) -> bool:
        if not self.cfg.augment:
            return False
        return self.default_flip if self.cfg.hflip is None else self.cfg.hflip

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.train_set, self.val_set = self.train_set.to(device), self.val_set.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_batches(self, epoch_fn: Callable[[], int], rank: int = 0, world_size: int = 1) -> DeviceBatches:
        """The training batches of ``rank``; also what the plain-loop benchmark iterates."""
        self.load()
        return DeviceBatches(self.train_set, self.mean, self.std, self.cfg.batch_size, train=True, seed=self.seed,
                             epoch_fn=epoch_fn, rank=rank, world_size=world_size, padding=self.padding,
                             flip=self.flip)

    def train_dataloader(self) -> DeviceBatches:
        return self.train_batches(lambda: self.trainer.current_epoch, *self._rank_world())

    def val_dataloader(self) -> DeviceBatches:
        rank, world = self._rank_world()
        return DeviceBatches(self.val_set, self.mean, self.std, self.cfg.val_batch_size, train=False, seed=self.seed,
                             epoch_fn=lambda: 0, rank=rank, world_size=world)

    def check_batch_size(self, world_size: int) -> None:
        """Fail early when one device's shard cannot fill a single training batch."""
        self.load()
        per_rank = len(self.train_set) // world_size
        if per_rank < self.cfg.batch_size:
            raise ConfigError(f"data.batch_size: {self.cfg.batch_size} is more than the {per_rank} training "
                              f"samples per device; lower it")


def _split(data: Split, fraction: float) -> tuple[Split, Split]:
    """A fixed stratified split (the same for every seed, so runs compare on the same images)."""
    gen = torch.Generator().manual_seed(0)
    train_idx, val_idx = [], []
    for c in torch.unique(data.labels):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = max(1, round(len(members) * fraction))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return Split(data.images[tr], data.labels[tr]), Split(data.images[va], data.labels[va])


class DigitsDataModule(DataFiles, InMemoryDataModule):
    """scikit-learn's 1797 8x8 digits (values 0-16), ten classes. No flips (digits are not mirror-symmetric)."""

    default_padding = 1
    default_flip = False

    def read(self) -> tuple[Split, Split | None, int]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
        return Split(images, torch.as_tensor(digits.target, dtype=torch.int64)), None, 10


def _read_cifar_batch(path: Path, label_key: bytes) -> Split:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ConfigError(f"data.path: {path} is not a CIFAR python batch (unpickling failed: "
                          f"{type(e).__name__}); re-download the python version") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch) if isinstance(batch, dict) else []
        raise ConfigError(f"data.path: {path} is not a CIFAR python batch: expected keys 'data' and "
                          f"'{label_key.decode()}', found {keys or type(batch).__name__}")
    data = batch[b"data"]
    labels = batch[label_key]
    shape = getattr(data, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 3 * 32 * 32 or len(labels) != shape[0]:
        raise ConfigError(f"data.path: {path} is not a CIFAR python batch: 'data' must be N x 3072 with N labels, "
                          f"got shape {shape} and {len(labels)} labels")
    images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    return Split(images, torch.as_tensor(list(labels), dtype=torch.int64))


class CifarDataModule(CifarFiles, InMemoryDataModule):
    """CIFAR-10/100 from the python version (Krizhevsky 2009): pickled dicts with ``data`` (N x 3072
    uint8, channel-major 32x32) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100)."""

    def __init__(self, cfg: DictConfig, seed: int):
        super().__init__(cfg, seed)
        self.name = cfg.name

    def read(self) -> tuple[Split, Split | None, int]:
        where = cifar_dir(self.name, self.cfg.path)
        _, files = CIFAR_FILES[self.name]
        label_key, classes = (b"labels", 10) if self.name == "cifar10" else (b"fine_labels", 100)
        missing = [f for f in files if not (where / f).is_file()]
        if missing:
            raise ConfigError(f"data.path: {where} has no {', '.join(missing)}")
        parts = [_read_cifar_batch(where / f, label_key) for f in files]
        train, test = parts[:-1], parts[-1]
        train = Split(torch.cat([p.images for p in train]), torch.cat([p.labels for p in train]))
        for part in (train, test):
            if len(part) and (part.labels.min() < 0 or part.labels.max() >= classes):
                raise ConfigError(f"data.path: {where} has labels outside 0..{classes - 1}; is it {self.name}?")
        return train, test, classes


class SyntheticDataModule(DataFiles, InMemoryDataModule):
    """Gaussian images around one random pattern per class: learnable, any size, no files."""

    default_padding = 0
    default_flip = False

    def read(self) -> tuple[Split, Split | None, int]:
        s = self.cfg.synthetic
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 7))
        patterns = torch.randn(s.classes, s.channels, s.image_size, s.image_size, generator=gen)
        labels = torch.randint(0, s.classes, (s.samples,), generator=gen)
        images = patterns[labels] + 2.0 * torch.randn(s.samples, s.channels, s.image_size, s.image_size, generator=gen)
        return Split(images, labels), None, s.classes


def build_datamodule(cfg: DictConfig) -> InMemoryDataModule | ImageFolderDataModule:
    """The data module for ``cfg.data`` (the full experiment config is passed for its seed)."""
    kinds = {"digits": DigitsDataModule, "cifar10": CifarDataModule, "cifar100": CifarDataModule,
             "imagefolder": ImageFolderDataModule, "synthetic": SyntheticDataModule}
    return kinds[cfg.data.name](cfg.data, cfg.seed)
