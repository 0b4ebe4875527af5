"""The variants users of timm, mmcv and detectron2 compare against (sn, rms, dbn, iternorm, frozen), each
against a reference written here from its paper's equations or against torch's own layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlayers import available, build_norm, freeze_norms, unfreeze_norms
from normlayers.frozen import FrozenBatchNorm, FrozenNorm

C = 8
EPS = 1e-5
NEW = ("sn", "rms", "dbn", "iternorm", "frozen")


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("weight", "bias"):
                p.copy_((torch.rand(p.shape, generator=generator) + 0.5) if name == "weight"
                        else torch.randn(p.shape, generator=generator) * 0.3)
    return layer


def sample(shape, seed=0, mean=1.0, std=2.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)


def test_flags_and_descriptions():
    info = available()
    assert {name for name in NEW if info[name].batch_dependent} == {"sn", "dbn", "iternorm"}
    assert not any(info[name].includes_activation for name in NEW)
    assert all(info[name].description for name in NEW)


# ----------------------------------------------------------------------------- sn


def one_hot(layer, which: str) -> None:
    index = ("in", "ln", "bn").index(which)
    logits = torch.full((3,), float("-inf"))
    logits[index] = 0.0
    with torch.no_grad():
        layer.mean_weight.copy_(logits)
        layer.var_weight.copy_(logits)


@pytest.mark.parametrize(("which", "spec"), [("in", "in:affine=true"), ("ln", "ln"), ("bn", "bn")])
def test_sn_with_one_hot_weights_is_in_ln_or_bn(which, spec):
    sn = randomize(build_norm("sn:momentum=0.2", C))
    one_hot(sn, which)
    other = build_norm(spec.replace("bn", "bn:momentum=0.2") if which == "bn" else spec, C)
    other.load_state_dict({k: v for k, v in sn.state_dict().items() if k in other.state_dict()})
    for step in range(3):
        x = sample((6, C, 5, 4), seed=step, mean=3.0)
        torch.testing.assert_close(sn(x), other(x), rtol=1e-5, atol=1e-5)
    # the running statistics are BN's, whichever the weights: they match a bn layer's
    bn = build_norm("bn:momentum=0.2", C)
    for step in range(3):
        bn(sample((6, C, 5, 4), seed=step, mean=3.0))
    torch.testing.assert_close(sn.running_mean, bn.running_mean)
    torch.testing.assert_close(sn.running_var, bn.running_var)
    sn.eval(), other.eval()
    x = sample((3, C, 5, 4), seed=9)
    if which == "bn":
        torch.testing.assert_close(sn(x), other(x), rtol=1e-5, atol=1e-5)  # eval: running statistics
    else:
        torch.testing.assert_close(sn(x), other.train()(x), rtol=1e-5, atol=1e-5)  # per sample in eval too


def test_sn_mixes_the_three_with_separate_softmax_weights():
    sn = randomize(build_norm("sn", C))
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.3, -1.0, 0.8]))
        sn.var_weight.copy_(torch.tensor([-0.5, 1.2, 0.1]))
    x = sample((5, C, 4, 4), mean=-2.0).double()
    y = sn.double()(x)
    # the paper's Eq. 2-5 written out: each statistic over its own set of values
    flat = x.reshape(5, C, -1)
    means = [flat.mean(2), flat.reshape(5, -1).mean(1, keepdim=True).expand(5, C),
             flat.transpose(0, 1).reshape(C, -1).mean(1)[None].expand(5, C)]
    variances = [flat.var(2, correction=0), flat.reshape(5, -1).var(1, correction=0, keepdim=True).expand(5, C),
                 flat.transpose(0, 1).reshape(C, -1).var(1, correction=0)[None].expand(5, C)]
    mean_w, var_w = torch.softmax(sn.mean_weight, 0), torch.softmax(sn.var_weight, 0)
    mean = sum(w * m for w, m in zip(mean_w, means, strict=True))
    var = sum(w * v for w, v in zip(var_w, variances, strict=True))
    ref = (x - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + EPS) * sn.weight[:, None, None] \
        + sn.bias[:, None, None]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_sn_needs_feature_maps():
    with pytest.raises(ValueError, match=r"^sn: needs spatial input \(N, 8, H, W\), got shape \(4, 8\)"):
        build_norm("sn", C)(torch.randn(4, C))


# ----------------------------------------------------------------------------- rms


@pytest.mark.parametrize("shape", [(4, C, 3, 5), (4, C)])
@pytest.mark.parametrize("spec", ["rms", "rms:bias=true,eps=1e-6", "rms:affine=false"])
def test_rms_against_its_equation(shape, spec):
    layer = randomize(build_norm(spec, C))
    x = sample(shape, mean=0.5)
    y = layer(x)
    xd = x.double()
    rms = torch.sqrt(xd.square().reshape(shape[0], -1).mean(1) + layer.eps).reshape(-1, *[1] * (len(shape) - 1))
    ref = xd / rms
    per_channel = (-1,) + (1,) * (len(shape) - 2)
    if layer.weight is not None:
        ref = ref * layer.weight.double().reshape(per_channel)
    if layer.bias is not None:
        ref = ref + layer.bias.double().reshape(per_channel)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.eval()(x), y)  # no batch or running statistics


# ----------------------------------------------------------------------------- dbn, iternorm


def explicit_zca(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C, ...) in float64 -> (whitened x, per-channel mean, (G, d, d) ZCA matrices), by SVD."""
    n, channels = x.shape[:2]
    d = channels // groups
    vectors = x.transpose(0, 1).reshape(groups, d, -1)
    out, matrices = [], []
    for g in range(groups):
        v = vectors[g]
        centred = v - v.mean(1, keepdim=True)
        sigma = centred @ centred.T / v.shape[1] + eps * torch.eye(d, dtype=x.dtype)
        u, s, _ = torch.linalg.svd(sigma)
        w = u @ torch.diag(s ** -0.5) @ u.T
        matrices.append(w)
        out.append(w @ centred)
    white = torch.stack(out).reshape(channels, n, *x.shape[2:]).transpose(0, 1)
    return white, vectors.mean(2).reshape(-1), torch.stack(matrices)


