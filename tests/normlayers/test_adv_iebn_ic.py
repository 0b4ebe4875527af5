"""IEBN and the IC layer against torch's BatchNorm2d plus the papers' extra steps written out."""

import pytest
import torch
from torch import nn

from normlayers import build_norm


def randomise(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1.0, 1.5)


def iebn_reference(bn, layer, x):
    """BN without affine (torch's), then x_hat * gamma * sigmoid(w * avgpool(x) + b) + beta."""
    shape = (1, -1, 1, 1)
    x_hat = bn(x)
    gate = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True) * layer.gate_weight.reshape(shape)
                         + layer.gate_bias.reshape(shape))
    return x_hat * layer.weight.reshape(shape) * gate + layer.bias.reshape(shape)


def test_iebn_initial_gate_is_the_reference_codes():
    layer = build_norm("iebn", 3)
    assert torch.equal(layer.gate_weight, torch.zeros(3))
    assert torch.equal(layer.gate_bias, torch.full((3,), -1.0))
    x = torch.randn(4, 3, 5, 5)
    bn = nn.BatchNorm2d(3, affine=False)
    torch.testing.assert_close(layer(x), bn(x) * torch.sigmoid(torch.tensor(-1.0)), rtol=1e-5, atol=1e-6)


def test_iebn_matches_bn_plus_gate_in_train_then_eval():
    torch.manual_seed(0)
    layer = build_norm("iebn:momentum=0.2", 3)
    randomise(layer)
    bn = nn.BatchNorm2d(3, affine=False, momentum=0.2)
    for step in range(3):
        x = torch.randn(6, 3, 5, 5) * (step + 1) + step
        x_ref = x.clone().requires_grad_()
        x.requires_grad_()
        out, ref = layer(x), iebn_reference(bn, layer, x_ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x_ref, grad)[0],
                                   rtol=1e-4, atol=1e-5)
    layer.eval(), bn.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), iebn_reference(bn, layer, x), rtol=1e-5, atol=1e-5)


def test_iebn_process_group_reaches_its_batch_statistics():
    layer = build_norm("iebn", 3)
    sentinel = object()
    layer.process_group = sentinel
    assert layer.bn.process_group is sentinel and layer.process_group is sentinel
    layer.process_group = None
    assert layer.bn.process_group is None


def test_ic_without_dropout_is_bn_and_eval_never_drops():
    torch.manual_seed(0)
    ic = build_norm("ic:drop=0.0", 4)
    randomise(ic)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(ic.state_dict())
    for _ in range(2):
        x = torch.randn(5, 4, 3, 3)
        torch.testing.assert_close(ic(x), bn(x))
    dropping = build_norm("ic:drop=0.5", 4)
    dropping.load_state_dict(ic.state_dict())
    dropping.eval(), bn.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(dropping(x), bn(x))


def test_ic_training_is_bn_then_inverted_dropout():
    torch.manual_seed(0)
    p = 0.3
    ic = build_norm(f"ic:drop={p}", 4)
    randomise(ic)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(ic.state_dict())
    x = torch.randn(64, 4, 8, 8)
    out, ref = ic(x), bn(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.02
    torch.testing.assert_close(out[kept], ref[kept] / (1 - p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ic.running_mean, bn.running_mean)  # statistics see the undropped input


@pytest.mark.parametrize("spec", ["iebn", "ic"])
def test_single_value_batches_fail_with_the_layer_name(spec):
    layer = build_norm(spec, 4)
    with pytest.raises(ValueError, match=rf"^{spec}: training needs more than one value per statistic"):
        layer(torch.randn(1, 4))


def test_ic_mask_words_are_uniform_and_independent():
    """Each element's keep draw is one 16-bit word of a random int64: every word position of the four must
    keep at 1 - p (a sign bit left out of the draw would bias one of them), and neighbours (words of one
    int64) must be independent."""
    from normlayers.ic import dropout_scale, realised_drop

    torch.manual_seed(0)
    p = 0.3
    n = 400_000
    scale = dropout_scale(torch.empty(n // 4, 4), p)
    kept = scale != 0
    values = scale.unique()
    assert values.numel() == 2 and values[0] == 0
    assert values[1].item() == pytest.approx(1 / (1 - realised_drop(p)), rel=1e-7)
    sd = (p * (1 - p) / (n // 4)) ** 0.5
    for position in range(4):
        assert abs(kept[:, position].float().mean().item() - (1 - p)) < 5 * sd, position
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):
        both = (kept[:, a] & kept[:, b]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * sd, (a, b)
    # the realised rate is p to 2^-16, and the scale keeps the layer unbiased for it
    assert abs(realised_drop(p) - p) <= 2**-17 and realised_drop(0.05) == round(0.05 * 65536) / 65536
    assert abs(scale.mean().item() - 1.0) < 5 * sd / (1 - p)
