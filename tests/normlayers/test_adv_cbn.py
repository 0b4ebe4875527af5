"""Cross-Iteration BN against plain BN and against the paper's compensation written out."""

import pytest
import torch
from torch import nn

from normlayers import build_norm

EPS = 1e-5


def batch_stats(y):
    """Per-channel mean and mean square of an NCHW tensor, in float64."""
    y = y.double()
    return y.mean(dim=(0, 2, 3)), (y * y).mean(dim=(0, 2, 3))


def normalise(y, mean, var, layer):
    shape = (1, -1, 1, 1)
    return (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS) * layer.weight.reshape(shape) \
        + layer.bias.reshape(shape)


def conv_and_cbn(spec, bias=False):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    cbn = build_norm(spec, 4)
    cbn.bind_preceding(conv)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    return conv, cbn


def test_k0_equals_bn_in_train_and_eval():
    conv, cbn = conv_and_cbn("cbn:k=0")
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict({k: v for k, v in cbn.state_dict().items()})
    for step in range(3):
        x = torch.randn(5, 3, 6, 6) + step
        y_in = conv(x)
        y_in_ref = y_in.detach().clone().requires_grad_()
        out = cbn(y_in)
        ref = bn(y_in_ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        (g_cbn,) = torch.autograd.grad(out, y_in, grad)
        (g_ref,) = torch.autograd.grad(ref, y_in_ref, grad)
        torch.testing.assert_close(g_cbn, g_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cbn.running_mean, bn.running_mean)
    torch.testing.assert_close(cbn.running_var, bn.running_var)
    cbn.eval(), bn.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(cbn(x), bn(x), rtol=1e-5, atol=1e-5)


def test_compensated_mean_is_exact_and_mean_square_first_order():
    conv, cbn = conv_and_cbn("cbn:k=1,burnin=0", bias=True)
    x_old = torch.randn(4, 3, 6, 6)
    cbn(conv(x_old))  # buffers iteration t-1 with its gradients and weights
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    old_mean, old_mean_sq = batch_stats(nn.functional.conv2d(x_old, w0, b0, padding=1))
    # mostly a rescaling (a first-order change of the mean square) plus noise
    direction_w = w0 + 0.3 * w0.std() * torch.randn_like(w0)
    direction_b = torch.randn_like(b0)

    errors = []
    for scale in (0.02, 0.01):
        with torch.no_grad():
            conv.weight.copy_(w0 + scale * direction_w)
            conv.bias.copy_(b0 + scale * direction_b)
        [(mean, var)] = cbn.compensated_history()  # (mean, variance): the mean square is var + mean^2
        mean_sq = var.double() + mean.double() ** 2
        true_mean, true_mean_sq = batch_stats(nn.functional.conv2d(x_old, conv.weight, conv.bias, padding=1))
        # the mean is linear in the weights: the Taylor step is exact
        torch.testing.assert_close(mean.double(), true_mean, rtol=1e-5, atol=1e-5)
        assert (true_mean - old_mean).abs().max() > 1e-3  # and the weights did move it
        errors.append((mean_sq.double() - true_mean_sq).abs().max().item())
        # first order: far closer than the uncompensated value
        assert errors[-1] < 0.1 * (true_mean_sq - old_mean_sq).abs().max().item()
    # the remainder is second order: halving the step divides it by four
    assert 3.5 < errors[0] / errors[1] < 4.5


def test_burnin_then_paper_average_over_compensated_iterations():
    conv, cbn = conv_and_cbn("cbn:k=2,burnin=3")
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    for step in range(1, 7):
        x = torch.randn(4, 3, 6, 6)
        history = [(m.double(), v.double() + m.double() ** 2) for m, v in cbn.compensated_history()]
        y_in = conv(x)
        out = cbn(y_in)
        mean_t, mean_sq_t = batch_stats(y_in.detach())
        if step <= 3:
            assert len(history) == max(step - 2, 0)  # filling, not yet used
            expected = normalise(y_in.detach().double(), mean_t, mean_sq_t - mean_t**2, cbn)
        else:
            assert len(history) == 2
            means, mean_sqs = [mean_t], [mean_sq_t]
            for m, ms in history:
                assert (ms - m * m >= 0).all()
                means.append(m), mean_sqs.append(ms)
            mean_bar = torch.stack(means).mean(0)
            var_bar = torch.stack(mean_sqs).mean(0) - mean_bar**2
            expected = normalise(y_in.detach().double(), mean_bar, var_bar, cbn)
            plain = normalise(y_in.detach().double(), mean_t, mean_sq_t - mean_t**2, cbn)
            assert (out.double() - plain).abs().max() > 1e-3  # the buffer changes the output
        torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-4, atol=1e-4)
        # recorded from step burnin - k + 1 on, so the buffer is full when burn-in ends
        assert len(cbn._history) == min(max(step - 1, 0), 2)
        opt.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        opt.step()


def test_buffered_statistics_with_negative_variance_are_dropped():
    conv, cbn = conv_and_cbn("cbn:k=1,burnin=0")
    x = torch.randn(4, 3, 6, 6)
    cbn(conv(x))
    with torch.no_grad():
        conv.weight.neg_()  # a step of -2W: the compensated mean square becomes -3 nu < 0
    [(mean, var)] = cbn.compensated_history()
    assert (var < 0).all()
    x2 = torch.randn(4, 3, 6, 6)
    y_in = conv(x2)
    out = cbn(y_in)
    mean_t, mean_sq_t = batch_stats(y_in.detach())
    expected = normalise(y_in.detach().double(), mean_t, mean_sq_t - mean_t**2, cbn)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-4, atol=1e-4)


def test_eval_uses_running_stats_of_the_current_batches():
    conv, cbn = conv_and_cbn("cbn:k=2,burnin=0")
    bn = nn.BatchNorm2d(4)
    for _ in range(4):
        y_in = conv(torch.randn(4, 3, 6, 6))
        cbn(y_in)
        bn(y_in.detach())
        with torch.no_grad():
            conv.weight.mul_(1.1)
    torch.testing.assert_close(cbn.running_mean, bn.running_mean)
    torch.testing.assert_close(cbn.running_var, bn.running_var)
    cbn.eval()
    y = torch.randn(2, 4, 5, 5)
    expected = normalise(y.double(), cbn.running_mean.double(), cbn.running_var.double(), cbn)
    torch.testing.assert_close(cbn(y).double(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_binding_keeps_the_conv_out_of_the_layer_state():
    conv, cbn = conv_and_cbn("cbn")
    assert set(cbn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert len(list(cbn.parameters())) == 2
    model = nn.Sequential(conv, cbn)
    assert len(list(model.parameters())) == 3  # conv weight, cbn weight and bias: nothing twice


def test_binding_errors_are_clear():
    cbn = build_norm("cbn:burnin=0", 4)
    with pytest.raises(ValueError, match="cbn: bind_preceding takes the Conv1d/2d/3d or Linear"):
        cbn.bind_preceding(nn.ReLU())
    with pytest.raises(ValueError, match="has 5 output channels, this layer normalises 4"):
        cbn.bind_preceding(nn.Conv2d(3, 5, 1))
    cbn.bind_preceding(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="does not depend on the bound layer's weight"):
        cbn(nn.Conv2d(3, 4, 1)(torch.randn(2, 3, 4, 4)))