def correlated(shape, seed=0):
    """Channels mixed by a random matrix: a covariance far from diagonal."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    mix = torch.randn(shape[1], shape[1], generator=generator, dtype=torch.float64) * 0.5 + torch.eye(shape[1])
    return torch.einsum("dc,nc...->nd...", mix, x) + 2.0


@pytest.mark.parametrize("shape", [(16, C, 3, 3), (64, C)])
@pytest.mark.parametrize("groups", [1, 2])
def test_dbn_whitens_each_group_and_equals_an_explicit_zca(shape, groups):
    layer = build_norm(f"dbn:groups={groups},affine=false,eps=1e-9", C).double()
    x = correlated(shape)
    y = layer(x)
    white, mean, matrices = explicit_zca(x, groups, 1e-9)
    torch.testing.assert_close(y, white, rtol=1e-9, atol=1e-9)
    d = C // groups
    vectors = y.transpose(0, 1).reshape(groups, d, -1)
    for g in range(groups):
        cov = torch.cov(vectors[g], correction=0)
        # identity up to eps: Sigma^{-1/2} cov Sigma^{-1/2} = I - eps Sigma^{-1}
        torch.testing.assert_close(cov, torch.eye(d, dtype=x.dtype), rtol=0, atol=1e-6)
    # running state: torch's momentum convention on the mean and on the whitening matrix
    torch.testing.assert_close(layer.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.running_whitening, 0.9 * torch.eye(d, dtype=x.dtype) + 0.1 * matrices)
    layer.eval()
    x_eval = correlated(shape, seed=5)
    ref = torch.einsum("gij,gjm->gim", layer.running_whitening,
                       x_eval.transpose(0, 1).reshape(groups, d, -1) - layer.running_mean.reshape(groups, d, 1))
    torch.testing.assert_close(layer(x_eval), ref.reshape(C, shape[0], *shape[2:]).transpose(0, 1))


def test_dbn_affine_is_per_channel():
    layer = randomize(build_norm("dbn:groups=2", C)).double()
    x = correlated((16, C, 2, 2))
    white, _, _ = explicit_zca(x, 2, 1e-5)
    ref = white * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)


# Measured on correlated (64, 8, 3, 3) data, one group of 8 (eigenvalues of Sigma / tr from 0.006 to
# 0.28), float64: max |iternorm - dbn| of the outputs is 3.0 at T=1, 2.5 at T=3, 1.5 at T=5 and 4e-7 at
# T=10 (the smallest eigenvalue's direction converges last), 1e-14 from T=15 on (stable to T=50).
def test_iternorm_converges_to_dbn_as_iterations_grow():
    x = correlated((64, C, 3, 3))
    reference = build_norm("dbn:groups=1", C).double()(x)
    errors = {}
    for iterations in (1, 3, 5, 10, 30):
        layer = build_norm(f"iternorm:groups=1,iterations={iterations}", C).double()
        errors[iterations] = (layer(x) - reference).abs().max().item()
    assert errors[1] > errors[3] > errors[5] > errors[10] >= errors[30]
    assert errors[10] < 1e-5 and errors[30] < 1e-10, errors


def test_iternorm_is_the_newton_schulz_iteration():
    layer = randomize(build_norm("iternorm:groups=2,iterations=3", C)).double()
    x = correlated((16, C, 2, 2))
    y = layer(x)
    vectors = x.transpose(0, 1).reshape(2, 4, -1)
    out = []
    for g in range(2):
        centred = vectors[g] - vectors[g].mean(1, keepdim=True)
        sigma = centred @ centred.T / centred.shape[1] + 1e-5 * torch.eye(4, dtype=x.dtype)
        trace = torch.trace(sigma)
        p = torch.eye(4, dtype=x.dtype)
        for _ in range(3):
            p = 0.5 * (3 * p - p @ p @ p @ (sigma / trace))
        out.append(p / torch.sqrt(trace) @ centred)
    white = torch.stack(out).reshape(C, 16, 2, 2).transpose(0, 1)
    torch.testing.assert_close(y, white * layer.weight[:, None, None] + layer.bias[:, None, None])


def test_whitening_options_are_checked():
    with pytest.raises(ValueError, match=r"^dbn: groups=3 does not divide num_features=8"):
        build_norm("dbn:groups=3", C)
    with pytest.raises(ValueError, match=r"^iternorm: iterations \(Newton-Schulz steps T\) must be >= 1, got 0$"):
        build_norm("iternorm:iterations=0", C)
    assert build_norm("dbn", 64).groups == 4 and build_norm("iternorm", 128).groups == 2
    assert build_norm("dbn", 8).groups == 1


# ----------------------------------------------------------------------------- frozen


def test_frozen_equals_eval_mode_bn_with_the_same_buffers():
    bn = randomize(nn.BatchNorm2d(C, eps=1e-3))
    for step in range(3):
        bn(sample((6, C, 4, 4), seed=step))
    frozen = build_norm("frozen:eps=1e-3", C)
    frozen.load_state_dict(bn.state_dict())  # the same keys
    assert list(frozen.parameters()) == []  # nothing trainable, statistics included
    bn.eval()
    for shape in [(5, C, 3, 3), (5, C)]:
        x = sample(shape, seed=11)
        expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if x.dim() == 4:
            torch.testing.assert_close(bn(x), expected)
        for mode in (True, False):
            torch.testing.assert_close(frozen.train(mode)(x), expected)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()(sample((6, C, 4, 4)))
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


class Net(nn.Module):
    """Every kind of layer freeze_norms meets: BN-like ones, the others with running statistics, torch's
    BatchNorm2d, and one with no running statistics (gn), which stays."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.cbn = build_norm("cbn:burnin=0", C)
        self.cbn.bind_preceding(self.conv)
        self.body = nn.Sequential(build_norm("bn", C), nn.ReLU(), build_norm("ghost:virtual_batch=2", C),
                                  build_norm("brn:warmup_steps=0", C), build_norm("sn", C),
                                  build_norm("dbn:group_size=4", C), build_norm("iternorm", C),
                                  build_norm("evonorm_b0", C), build_norm("gn:groups=2", C), nn.BatchNorm2d(C))

    def forward(self, x):
        return self.body(self.cbn(self.conv(x)))


