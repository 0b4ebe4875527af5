"""convert_sync/revert_sync, NormSyncPlugin, and why not Lightning's ``sync_batchnorm=True``.

The last test runs normlab's own training path (``trainer.train``) as a 2-process Lightning DDP run
on CPU with ``trainer.sync_norm=true`` and checks its first step against one process holding the
concatenated batch.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlayers import NormLayer, available, build_norm, convert_sync, revert_sync
from trainer.norm_sync import NormSyncPlugin

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("normlab_sync_train", HERE / "sync_train.py")
sync_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_train)
SPEC_OPTIONS = {"ghost": "virtual_batch=2"}
BATCH_DEPENDENT = [name for name, info in available().items() if info.batch_dependent]


def _model(variant: str) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    options = SPEC_OPTIONS.get(variant)
    norm = build_norm(f"{variant}:{options}" if options else variant, 8)
    norm.bind_preceding(conv)
    return nn.Sequential(conv, norm)


@pytest.fixture
def world_of_one():
    """A real (single-rank) gloo process group, torn down so no other test sees it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_lightning_sync_batchnorm_loses_variants_ours_keeps_them(world_of_one):
    replaced, left_local = [], []
    for variant in BATCH_DEPENDENT:
        model = _model(variant)
        theirs = TorchSyncBatchNorm().apply(copy.deepcopy(model))
        if isinstance(model[1], _BatchNorm):
            # the variant's class, and with it its own forward, is gone: plain torch SyncBatchNorm
            assert type(theirs[1]) is nn.SyncBatchNorm, variant
            replaced.append(variant)
        else:
            # not a _BatchNorm: left as it was, and silently not synchronised
            assert type(theirs[1]) is type(model[1]) and theirs[1].process_group is None, variant
            left_local.append(variant)
        own_class = type(model[1])
        ours = NormSyncPlugin().apply(model)
        assert ours is model and type(ours[1]) is own_class, variant
        layers = [m for m in ours.modules() if isinstance(m, NormLayer) and m.batch_dependent]
        assert layers and all(m.process_group is world_of_one for m in layers), variant
        NormSyncPlugin().revert(ours)
        assert all(m.process_group is None for m in layers), variant
    assert "bn" in replaced and {"bgn", "evonorm_b0"} <= set(left_local)
    # torch's SyncBatchNorm cannot even train on CPU tensors, which is where gloo runs
    converted = TorchSyncBatchNorm().apply(_model("bn"))
    with pytest.raises(ValueError, match="GPU"):
        converted(torch.randn(4, 3, 4, 4))


def test_ours_trains_on_cpu_in_a_world_of_one(world_of_one):
    x = torch.randn(4, 3, 4, 4)
    for variant in BATCH_DEPENDENT:
        local = _model(variant)
        synced = convert_sync(_model(variant))
        torch.manual_seed(1)  # the same dropout masks (ic) in both
        expected = local(x)
        torch.manual_seed(1)
        torch.testing.assert_close(synced(x), expected, msg=variant)
        assert revert_sync(synced) is synced


def test_convert_sync_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        convert_sync(_model("bn"))


def test_convert_sync_refuses_torch_batchnorm(world_of_one):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"^convert_sync: 1 is torch's BatchNorm2d.*build_norm\('bn'"):
        convert_sync(model)


def _train_two_processes(out_dir: Path, overrides: list[str]) -> None:
    # ddp_fork: the second rank is forked from the first, not a second interpreter importing
    # Lightning and MLflow again (that took 50 s instead of 14 s on the shared 2-core machine);
    # both are Lightning's DDPStrategy, which applies the LayerSync plugin the same way.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PL_DISABLE_FORK", None)
    proc = subprocess.run([sys.executable, str(HERE / "sync_train.py"), str(out_dir), *overrides,
                           "trainer.devices=2", "trainer.strategy=ddp_fork"],
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_sync_norm_first_step_equals_one_process_on_the_concatenated_batch(tmp_path):
    common = [
        "model.arch=cifar_resnet", "model.depth=8", "model.width=4", "model.norm=bn",
        "data.name=synthetic", "data.synthetic.samples=40", "data.synthetic.image_size=8",
        "data.synthetic.classes=4", "data.augment=false", "data.val_split=0.2",
        "trainer.max_steps=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
        "trainer.accelerator=cpu", "probes.every_n_steps=0", "optim.warmup_epochs=0",
    ]
    _train_two_processes(tmp_path / "ddp", [*common, "data.batch_size=4", "trainer.sync_norm=true"])
    sync_train.record_first_step(tmp_path / "one", [*common, "data.batch_size=8", "trainer.devices=1"])
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    assert [r["batch_size"] for r in ranks] == [4, 4] and one["batch_size"] == 8
    # DDP averages the ranks' mean losses and gradients: the mean over the concatenated batch
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one["loss"], rtol=1e-5, atol=1e-6)
    assert ranks[0]["grads"].keys() == one["grads"].keys() and len(one["grads"]) > 10
    for name, grad in one["grads"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    running = [name for name in one["buffers"] if name.endswith("running_var")]
    assert running
    for name in running:
        for rank in ranks:
            torch.testing.assert_close(rank["buffers"][name], one["buffers"][name], rtol=1e-5, atol=1e-6, msg=name)
