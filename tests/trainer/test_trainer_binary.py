"""BN-free binary networks in the trainer: weight standardisation as a model option, AGC through
the LightningModule's clipping hook, the ReActNet-18 builder, distillation and the config errors."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.utils import parametrize

from normlayers import BinaryConv2d, RSign, trainable_weight
from trainer import ConfigError, NormClassifier, load_config, run_key
from trainer.cli import main
from trainer.models import build_model, classifier
from trainer.models.reactnet import NF_ALPHA, ReActBlock

BN_FREE = ["model.arch=reactnet", "model.binary=weights_and_activations", "model.norm=none",
           "model.weight_std=scaled_ws", "trainer.gradient_clip_algorithm=agc", "trainer.gradient_clip_val=0.04"]


def reactnet(**kw) -> nn.Module:
    cfg = {"arch": "reactnet", "depth": 18, "width": 8, "norm": "none", "norm_placement": "all", **kw}
    return build_model(cfg, 10, 1, 8)


@pytest.mark.parametrize("arch", ["cifar_resnet", "resnet", "plain_cnn", "mlp", "reactnet"])
def test_weight_std_reaches_every_weight_layer_but_the_classifier(arch):
    cfg = {"arch": arch, "depth": {"resnet": 18, "plain_cnn": 3, "mlp": 2}.get(arch, 8), "width": 8,
           "norm": "none", "weight_std": "scaled_ws"}
    model = build_model(cfg, 10, 1, 8)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    head = classifier(model)
    assert not parametrize.is_parametrized(head)
    assert all(parametrize.is_parametrized(m, "weight") for m in layers if m is not head)
    gamma = 1.0 if arch == "reactnet" else 1.7139588594436646
    for m in layers:
        if m is not head:
            w = m.weight.detach().flatten(1)
            torch.testing.assert_close(w.var(1, unbiased=False), torch.full((w.shape[0],), gamma**2 / w.shape[1]),
                                       rtol=1e-3, atol=1e-7)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(trainable_weight(m).grad is not None for m in layers)


def test_reactnet_layout_binary_modes_and_nf_scaling():
    model = reactnet(binary="weights_and_activations", weight_std="scaled_ws")
    blocks = [m for m in model.modules() if isinstance(m, ReActBlock)]
    assert len(blocks) == 16 and [b.conv.out_channels for b in blocks[::4]] == [8, 16, 32, 64]
    assert all(isinstance(b.conv, BinaryConv2d) and isinstance(b.sign, RSign) for b in blocks)
    assert not isinstance(model.stem, BinaryConv2d) and not isinstance(model.fc, BinaryConv2d)
    assert all(not isinstance(b.shortcut.conv, BinaryConv2d) for b in blocks if b.transition)
    # expected variance 1, +alpha^2 per block, reset to 1 + alpha^2 after each transition
    var, want = 1.0, []
    for b in blocks:
        want.append(var**-0.5)
        var = 1 + NF_ALPHA**2 if b.transition else var + NF_ALPHA**2
    assert [b.beta for b in blocks] == pytest.approx(want) and all(b.alpha == NF_ALPHA for b in blocks)
    acts = reactnet(binary="activations")
    assert all(type(b.conv) is nn.Conv2d and isinstance(b.sign, RSign) and b.alpha == 1.0
               for b in acts.modules() if isinstance(b, ReActBlock))
    real = reactnet(binary="none", norm="bn")
    assert all(isinstance(b.sign, nn.Identity) and isinstance(b.norm, nn.Module) for b in real.modules()
               if isinstance(b, ReActBlock))
    # the same parameters in every binary mode: step 2 starts from step 1's checkpoint
    assert list(dict(acts.named_parameters())) == list(dict(reactnet(binary="weights_and_activations")
                                                            .named_parameters()))


def test_binarised_activations_reach_the_binary_convs():
    model = reactnet(binary="weights_and_activations")
    seen = []
    model.blocks[5].conv.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(torch.randn(3, 1, 8, 8))
    assert set(seen[0].unique().tolist()) <= {-1.0, 1.0}


def test_agc_hook_clips_each_unit_by_the_formula_and_leaves_the_classifier(tmp_path):
    cfg = load_config(None, [*BN_FREE, "model.width=8", f"output.root={tmp_path}"])
    module = NormClassifier.from_config(cfg, 10, 1, 8)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(module(x) * 30, y).backward()
    head = {id(p) for p in classifier(module.model).parameters()}
    params = [p for p in module.model.parameters() if p.grad is not None]
    before = {id(p): p.grad.clone() for p in params}

    def unit_norms(t):
        return t.abs().flatten() if t.dim() <= 1 else t.flatten(1).norm(dim=1)

    ratios = torch.cat([unit_norms(p.grad) / unit_norms(p.detach()).clamp(min=1e-3) for p in params
                        if id(p) not in head])
    lam = float(ratios.median())  # half the units above lambda, half below
    module.agc_clip = lam
    module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=0.1))
    clipped = unclipped = 0
    for p in params:
        g0 = before[id(p)]
        if id(p) in head:
            assert torch.equal(p.grad, g0)
            continue
        for i in range(p.shape[0]):
            w_norm = max(float(p.detach()[i].norm()), 1e-3)
            g_norm = float(g0[i].norm())
            if g_norm / w_norm > lam:
                want, clipped = lam * w_norm / g_norm * g0[i], clipped + 1
            else:
                want, unclipped = g0[i], unclipped + 1
            torch.testing.assert_close(p.grad[i], want, rtol=1e-5, atol=1e-9)
    assert clipped > 10 and unclipped > 10


def test_config_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["model.binary=activations"], "model.binary: only model.arch=reactnet"),
        (["model.arch=reactnet", "trainer.gradient_clip_algorithm=agc"], "agc needs lambda > 0"),
        (["model.weight_std=bws"], "model.weight_std: 'bws' is not one of none, ws, scaled_ws"),
        (["model.arch=reactnet", "model.teacher=0123456789ab"], "model.teacher: 0123456789ab is neither"),
        (["model.arch=reactnet", f"model.init_from={tmp_path / 'gone.ckpt'}"], "model.init_from: "),
    ]
    for argv, message in cases:
        assert main([*argv, f"output.root={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_distilled_student_logs_the_kd_loss_and_starts_from_a_checkpoint(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["model.arch=reactnet", "model.width=8", "trainer.accelerator=cpu", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "probes.every_n_steps=0",
              f"tracking.uri={uri}", f"output.root={tmp_path / 'runs'}"]
    teacher_argv = [*common, "model.norm=bn"]
    assert main(teacher_argv) == 0
    teacher_key = run_key(load_config(None, teacher_argv))
    student_argv = [*common, "model.norm=none", "model.binary=activations", "model.weight_std=scaled_ws",
                    f"model.teacher={teacher_key}", "optim.optimizer=adam", "optim.lr=5e-4",
                    "optim.schedule=linear", "optim.warmup_epochs=0"]
    assert main(student_argv) == 0, capsys.readouterr().err
    student_key = run_key(load_config(None, student_argv))
    result = json.loads((tmp_path / "runs" / student_key / "result.json").read_text())
    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.metrics["train_kd_loss"] > 0 and "train_loss" in run.data.metrics
    ckpt = torch.load(tmp_path / "runs" / student_key / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    # step 2: weights binarised too, from step 1's checkpoint, named by path or as "this run with binary=activations"
    path = tmp_path / "runs" / student_key / "checkpoints" / "last.ckpt"
    for spec in (str(path), "with:model.binary=activations"):
        step2 = load_config(None, [*student_argv, "model.binary=weights_and_activations", f"model.init_from={spec}"])
        module = NormClassifier.from_config(step2, 10, 1, 8)
        for name, tensor in module.model.state_dict().items():
            assert torch.equal(tensor, ckpt["state_dict"][f"model.{name}"]), name
    with pytest.raises(ConfigError, match="model.init_from: 'with:model.binary=none' is run [0-9a-f]{12}, which has"):
        load_config(None, [*student_argv, "model.init_from=with:model.binary=none"])


def test_a_file_that_is_not_a_run_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "not_a_run.ckpt"
    torch.save({"weights": torch.ones(2)}, bogus)
    with pytest.raises(ConfigError, match="model.teacher: .* is not a normlab run checkpoint"):
        load_config(None, ["model.arch=reactnet", f"model.teacher={bogus}"])
    bogus.write_text("text")
    with pytest.raises(ConfigError, match="model.init_from: .* is not a readable checkpoint"):
        load_config(None, ["model.arch=reactnet", f"model.init_from={bogus}"])


# Binary (weights and activations) ReActNet-18, width 16, trained from scratch on digits with cross-entropy:
# Adam 2e-3 decayed linearly over 8 epochs (176 steps). Measured val_acc, seed 0 (deterministic on CPU):
# BN-free 0.911, BN 0.783, no norm and no recipe 0.813; asserted with about 10 points of margin. Without BN and
# without the recipe the binary net still trains at this scale (digits, 16 blocks): it does not collapse.
DIGITS = ["model.width=16", "trainer.accelerator=cpu", "trainer.max_epochs=8", "probes.every_n_steps=0",
          "optim.optimizer=adam", "optim.lr=0.002", "optim.schedule=linear", "optim.warmup_epochs=0",
          "optim.weight_decay=0"]


@pytest.mark.parametrize("variant, overrides, at_least", [
    ("bn_free", BN_FREE, 0.80),
    ("bn", [*BN_FREE[:2], "model.norm=bn"], 0.68),
    ("none", [*BN_FREE[:3]], 0.70),
])
def test_binary_reactnet_trains_on_digits(variant, overrides, at_least, tmp_path, capsys):
    argv = [*overrides, *DIGITS, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output.root={tmp_path}"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / run_key(load_config(None, argv)) / "result.json").read_text())
    assert result["status"] == "finished" and result["metrics"]["val_acc"] >= at_least, result["metrics"]
