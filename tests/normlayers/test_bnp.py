"""BNPreconditioner against the layer it stands for: one BNP step equals one gradient-descent step on
the explicitly re-parametrised, input-normalised layer (built here from the same mu and sigma) mapped
back to W, b; its running statistics against a plain running mean and variance written out here."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlayers import BNPreconditioner

LR = 0.3
EPS = 1e-5


def _loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # not linear in z, so the gradients differ from sample to sample
    return ((z - target).square() * (1.0 + z.tanh().square())).mean()


def _warm_up(bnp: BNPreconditioner, layer: nn.Module, shape: tuple[int, ...], steps: int = 4) -> None:
    """A few training forwards and steps (no gradients yet), so that mu and sigma are not the initial 0 and 1."""
    for i in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * (1.0 + i) + 0.5 * i
        layer(x)
        bnp.step()


def _features(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The input as (features, values): every value of each input feature over batch (and positions)."""
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)


def _scale(mu: torch.Tensor, var: torch.Tensor, centred: bool) -> torch.Tensor:
    return torch.sqrt(var + EPS) if centred else torch.sqrt(var + mu.square() + EPS)


# ---------------------------------------------------------------- one step = GD on the normalised layer


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_step_is_gradient_descent_on_the_normalised_layer(batch, bias):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias).double()
    bnp = BNPreconditioner(layer, momentum=0.3, eps=EPS)
    _warm_up(bnp, layer, (batch, 5))
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if bias else None
    x = torch.randn(batch, 5, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1]) + 1.5
    target = torch.randn(batch, 3, dtype=torch.float64)

    _loss(layer(x), target).backward()
    bnp.step()
    w_bnp = w0 - LR * layer.weight.grad
    mu, var = bnp.statistics("")
    assert mu.dtype == torch.float64 and var.dtype == torch.float64

    # z = W' (x - mu)/sigma + b' (or W' x / s without a bias), with W = W' / sigma, b = b' - W mu
    sigma = _scale(mu, var, bias)
    w_n = (w0 * sigma).requires_grad_()
    x_n = (x - mu) / sigma if bias else x / sigma
    if bias:
        b_n = (b0 + w0 @ mu).requires_grad_()
        z = x_n @ w_n.T + b_n
    else:
        z = x_n @ w_n.T
    assert torch.allclose(z, F.linear(x, w0, b0), rtol=0, atol=1e-12)  # the same function
    _loss(z, target).backward()
    w_ref = (w_n - LR * w_n.grad) / sigma
    torch.testing.assert_close(w_bnp, w_ref, rtol=1e-12, atol=1e-13)
    if bias:
        b_ref = (b_n - LR * b_n.grad) - w_ref @ mu
        torch.testing.assert_close(b0 - LR * layer.bias.grad, b_ref, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(w_bnp, w0 - LR * _plain_grad(w0, b0, x, target))  # not the plain step


def _plain_grad(w0, b0, x, target):
    """The unpreconditioned weight gradient (BNP's step must differ from it)."""
    w = w0.clone().requires_grad_()
    _loss(F.linear(x, w, b0), target).backward()
    return w.grad


def _normalised_conv(x, w_n, b_n, mu, sigma, conv: nn.Conv2d, centred: bool):
    """The convolution of the normalised patches: each patch entry of channel c becomes (x - mu_c)/sigma_c
    (x / s_c without a bias); padding entries are inputs of value 0 like the others. Per group."""
    kh, kw = conv.kernel_size
    groups, n = conv.groups, x.shape[0]
    cin = x.shape[1] // groups
    out_per_group = w_n.shape[0] // groups
    ho = (x.shape[2] + 2 * conv.padding[0] - kh) // conv.stride[0] + 1
    wo = (x.shape[3] + 2 * conv.padding[1] - kw) // conv.stride[1] + 1
    outs = []
    for g in range(groups):
        patches = F.unfold(x[:, g * cin:(g + 1) * cin], (kh, kw), padding=conv.padding, stride=conv.stride)
        mu_rep = mu[g * cin:(g + 1) * cin].repeat_interleave(kh * kw)[:, None]
        sigma_rep = sigma[g * cin:(g + 1) * cin].repeat_interleave(kh * kw)[:, None]
        patches = (patches - mu_rep) / sigma_rep if centred else patches / sigma_rep
        wg = w_n[g * out_per_group:(g + 1) * out_per_group].reshape(out_per_group, -1)
        z = wg @ patches
        if b_n is not None:
            z = z + b_n[g * out_per_group:(g + 1) * out_per_group, None]
        outs.append(z.reshape(n, out_per_group, ho, wo))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("bias,groups", [(True, 1), (False, 1), (True, 2)])
def test_conv2d_step_is_gradient_descent_on_the_normalised_layer(batch, bias, groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias, groups=groups).double()
    bnp = BNPreconditioner(conv, momentum=0.2, eps=EPS)
    _warm_up(bnp, conv, (batch, 4, 7, 7))
    w0 = conv.weight.detach().clone()
    b0 = conv.bias.detach().clone() if bias else None
    x = torch.randn(batch, 4, 7, 7, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None, None] + 1.0
    target = torch.randn(batch, 6, 4, 4, dtype=torch.float64)

    _loss(conv(x), target).backward()
    bnp.step()
    w_bnp = w0 - LR * conv.weight.grad
    mu, var = bnp.statistics("")
    sigma = _scale(mu, var, bias)

    cin = 4 // groups
    sigma_w = sigma.reshape(groups, 1, cin, 1, 1).expand(groups, 6 // groups, cin, 1, 1).reshape(6, cin, 1, 1)
    mu_w = mu.reshape(groups, 1, cin, 1, 1).expand(groups, 6 // groups, cin, 1, 1).reshape(6, cin, 1, 1)
    w_n = (w0 * sigma_w).requires_grad_()
    b_n = (b0 + (w0 * mu_w).sum(dim=(1, 2, 3))).requires_grad_() if bias else None
    z = _normalised_conv(x, w_n, b_n, mu, sigma, conv, bias)
    assert torch.allclose(z, conv(x).detach(), rtol=0, atol=1e-12)  # the same function
    _loss(z, target).backward()
    w_ref = (w_n - LR * w_n.grad) / sigma_w
    torch.testing.assert_close(w_bnp, w_ref, rtol=1e-12, atol=1e-13)
    if bias:
        b_ref = (b_n - LR * b_n.grad) - (w_ref * mu_w).sum(dim=(1, 2, 3))
        torch.testing.assert_close(b0 - LR * conv.bias.grad, b_ref, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- running statistics


def test_momentum_one_gives_exactly_the_current_batch_statistics():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    bnp = BNPreconditioner(conv, momentum=1.0)
    for scale in (1.0, 3.0):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * scale + scale
        conv(x).sum().backward()
        bnp.step()
    values = _features(x, 1)
    mu, var = bnp.statistics("")
    torch.testing.assert_close(mu, values.mean(dim=1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(var, values.var(dim=1, unbiased=False), rtol=1e-13, atol=1e-14)


def test_running_statistics_equal_a_plain_running_mean_and_variance():
    """Reference: exponential running averages of x and x^2 from E[x] = 0, E[x^2] = 1; var = E[x^2] - E[x]^2.
    Batches of 1 (one value per feature) included, and a step with two forwards (accumulated gradients)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 9, 4)).double()
    momentum = 0.25
    bnp = BNPreconditioner(model, momentum=momentum)
    ref = {"0": [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)],
           "2": [torch.zeros(27, dtype=torch.float64), torch.ones(27, dtype=torch.float64)]}
    for step, sizes in enumerate([(1,), (5,), (1,), (3, 2), (8,), (1,)]):
        inputs = {"0": [], "2": []}
        for size in sizes:
            x = torch.randn(size, 2, 5, 5, dtype=torch.float64) * (1 + step) + step
            inputs["0"].append(_features(x, 1))
            inputs["2"].append(_features(model[1](model[0](x)).detach(), 1))
            model(x).sum().backward()
        bnp.step()
        for name, (m1, m2) in ref.items():
            values = torch.cat(inputs[name], dim=1)
            m1.mul_(1 - momentum).add_(values.mean(dim=1), alpha=momentum)
            m2.mul_(1 - momentum).add_(values.square().mean(dim=1), alpha=momentum)
            mu, var = bnp.statistics(name)
            torch.testing.assert_close(mu, m1, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var, m2 - m1.square(), rtol=1e-10, atol=1e-10)
    assert float(bnp.statistics("2")[1].min()) > 0  # batches of one moved the variance of the linear layer


def test_only_training_forwards_of_the_model_itself_count():
    torch.manual_seed(4)
    layer = nn.Linear(3, 2).double()
    bnp = BNPreconditioner(layer, momentum=0.5)
    x = torch.randn(6, 3, dtype=torch.float64) + 2.0
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    copy.deepcopy(layer)(x)  # a probe's copy carries the hook along
    bnp.step()
    mu, var = bnp.statistics("")
    assert torch.equal(mu, torch.zeros(3, dtype=torch.float64)) and torch.equal(var, torch.ones(3, dtype=torch.float64))
    layer(x)
    bnp.step()
    torch.testing.assert_close(bnp.statistics("")[0], 0.5 * x.mean(dim=0))


def test_statistics_are_float32_under_autocast():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    bnp = BNPreconditioner(model)
    x = torch.randn(8, 4) * 100.0 + 300.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert model[1].weight.dtype == torch.float32 and out.dtype == torch.bfloat16
    out.float().sum().backward()
    bnp.step()
    mu, _ = bnp.statistics("0")
    mu_hidden, _ = bnp.statistics("1")
    assert mu.dtype == torch.float32 and mu_hidden.dtype == torch.float32
    torch.testing.assert_close(mu, 0.1 * x.mean(dim=0))  # the float32 input, not a bf16 rounding of it


def test_no_statistics_yet_leaves_the_gradients_alone():
    layer = nn.Linear(3, 2)
    bnp = BNPreconditioner(layer)
    layer.weight.grad = torch.ones_like(layer.weight)
    bnp.step()
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))


def test_skip_leaves_that_layer_type_plain():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3))
    bnp = BNPreconditioner(model, skip=["linear"])
    assert list(bnp.layers) == ["0"]
    x = torch.randn(4, 2, 6) * 5
    model(x).sum().backward()
    plain = model[2].weight.grad.clone()
    bnp.step()
    assert torch.equal(model[2].weight.grad, plain)


# ---------------------------------------------------------------- state


def _train(model, opt, bnp, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        bnp.step()
        opt.step()


def _setup(seed=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, BNPreconditioner(model, momentum=0.3)


def test_state_dict_round_trip_resumes_exactly():
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, 1, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (2,), generator=g))
               for _ in range(5)]
    model, opt, bnp = _setup()
    _train(model, opt, bnp, batches)

    first, opt1, bnp1 = _setup()
    _train(first, opt1, bnp1, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "bnp": bnp1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt2, bnp2 = _setup(seed=99)  # different initial weights: everything must come from the state
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    bnp2.load_state_dict(saved["bnp"])
    _train(resumed, opt2, bnp2, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for name in bnp.layers:
        assert all(torch.equal(a, b) for a, b in zip(bnp.statistics(name), bnp2.statistics(name), strict=True))


def test_load_state_dict_refuses_another_model():
    _, _, bnp = _setup()
    other = BNPreconditioner(nn.Sequential(nn.Linear(2, 2)))
    x = torch.randn(3, 2)
    other.layers["0"].module(x)
    other.step()
    with pytest.raises(ValueError, match="does not have"):
        bnp.load_state_dict({"layers": {"7": other.state_dict()["layers"]["0"]}})


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -1e-5}, "eps must be > 0"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"momentum": -0.1}, r"momentum must be in \[0, 1\]"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
    ({"momentum": None}, "momentum must be a number"),
    ({"skip": ["batchnorm"]}, "'batchnorm' is not one; choose from linear, conv1d, conv2d, conv3d"),
    ({"skip": "conv"}, "'conv' is not one"),
])
def test_bad_options_are_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        BNPreconditioner(nn.Linear(2, 2), **kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("bnp: ")


def test_momentum_one_on_single_values_is_refused():
    layer = nn.Linear(3, 2)
    bnp = BNPreconditioner(layer, momentum=1.0)
    layer(torch.randn(1, 3)).sum().backward()
    with pytest.raises(ValueError, match="one value per input feature of layer 'Linear'; use momentum < 1"):
        bnp.step()
