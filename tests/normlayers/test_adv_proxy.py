"""Proxy Normalization against the paper's PN-Act written out, with scipy's Gaussian quantiles."""

import math

import pytest
import torch
from scipy.stats import norm as gaussian

from normlayers import available, build_norm


def proxy_reference(x, layer, groups, eps=1e-5, proxy_eps=0.03, samples=256):
    n, c = x.shape[:2]
    grouped = x.double().reshape(n, groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    x_hat = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    gamma, beta = layer.weight.detach().double(), layer.bias.detach().double()
    shape = (1, c) + (1,) * (x.dim() - 2)
    z = torch.relu(gamma.reshape(shape) * x_hat + beta.reshape(shape))
    v = torch.tensor(gaussian.ppf((torch.arange(samples, dtype=torch.float64) + 0.5) / samples))
    proxy = torch.relu(gamma[:, None] * v[None, :] + beta[:, None])
    p_mean, p_var = proxy.mean(1), proxy.var(1, unbiased=False)
    return (z - p_mean.reshape(shape)) / torch.sqrt(p_var.reshape(shape) + proxy_eps)


@pytest.mark.parametrize(("spec", "groups"), [("proxy", 1), ("proxy:base=gn,groups=2", 2), ("proxy:base=gn", 4)])
def test_matches_the_paper_and_is_the_same_in_train_and_eval(spec, groups):
    torch.manual_seed(0)
    layer = build_norm(spec, 4)
    assert layer.groups == groups
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    expected = proxy_reference(x, layer, groups)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x[:1]).double(), expected[:1], rtol=1e-4, atol=1e-4)  # batch-independent


def test_proxy_moments_approach_the_rectified_gaussian():
    layer = build_norm("proxy:samples=256", 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, 0.3, -1.0]))
    mean, var = layer.proxy_moments()
    for c, (g, b) in enumerate([(1.0, 0.0), (0.5, 0.3), (2.0, -1.0)]):
        a = b / g
        pdf, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), gaussian.cdf(a)
        exact_mean = b * cdf + g * pdf
        exact_var = (b * b + g * g) * cdf + b * g * pdf - exact_mean**2
        # 256 quantiles truncate the tails a little: within 2% of the closed form
        assert abs(mean[c].item() - exact_mean) < 0.02 * exact_mean
        assert abs(var[c].item() - exact_var) < 0.02 * exact_var


def test_gradients_reach_the_affine_through_the_proxy():
    layer = build_norm("proxy", 4)
    layer(torch.randn(2, 4, 3, 3)).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0


def test_flags_and_state():
    info = available()["proxy"]
    assert info.includes_activation and not info.batch_dependent
    assert set(build_norm("proxy", 4).state_dict()) == {"weight", "bias"}
