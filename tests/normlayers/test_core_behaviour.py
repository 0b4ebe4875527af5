"""What every core variant must do: train and backprop at batch 2 and 32, use its running
statistics in eval, survive a state_dict round trip, take float64 and bfloat16 input and run
under CPU autocast, and mix samples exactly when it declares ``batch_dependent``."""

from __future__ import annotations

import pytest
import torch

from normlayers import available, build_norm, norm_class

C = 8
SPECS = [
    "none",
    "bn",
    "ghost:virtual_batch=2",
    "brn:warmup_steps=0,r_max_steps=1,d_max_steps=1",
    "gn:groups=4",
    "ln",
    "in",
    "in:affine=true,track_running_stats=true",
    "pn",
    "frn",
    "bgn:groups=4",
    "bgn:groups=16",
    "evonorm_b0",
    "evonorm_s0:groups=4",
]
BATCH_DEPENDENT = {"bn", "ghost", "brn", "bgn", "evonorm_b0"}
WITH_ACTIVATION = {"frn", "evonorm_b0", "evonorm_s0"}


def batch(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, 4, 4, generator=generator) * 2.0 + 1.5).to(dtype)


def train_steps(layer: torch.nn.Module, steps: int = 3, n: int = 8) -> None:
    layer.train()
    for step in range(steps):
        layer(batch(n, seed=100 + step))


def test_flags_are_declared():
    info = available()
    for name in ["none", "bn", "ghost", "brn", "gn", "ln", "in", "pn", "frn", "bgn", "evonorm_b0", "evonorm_s0"]:
        assert info[name].batch_dependent == (name in BATCH_DEPENDENT), name
        assert info[name].includes_activation == (name in WITH_ACTIVATION), name
        assert info[name].description


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [2, 32])
def test_forward_backward(spec, n):
    torch.manual_seed(0)
    layer = build_norm(spec, C)
    x = batch(n).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("spec", SPECS)
def test_training_mixes_samples_exactly_when_batch_dependent(spec):
    layer = build_norm(spec, C).train()
    x = batch(4)
    changed = x.clone()
    changed[1:] = changed[1:] * 3 + 1
    first_moves = not torch.allclose(layer(x)[0], layer(changed)[0])
    assert first_moves == norm_class(spec).batch_dependent


@pytest.mark.parametrize("spec", SPECS)
def test_eval_after_train_uses_running_statistics(spec):
    layer = build_norm(spec, C)
    buffers_before = {k: v.clone() for k, v in layer.named_buffers()}
    train_steps(layer)
    running = {k: v for k, v in layer.named_buffers() if k.startswith("running_")}
    for key, value in running.items():
        assert not torch.equal(value, buffers_before[key]), f"{key} did not move in training"
    layer.eval()
    x = batch(4, seed=7)
    frozen = {k: v.clone() for k, v in layer.named_buffers()}
    y = layer(x)
    # eval is per sample (running statistics or none at all) and leaves the buffers alone
    torch.testing.assert_close(layer(x[:1]), y[:1])
    for key, value in layer.named_buffers():
        assert torch.equal(value, frozen[key]), key
    if running:
        # the running statistics are what eval uses: changing them changes the output
        with torch.no_grad():
            for value in running.values():
                value.mul_(2).add_(0.5)
        assert not torch.allclose(layer(x), y)
    else:
        torch.testing.assert_close(layer.train()(x), y)


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip(spec):
    torch.manual_seed(0)
    trained = build_norm(spec, C)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    train_steps(trained)
    restored = build_norm(spec, C)
    restored.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    x = batch(4, seed=3)
    torch.testing.assert_close(restored.eval()(x), trained.eval()(x))
    torch.testing.assert_close(restored.train()(x), trained.train()(x))


# float64 input keeps float64 (its statistics are float64: test_zoo_every_variant.py checks them at 1e-10)
@pytest.mark.parametrize("spec", SPECS)
def test_float64_and_bfloat16_inputs(spec):
    reference = build_norm(spec, C)
    x = batch(8)
    expected = reference(x)
    for dtype, tol in [(torch.float64, 1e-5), (torch.bfloat16, 6e-2)]:
        layer = build_norm(spec, C)
        xd = x.to(dtype).requires_grad_()
        y = layer(xd)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), expected.double(), atol=tol * 4, rtol=tol)
        y.float().sum().backward()
        assert xd.grad.dtype == dtype and torch.isfinite(xd.grad.float()).all()
        for key, value in layer.named_buffers():
            assert value.dtype == reference.get_buffer(key).dtype, key


@pytest.mark.parametrize("spec", SPECS)
def test_under_cpu_autocast_statistics_stay_float32(spec):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, C, 3, padding=1)
    layer = build_norm(spec, C)
    reference = build_norm(spec, C)
    reference.load_state_dict(layer.state_dict())
    x = batch(8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    expected = reference(h.float())
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)
    y.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    for key, value in layer.named_buffers():
        if key.startswith("running_"):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, reference.get_buffer(key), atol=1e-6, rtol=1e-6)
