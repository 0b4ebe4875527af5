"""Each core variant against an independent reference: torch's own ops, or the paper's equation
written out plainly here (with autograd of the plain equation as the gradient reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlayers import build_norm

C = 8


def randomize(layer: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affine parameters, so a wrong broadcast cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name != "eps_learned":
                p.copy_(torch.rand_like(p) + 0.5 if name in ("weight", "v") else torch.randn_like(p) * 0.3)
    return layer


def leaf(shape, mean=0.0, std=1.0, dtype=torch.float32):
    return (torch.randn(shape, dtype=dtype) * std + mean).requires_grad_()


def grads(out: torch.Tensor, upstream: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, upstream))


def assert_close_all(a, b, **tol):
    for got, want in zip(a, b, strict=True):
        torch.testing.assert_close(got, want, **tol)


# ----------------------------------------------------------------------------- gn, ln, in vs torch


@pytest.mark.parametrize(
    ("spec", "groups"), [("gn:groups=4", 4), ("gn:group_size=2", 4), ("gn:groups=1", 1), ("gn", C)]
)
def test_gn_matches_torch_group_norm(spec, groups):
    torch.manual_seed(0)
    layer = randomize(build_norm(spec, C))
    assert layer.groups == groups  # default: gcd(32, 8) = 8 groups
    # (NC input with one channel per group leaves one value per statistic: refused, test_zoo_every_variant.py)
    for shape in [(5, C, 6, 7)] + ([(5, C)] if groups < C else []):
        x = leaf(shape, mean=1.0, std=2.0)
        y = layer(x)
        ref = F.group_norm(x, groups, layer.weight, layer.bias, 1e-5)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        assert_close_all(grads(y, g, x, layer.weight), grads(ref, g, x, layer.weight))
    assert build_norm("gn", 64).groups == 32 and build_norm("gn", 48).groups == 16


def test_ln_matches_torch_layer_norm_over_chw():
    torch.manual_seed(0)
    layer = randomize(build_norm("ln", C))
    x = leaf((4, C, 5, 5), mean=-2.0)
    y = layer(x)
    ref = F.layer_norm(x, x.shape[1:], eps=1e-5) * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    assert_close_all(grads(y, g, x, layer.weight, layer.bias), grads(ref, g, x, layer.weight, layer.bias))
    layer.eval()
    torch.testing.assert_close(layer(x), ref)  # no running statistics: eval is train


def test_in_matches_torch_instance_norm_including_running_stats():
    torch.manual_seed(0)
    layer = randomize(build_norm("in:affine=true,track_running_stats=true,momentum=0.2", C))
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    for _ in range(3):
        x = leaf((4, C, 5, 6), mean=3.0, std=2.0)
        y = layer(x)
        ref = F.instance_norm(x, running_mean, running_var, layer.weight, layer.bias, True, 0.2, 1e-5)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        assert_close_all(grads(y, g, x, layer.weight), grads(ref, g, x, layer.weight))
    torch.testing.assert_close(layer.running_mean, running_mean)
    torch.testing.assert_close(layer.running_var, running_var)
    layer.eval()
    x = torch.randn(2, C, 5, 6)
    ref = F.instance_norm(x, running_mean, running_var, layer.weight, layer.bias, False, 0.2, 1e-5)
    torch.testing.assert_close(layer(x), ref)


def test_in_defaults_follow_torch_no_affine_no_running_stats():
    layer = build_norm("in", C)
    assert layer.weight is None and not hasattr(layer, "running_mean")
    x = torch.randn(3, C, 4, 4) * 3 + 1
    torch.testing.assert_close(layer(x), F.instance_norm(x))
    layer.eval()
    torch.testing.assert_close(layer(x), F.instance_norm(x))


# ----------------------------------------------------------------------------- ghost


def test_ghost_with_virtual_batch_equal_to_batch_is_bn():
    torch.manual_seed(0)
    ghost, bn = randomize(build_norm("ghost:virtual_batch=16", C)), torch.nn.BatchNorm2d(C)
    bn.load_state_dict(ghost.state_dict())
    for _ in range(3):
        x = leaf((16, C, 4, 4), mean=2.0, std=3.0)
        y, ref = ghost(x), bn(x)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        params = (ghost.weight, ghost.bias)
        assert_close_all(grads(y, g, x, *params), grads(ref, g, x, bn.weight, bn.bias))
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    ghost.eval(), bn.eval()
    x = torch.randn(5, C, 4, 4)  # eval: running statistics, any batch size
    torch.testing.assert_close(ghost(x), bn(x))


@pytest.mark.parametrize("shape", [(12, C, 3, 3), (12, C)])
def test_ghost_is_bn_per_chunk_with_momentum_divided_by_chunks(shape):
    """The composer reference: torch BN applied to each ghost batch in turn, momentum / chunks."""
    torch.manual_seed(0)
    ghost = randomize(build_norm("ghost:virtual_batch=4,momentum=0.3", C))
    bn = torch.nn.BatchNorm2d(C, momentum=0.3 / 3) if len(shape) == 4 else torch.nn.BatchNorm1d(C, momentum=0.1)
    bn.load_state_dict(ghost.state_dict())
    for _ in range(2):
        x = leaf(shape, mean=1.0, std=2.0)
        y = ghost(x)
        ref = torch.cat([bn(chunk) for chunk in x.split(4)])
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        assert_close_all(grads(y, g, x, ghost.weight), grads(ref, g, x, bn.weight))
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    assert int(ghost.num_batches_tracked) == 2


def test_ghost_cumulative_momentum_averages_the_chunk_statistics():
    ghost = build_norm({"name": "ghost", "virtual_batch": 3, "momentum": None}, C)
    xs = [torch.randn(6, C) * 2 + 1 for _ in range(2)]
    for x in xs:
        ghost(x)
    chunk_means = torch.stack([c.mean(0) for x in xs for c in x.split(3)])
    chunk_vars = torch.stack([c.var(0, unbiased=True) for x in xs for c in x.split(3)])
    torch.testing.assert_close(ghost.running_mean, chunk_means.mean(0))
    torch.testing.assert_close(ghost.running_var, chunk_vars.mean(0))


# ----------------------------------------------------------------------------- bgn


def test_bgn_with_groups_equal_to_channels_is_bn():
    torch.manual_seed(0)
    bgn, bn = randomize(build_norm(f"bgn:groups={C}", C)), torch.nn.BatchNorm2d(C)
    bn.load_state_dict(bgn.state_dict())
    for _ in range(3):
        x = leaf((6, C, 5, 4), mean=-1.0, std=2.0)
        y, ref = bgn(x), bn(x)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        assert_close_all(grads(y, g, x, bgn.weight, bgn.bias), grads(ref, g, x, bn.weight, bn.bias))
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)
    bgn.eval(), bn.eval()
    x = torch.randn(3, C, 5, 4)
    torch.testing.assert_close(bgn(x), bn(x))
    # NC input: BatchNorm1d
    bgn1, bn1 = build_norm(f"bgn:groups={C}", C), torch.nn.BatchNorm1d(C)
    x = torch.randn(10, C) * 3
    torch.testing.assert_close(bgn1(x), bn1(x))
    torch.testing.assert_close(bgn1.running_var, bn1.running_var)


@pytest.mark.parametrize("groups", [2, 16])  # 2: groups of whole channels; 16: groups split channels
def test_bgn_matches_its_equation(groups):
    torch.manual_seed(0)
    layer = randomize(build_norm(f"bgn:groups={groups},momentum=0.5", C))
    x = leaf((4, C, 3, 4), mean=1.0, std=2.0)
    y = layer(x)
    # the C*H*W values of each sample in G consecutive groups; statistics over batch and group
    grouped = x.reshape(4, groups, -1)
    mean = grouped.mean(dim=(0, 2), keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=(0, 2), keepdim=True)
    normalized = ((grouped - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    ref = normalized * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    assert_close_all(grads(y, g, x, layer.weight, layer.bias), grads(ref, g, x, layer.weight, layer.bias))
    count = grouped.shape[0] * grouped.shape[2]
    assert layer.running_mean.shape == (groups,)
    torch.testing.assert_close(layer.running_mean, 0.5 * mean.flatten().detach())
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * var.flatten().detach() * count / (count - 1))
    layer.eval()
    xe = torch.randn(2, C, 3, 4)
    rm, rv = layer.running_mean[None, :, None], layer.running_var[None, :, None]
    ref = ((xe.reshape(2, groups, -1) - rm) / torch.sqrt(rv + 1e-5)).reshape(xe.shape)
    torch.testing.assert_close(layer(xe), ref * layer.weight[:, None, None] + layer.bias[:, None, None])


# ----------------------------------------------------------------------------- brn


def test_brn_with_r_max_1_and_d_max_0_is_bn():
    torch.manual_seed(0)
    brn = randomize(build_norm("brn:r_max=1,d_max=0,warmup_steps=0,momentum=0.2", C))
    bn = torch.nn.BatchNorm2d(C, momentum=0.2)
    bn.load_state_dict({k: v for k, v in brn.state_dict().items() if k != "running_std"}, strict=False)
    expected_std = torch.ones(C)
    for _ in range(3):
        x = leaf((6, C, 3, 3), mean=2.0, std=3.0)
        y, ref = brn(x), bn(x)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        assert_close_all(grads(y, g, x, brn.weight, brn.bias), grads(ref, g, x, bn.weight, bn.bias))
        batch_std = torch.sqrt(x.detach().var(dim=(0, 2, 3), unbiased=False) + 1e-5)
        expected_std = 0.8 * expected_std + 0.2 * batch_std
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_std, expected_std)  # the running *std* of sigma_B
    brn.eval()
    x = torch.randn(4, C, 3, 3)
    ref = (x - brn.running_mean[:, None, None]) / brn.running_std[:, None, None]
    torch.testing.assert_close(brn(x), ref * brn.weight[:, None, None] + brn.bias[:, None, None])


@pytest.mark.parametrize("r_max", [1.5, 100.0])  # clipped and unclipped r and d
def test_brn_matches_algorithm_1(r_max):
    torch.manual_seed(0)
    layer = randomize(build_norm(f"brn:r_max={r_max},d_max={r_max / 2},warmup_steps=0,r_max_steps=0,d_max_steps=0",
                                 C))
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C))
        layer.running_std.copy_(torch.rand(C) + 0.5)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x = leaf((6, C, 3, 3), mean=0.5, std=2.0)
    y = layer(x)
    mean_b = x.mean(dim=(0, 2, 3))
    std_b = torch.sqrt(((x - mean_b[:, None, None]) ** 2).mean(dim=(0, 2, 3)) + 1e-5)
    r = torch.clamp(std_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mean_b - mu) / sigma, -r_max / 2, r_max / 2).detach()
    x_hat = (x - mean_b[:, None, None]) / std_b[:, None, None] * r[:, None, None] + d[:, None, None]
    ref = layer.weight[:, None, None] * x_hat + layer.bias[:, None, None]
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    assert_close_all(grads(y, g, x, layer.weight, layer.bias), grads(ref, g, x, layer.weight, layer.bias))
    if r_max == 100.0:  # unclipped: training output is the eval transform with the old running statistics
        unclipped = (x - mu[:, None, None]) / sigma[:, None, None]
        torch.testing.assert_close(y, layer.weight[:, None, None] * unclipped + layer.bias[:, None, None])
    else:
        assert (r == 1.5).any() or (r == 1 / 1.5).any()


def test_brn_schedule_follows_its_own_step_counter():
    layer = build_norm("brn:r_max=3,d_max=5,warmup_steps=10,r_max_steps=30,d_max_steps=20", C)
    expected = {0: (1.0, 0.0), 9: (1.0, 0.0), 10: (1.0, 0.0), 15: (1.5, 2.5), 20: (2.0, 5.0), 30: (3.0, 5.0),
                1000: (3.0, 5.0)}
    for step, (r_limit, d_limit) in expected.items():
        layer.num_batches_tracked.fill_(step)
        r, d = layer.limits()
        assert (float(r), float(d)) == pytest.approx((r_limit, d_limit)), step
    layer.num_batches_tracked.zero_()
    x = torch.randn(4, C, 2, 2)
    for _ in range(3):
        layer(x)
    layer.eval()
    layer(x)
    assert int(layer.num_batches_tracked) == 3  # counts training steps only
    # during the warm-up brn is BN even with running statistics far from the batch's
    with torch.no_grad():
        layer.running_std.fill_(10.0)
    layer.train()
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, layer.bias, True))


# ----------------------------------------------------------------------------- frn, pn, evonorm


@pytest.mark.parametrize("shape", [(3, C, 5, 4), (6, C)])
def test_frn_matches_its_equations(shape):
    torch.manual_seed(0)
    layer = randomize(build_norm("frn", C))
    with torch.no_grad():
        layer.eps_learned.fill_(-3e-3)  # |eps_l| counts
    x = leaf(shape, std=2.0)
    y = layer(x)
    spatial = tuple(range(2, x.dim()))
    nu2 = (x**2).mean(dim=spatial, keepdim=True) if spatial else x**2
    eps = 1e-6 + layer.eps_learned.abs()
    per_c = [1, C] + [1] * len(spatial)
    pre = layer.weight.reshape(per_c) * x / torch.sqrt(nu2 + eps) + layer.bias.reshape(per_c)
    ref = torch.maximum(pre, layer.tau.reshape(per_c))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.weight, layer.bias, layer.tau, layer.eps_learned)
    assert_close_all(grads(y, g, *params), grads(ref, g, *params))
    assert build_norm("frn:learn_eps=false", C).eps_learned is None


def test_pn_matches_its_equation():
    torch.manual_seed(0)
    layer = randomize(build_norm("pn", C))
    x = leaf((3, C, 5, 4), mean=1.0, std=2.0)
    y = layer(x)
    mu = x.mean(dim=1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(dim=1, keepdim=True) + 1e-5)
    ref = layer.weight[:, None, None] * (x - mu) / sigma + layer.bias[:, None, None]
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous()
    g = torch.randn_like(y)
    assert_close_all(grads(y, g, x, layer.weight), grads(ref, g, x, layer.weight))
    channels_last = x.detach().to(memory_format=torch.channels_last)
    out = layer(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.detach())


def test_evonorm_b0_matches_its_equation_in_train_and_eval():
    torch.manual_seed(0)
    layer = randomize(build_norm("evonorm_b0:momentum=0.5", C))
    x = leaf((4, C, 5, 5), mean=0.5, std=2.0)
    y = layer(x)
    per_c = (1, C, 1, 1)
    batch_var = x.var(dim=(0, 2, 3), unbiased=False).reshape(per_c)
    instance_var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    v, gamma, beta = (p.reshape(per_c) for p in (layer.v, layer.weight, layer.bias))
    denominator = torch.maximum(torch.sqrt(batch_var + 1e-5), v * x + torch.sqrt(instance_var + 1e-5))
    ref = x / denominator * gamma + beta
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.v, layer.weight, layer.bias)
    assert_close_all(grads(y, g, *params), grads(ref, g, *params))
    n = 4 * 5 * 5
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * batch_var.flatten().detach() * n / (n - 1))
    layer.eval()
    xe = torch.randn(2, C, 5, 5)
    running = layer.running_var.reshape(per_c)
    inst = xe.var(dim=(2, 3), unbiased=False, keepdim=True)
    ref = xe / torch.maximum(torch.sqrt(running + 1e-5), v * xe + torch.sqrt(inst + 1e-5)) * gamma + beta
    torch.testing.assert_close(layer(xe), ref.detach())


def test_evonorm_s0_matches_its_equation():
    torch.manual_seed(0)
    layer = randomize(build_norm("evonorm_s0:groups=2", C))
    x = leaf((3, C, 4, 5), mean=0.5, std=2.0)
    y = layer(x)
    per_c = (1, C, 1, 1)
    v, gamma, beta = (p.reshape(per_c) for p in (layer.v, layer.weight, layer.bias))
    group_var = x.reshape(3, 2, -1).var(dim=2, unbiased=False)  # (N, G)
    group_std = torch.sqrt(group_var + 1e-5).repeat_interleave(C // 2, dim=1).reshape(3, C, 1, 1)
    ref = x * torch.sigmoid(v * x) / group_std * gamma + beta
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.v, layer.weight, layer.bias)
    assert_close_all(grads(y, g, *params), grads(ref, g, *params))
    layer.eval()
    torch.testing.assert_close(layer(x), ref)  # per sample: eval is train


def test_evonorm_b0_hand_written_backward_passes_gradcheck():
    from normlayers.evonorm import _EvoNormB0Function

    torch.manual_seed(0)
    f64 = torch.float64
    x = torch.randn(3, 4, 3, 2, dtype=f64, requires_grad=True)
    batch_std = (torch.rand(4, dtype=f64) + 0.8).requires_grad_()
    v, weight, bias = (torch.randn(4, dtype=f64, requires_grad=True) for _ in range(3))
    instance_std = torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
    instance_branch = v.reshape(1, 4, 1, 1) * x + instance_std > batch_std.reshape(1, 4, 1, 1)
    assert instance_branch.any() and not instance_branch.all()  # both sides of the max are exercised
    assert torch.autograd.gradcheck(lambda *a: _EvoNormB0Function.apply(*a, 1e-5), (x, batch_std, v, weight, bias))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_evonorm_s0_hand_written_backward_passes_gradcheck(groups):
    from normlayers.evonorm import _EvoNormS0Function

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    v, weight, bias = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: _EvoNormS0Function.apply(*a, groups, 1e-5), (x, v, weight, bias))
    # channels-last input and upstream gradient give the same result
    channels_last = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn_like(x)
    y = _EvoNormS0Function.apply(channels_last, v, weight, bias, groups, 1e-5)
    (grad_last,) = torch.autograd.grad(y, channels_last, upstream.to(memory_format=torch.channels_last))
    (grad_contiguous,) = torch.autograd.grad(_EvoNormS0Function.apply(x, v, weight, bias, groups, 1e-5), x, upstream)
    torch.testing.assert_close(grad_last, grad_contiguous)


def test_evonorm_b0_local_batch_statistics_pass_gradcheck():
    """Unsynchronised, the Function takes the batch std from its own per-sample moments: its gradient
    (through the batch variance too) is checked numerically, and the variance against torch's."""
    from normlayers.evonorm import _EvoNormB0Function

    torch.manual_seed(1)
    f64 = torch.float64
    x = (torch.randn(3, 4, 3, 2, dtype=f64) * 2 + 1).requires_grad_()
    v, weight, bias = (torch.randn(4, dtype=f64, requires_grad=True) for _ in range(3))
    _, batch_var = _EvoNormB0Function.apply(x, None, v, weight, bias, 1e-5)
    torch.testing.assert_close(batch_var, x.detach().var(dim=(0, 2, 3), unbiased=False))
    assert torch.autograd.gradcheck(lambda *a: _EvoNormB0Function.apply(a[0], None, *a[1:], 1e-5)[0],
                                    (x, v, weight, bias))