def trained_net() -> Net:
    net = Net()
    for module in net.modules():
        randomize(module)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(3):
        loss = net(sample((4, 3, 5, 5), seed=step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_freeze_norms_fixes_every_layer_with_running_statistics_and_round_trips():
    net = trained_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = sample((4, 3, 5, 5), seed=20)
    net.eval()
    expected_eval = net(x)
    net.train()
    kinds_before = [type(m) for m in net.body]
    assert freeze_norms(net) is net
    kinds = [type(m) for m in net.body]
    assert kinds == [FrozenBatchNorm, nn.ReLU, FrozenBatchNorm, FrozenNorm, FrozenNorm, FrozenNorm, FrozenNorm,
                     FrozenNorm, kinds_before[8], FrozenBatchNorm]
    assert type(net.cbn) is FrozenBatchNorm
    # only the conv and gn still train; in training mode the output is the eval output, and nothing moves
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"conv.weight", "conv.bias", "body.8.weight", "body.8.bias"}
    torch.testing.assert_close(net.train()(x), expected_eval)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    net(sample((4, 3, 5, 5), seed=21))
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
    # round trip: the same classes and options, the same state, trainable again
    assert unfreeze_norms(net) is net
    assert [type(m) for m in net.body] == kinds_before and net.cbn.preceding is net.conv
    assert net.state_dict().keys() == state.keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.requires_grad for p in net.parameters())
    reference = trained_net()
    torch.testing.assert_close(net.train()(x), reference.train()(x))


