"""Kalman Normalization against the paper's update equations, with the authors' sampled transition."""

import copy

import pytest
import torch
from torch import nn

from normlayers import build_norm, link_kalman_layers

EPS = 1e-5


def chain():
    """conv1 -> kn1 -> ReLU -> conv2 -> kn2, bound and linked as a model builder does."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=0)
    kn1, kn2 = build_norm("kn", 4), build_norm("kn", 5)
    kn1.bind_preceding(conv1)
    kn2.bind_preceding(conv2)
    model = nn.Sequential(conv1, kn1, nn.ReLU(), conv2, kn2)
    assert link_kalman_layers(model) == 1
    return model


def normalise(y, mean, var, layer):
    shape = (1, -1, 1, 1)
    return ((y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS) * layer.weight.reshape(shape)
            + layer.bias.reshape(shape))


def test_first_layer_is_batch_normalization():
    model = chain()
    conv1, kn1 = model[0], model[1]
    x = torch.randn(4, 3, 6, 6)
    y_in = conv1(x)
    torch.testing.assert_close(kn1(y_in), nn.BatchNorm2d(4)(y_in), rtol=1e-5, atol=1e-5)


def test_second_layer_fuses_its_batch_with_the_carried_prediction():
    model = chain()
    conv1, kn1, relu, conv2, kn2 = model
    x = torch.randn(8, 3, 10, 10)
    h1 = conv1(x)
    out = kn2(conv2(relu(kn1(h1))))

    # layer 1's estimate is its batch statistics; the authors' transition: Gaussian samples with those
    # moments, through the ReLU and conv2, moments of the result
    var1, mean1 = torch.var_mean(h1.detach(), dim=(0, 2, 3), unbiased=False)
    torch.manual_seed(1)
    samples = torch.randn(400, 4, 10, 10) * var1.sqrt().reshape(1, -1, 1, 1) + mean1.reshape(1, -1, 1, 1)
    with torch.no_grad():
        propagated = conv2(torch.relu(samples))
    mc_var, mc_mean = torch.var_mean(propagated, dim=(0, 2, 3), unbiased=False)
    pred_mean, pred_var = kn2.prediction()
    torch.testing.assert_close(pred_mean.detach(), mc_mean, rtol=0.02, atol=0.02)
    torch.testing.assert_close(pred_var.detach(), mc_var, rtol=0.03, atol=0.02)

    # the update equations, with the initial gain q = 0.1
    h2 = conv2(relu(kn1(h1))).detach()
    var2, mean2 = torch.var_mean(h2, dim=(0, 2, 3), unbiased=False)
    q = 0.1
    pred_mean, pred_var = pred_mean.detach(), pred_var.detach()
    fused_mean = (1 - q) * pred_mean + q * mean2
    fused_var = (1 - q) * pred_var + q * var2 + q * (1 - q) * (mean2 - pred_mean) ** 2
    torch.testing.assert_close(out, normalise(h2, fused_mean, fused_var, kn2), rtol=1e-4, atol=1e-4)
    assert (out - normalise(h2, mean2, var2, kn2)).abs().max() > 1e-2  # the prediction matters

    # eval: running averages of the estimates
    torch.testing.assert_close(kn2.running_mean, 0.1 * fused_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kn2.running_var, 0.9 + 0.1 * fused_var, rtol=1e-4, atol=1e-5)
    kn2.eval()
    torch.testing.assert_close(kn2(h2), normalise(h2, kn2.running_mean, kn2.running_var, kn2), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_gain_and_the_earlier_layers_through_the_prediction():
    model = chain()
    kn2 = model[4]
    model(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    assert kn2.gain_logit.grad.abs().sum() > 0
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_guard_and_stale_predecessor_fall_back_to_batch_statistics():
    model = chain()
    conv1, kn1, relu, conv2, kn2 = model
    # a predicted variance far above the observed one (the input scale is normalised away by kn1)
    x = torch.randn(4, 3, 8, 8) * 1000
    h2 = conv2(relu(kn1(conv1(x))))
    var2, mean2 = torch.var_mean(h2.detach(), dim=(0, 2, 3), unbiased=False)
    out = kn2(h2)
    torch.testing.assert_close(out, normalise(h2.detach(), mean2, var2, kn2), rtol=1e-4, atol=1e-4)
    # kn1 did not run in this step: nothing to carry
    kn2(h2.detach())
    kn2(h2.detach())
    assert kn2.prediction() is None


def test_learned_or_fixed_gain_and_copies():
    assert "gain_logit" in dict(build_norm("kn", 3).named_parameters())
    fixed = build_norm("kn:gain=0.3,learn_gain=false", 3)
    assert "gain_logit" not in dict(fixed.named_parameters()) and "gain_logit" in fixed.state_dict()
    torch.testing.assert_close(fixed.gain, torch.full((3,), 0.3))
    model = chain()
    model(torch.randn(2, 3, 6, 6))
    twin = copy.deepcopy(model)  # the estimate in the graph is not copied
    assert twin[4].prediction() is None
    torch.testing.assert_close(twin.state_dict()["4.running_mean"], model.state_dict()["4.running_mean"])


def test_binding_errors():
    kn = build_norm("kn", 4)
    with pytest.raises(ValueError, match="kn: bind_preceding takes the Conv1d/2d/3d or Linear"):
        kn.bind_preceding(nn.ReLU())
    with pytest.raises(ValueError, match="has 3 output channels, this layer normalises 4"):
        kn.bind_preceding(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="cannot precede itself"):
        kn.bind_preceding(kn)
