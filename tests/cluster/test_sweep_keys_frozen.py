"""The run keys of every shipped sweep file, frozen: a change to how a config is typed, checked or
stored (the schema's Enum fields, the data modules' file rules, the sweep file's schema) must leave
every run key as it was, or a re-submitted sweep would train its finished runs again.

The expected keys were computed on the code before the Enum fields (as a digest of each file's list of
keys); demo.yaml and batch_regimes_digits.yaml, rewritten since (the virtual-device protocol; the demo
then without augmentation), were frozen again when rewritten. A sweep file edited since (its own digest
differs) is skipped: its keys are a new sweep's.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from cluster.sweep import SweepError, load_sweep

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
# file: (number of runs, sha256 of the run keys joined by spaces, sha256 of the file), both cut to 16 hex digits
FROZEN = {
    "batch_regimes.yaml": (240, "83e27fb7f232f48c", "f8c42ddf3481a77e"),
    "batch_regimes_digits.yaml": (40, "597cc95e22811410", "874f290627c71cf4"),
    "batch_regimes_resnet50.yaml": (30, "b968006ed1ea941e", "1dda28ba3408015d"),
    "bn_init_scale_digits.yaml": (12, "05bb632cc5dfde4f", "c97c0d9a5761adcc"),
    "bnn_bn_free_digits_step1.yaml": (6, "bce6323773fc2846", "77b810fdcf81f50d"),
    "bnn_bn_free_digits_step2.yaml": (6, "fbcab6f0995051b6", "d03a9a673c995d28"),
    "bnn_bn_free_digits_teacher.yaml": (1, "db73f4cbc981abc6", "7ce19415c743b805"),
    "bnn_bn_free_step1.yaml": (12, "570ea7c6bfb913f3", "947746794dae3069"),
    "bnn_bn_free_step2.yaml": (12, "7e26aefb26e437db", "53c0b7c931cb6371"),
    "bnn_bn_free_teacher.yaml": (2, "857207d4476a4a06", "24fa375f1550ca72"),
    "bnp_batch_regimes.yaml": (96, "de8d7b0970b8c04d", "72b407fd9560a754"),
    "bnp_digits.yaml": (20, "a3eec705830a7229", "f9ea6177777eab28"),
    "demo.yaml": (54, "51336f38998fc5f9", "2eeef9675d7d4887"),
    "final_placement.yaml": (30, "9ddd333dbce95e05", "1e909fa9bc94abec"),
    "final_placement_digits.yaml": (30, "7020b8cc2fc1edf9", "36dd7b09aebfddce"),
    "lr_stability.yaml": (108, "92511dcf06d853d2", "89a5d892d42d331e"),
    "understanding_bn_digits.yaml": (36, "a149a26e593d7f27", "0986b5e19f9b1907"),
    "understanding_bn_resnet110.yaml": (36, "5bb14f8e1f33b273", "08d88f777b2595b4"),
}
NEEDS_TRAINING = re.compile(r"is run \w+, which has no (\S+); train it first")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture
def data_files(tmp_path, monkeypatch):
    """The shipped sweeps' default data paths (relative, under the current directory) with the file names
    their data modules check; the environment variables that would move them unset."""
    monkeypatch.chdir(tmp_path)
    for name in ("CIFAR_ROOT", "CIFAR10_DIR", "IMAGENET_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    cifar10 = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for folder, files in (("data/cifar10/cifar-10-batches-py", cifar10), ("data/cifar-10-batches-py", cifar10),
                          ("data/cifar-100-python", ["train", "test"])):
        (tmp_path / folder).mkdir(parents=True)
        for name in files:
            (tmp_path / folder / name).write_bytes(b"")
    for folder in ("train/a", "val/a"):
        (tmp_path / "data" / "imagenet" / folder).mkdir(parents=True)


def _keys(path: Path) -> list[str]:
    """The sweep's run keys; the runs it distils from or starts from get a stand-in checkpoint (their keys
    enter its runs' keys; their weights do not)."""
    for _ in range(100):
        try:
            return [run.key for run in load_sweep(path).runs]
        except SweepError as error:
            needed = NEEDS_TRAINING.search(str(error))
            if needed is None:
                raise
            checkpoint = Path(needed.group(1))
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}}, checkpoint)
    raise AssertionError(f"{path}: more than 100 runs to stand in for")


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_shipped_sweeps_keep_their_run_keys(name, data_files):
    runs, keys, file_digest = FROZEN[name]
    path = SWEEPS / name
    if not path.is_file() or _digest(path.read_bytes()) != file_digest:
        pytest.skip(f"{name} changed since its keys were frozen: a new sweep")
    found = _keys(path)
    assert (len(found), _digest(" ".join(found).encode())) == (runs, keys)