def test_freeze_and_unfreeze_a_single_layer():
    bn = randomize(build_norm("bn", C))
    bn(sample((4, C, 3, 3)))
    frozen = freeze_norms(bn)
    assert isinstance(frozen, FrozenBatchNorm)
    torch.testing.assert_close(frozen(sample((2, C, 3, 3))), bn.eval()(sample((2, C, 3, 3))))
    assert unfreeze_norms(frozen) is bn
    # a frozen layer built from the spec unfreezes into bn
    plain = build_norm("frozen", C)
    with torch.no_grad():
        plain.running_mean.fill_(0.5)
    restored = unfreeze_norms(plain)
    assert restored.norm_name == "bn" and torch.equal(restored.running_mean, plain.running_mean)


# ----------------------------------------------------------------------------- every new variant


GRAD_SPECS = ["sn", "rms:bias=true", "dbn:group_size=4", "iternorm:group_size=4,iterations=3", "frozen"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", GRAD_SPECS)
def test_gradcheck_in_float64(spec, training):
    layer = randomize(build_norm(spec, 4)).double()
    layer(correlated((6, 4, 3, 3), seed=3))  # running statistics away from their initial values
    layer.train(training)
    names = [name for name, _ in layer.named_parameters()]
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    x = correlated((5, 4, 2, 3), seed=4).requires_grad_()

    def fn(inp, *params):
        # fresh copies of the buffers each call: every evaluation sees the same running statistics
        state = {**dict(zip(names, params, strict=True)), **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(layer, state, (inp,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", ["sn", "rms:bias=true", "dbn", "iternorm", "frozen"])
def test_reset_parameters_restores_the_initial_state(spec):
    layer = build_norm(spec, C)
    initial = {k: v.clone() for k, v in layer.state_dict().items()}
    randomize(layer)
    if spec != "frozen":
        layer(sample((4, C, 3, 3)))
    else:
        with torch.no_grad():
            layer.running_mean.fill_(2.0)
    layer.reset_parameters()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_under_autocast_statistics_are_float32():
    for spec in ["sn", "rms", "dbn", "iternorm", "frozen"]:
        layer = build_norm(spec, C)
        x = sample((8, C, 4, 4), seed=2)
        reference = build_norm(spec, C)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.05)
        for key, value in layer.named_buffers():
            assert value.dtype in (torch.float32, torch.long), key
