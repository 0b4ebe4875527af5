"""Contracts every registered variant keeps, checked over the registry (a new variant must be listed):
float64 input gives float64 statistics, channels_last input gives channels_last output, and a
statistic of one value is refused with a clear error, in training and (where the statistic is per
sample) in eval."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from normlayers import available, build_norm

C = 8
OFFSET = 1e4

#: one spec per registered variant that makes its own mechanism active on (8, C, 4, 4) input
SPECS = {
    "none": "none",
    "bn": "bn",
    "ghost": "ghost:virtual_batch=2",
    "brn": "brn:warmup_steps=0,r_max_steps=1,d_max_steps=1,r_max=1.5,d_max=0.5",
    "gn": "gn:groups=4",
    "ln": "ln",
    "in": "in:affine=true",
    "pn": "pn",
    "frn": "frn",
    "bgn": "bgn:groups=4",
    "evonorm_b0": "evonorm_b0",
    "evonorm_s0": "evonorm_s0:groups=4",
    "cbn": "cbn:burnin=0",
    "kn": "kn",
    "iebn": "iebn",
    "ic": "ic:drop=0.0",
    "proxy": "proxy",
    "sn": "sn",
    "rms": "rms",
    "dbn": "dbn:group_size=4",
    "iternorm": "iternorm:group_size=4",
    "frozen": "frozen",
}
#: train-mode output unchanged when a constant is added to the input (they subtract a mean)
SHIFT_INVARIANT = {"bn", "ghost", "gn", "ln", "in", "pn", "bgn", "cbn", "kn", "ic", "proxy", "sn", "dbn", "iternorm"}


def test_every_registered_variant_is_listed():
    assert set(SPECS) == set(available())


def randomized(spec: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = build_norm(spec, C)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name != "eps_learned":
                p.copy_(torch.rand_like(p) + 0.5 if name in ("weight", "v") else torch.randn_like(p) * 0.3)
    return layer


def trained(spec: str) -> torch.nn.Module:
    layer = randomized(spec)
    for step in range(3):
        layer(torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(step)) * 0.5 + OFFSET)
    return layer


def sample(shape=(8, C, 4, 4), offset: float = OFFSET, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(42)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 0.5 + offset).to(dtype)


def run(layer: torch.nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The output of a fresh copy (so running statistics do not carry over between calls)."""
    layer = copy.deepcopy(layer).train(training)
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_float64_input_gets_float64_statistics(name, training):
    layer = trained(SPECS[name])
    x = sample()
    y = run(layer, x, training)
    assert y.dtype == torch.float64
    # the layer converted to float64 (parameters and buffers) gives the same values
    torch.testing.assert_close(y, run(copy.deepcopy(layer).double(), x, training), rtol=0, atol=1e-10)
    # Resolution: a perturbation of 1e-7 at 1e4 is below float32's rounding there (1e-3): a float32
    # step anywhere in the path loses it. In float64 the response is linear: twice the step, twice the change.
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e-7
    once, twice = run(layer, x + delta, training) - y, run(layer, x + 2 * delta, training) - y
    assert once.abs().max() > 0, "the output does not resolve a 1e-7 change of a 1e4 input"
    torch.testing.assert_close(twice, 2 * once, rtol=0, atol=1e-4 * once.abs().max().item())
    if training and name in SHIFT_INVARIANT:
        # the same input without the offset: the float64 reference the +1e4 input must match
        torch.testing.assert_close(y, run(layer, x - OFFSET, training), rtol=0, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_channels_last_input_gives_channels_last_output(name, training):
    layer = trained(SPECS[name])
    x = sample(offset=1.0, dtype=torch.float32)
    x_last = x.contiguous(memory_format=torch.channels_last)
    y = run(layer, x_last, training)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, run(layer, x, training))
    # and the backward takes the channels_last gradient
    grad_layer = copy.deepcopy(layer).train(training)
    leaf = x_last.clone().requires_grad_()
    grad_layer(leaf).backward(torch.ones_like(y))
    assert torch.isfinite(leaf.grad).all()


#: (spec, channels, shape, refused in eval too): inputs that leave one value per statistic
ONE_VALUE = {
    "bn": [("bn", C, (1, C), False), ("bn", C, (1, C, 1, 1), False)],
    "ghost": [("ghost:virtual_batch=1", C, (4, C), False)],
    "brn": [("brn", C, (1, C), False), ("brn", C, (1, C, 1, 1), False)],
    "gn": [("gn:groups=8", C, (4, C, 1, 1), True), ("gn:groups=8", C, (4, C), True)],
    "ln": [("ln", 1, (4, 1, 1, 1), True), ("ln", 1, (4, 1), True)],
    "in": [("in", C, (4, C, 1, 1), True)],
    "pn": [("pn", 1, (4, 1, 3, 3), True)],
    "bgn": [("bgn:groups=8", C, (1, C), False), ("bgn:groups=16", C, (1, C, 1, 2), False)],
    "evonorm_b0": [("evonorm_b0", C, (4, C, 1, 1), True), ("evonorm_b0", C, (1, C, 1, 1), True)],
    "evonorm_s0": [("evonorm_s0:groups=8", C, (4, C, 1, 1), True)],
    "cbn": [("cbn", C, (1, C), False)],
    "kn": [("kn", C, (1, C, 1, 1), False)],
    "iebn": [("iebn", C, (1, C), False)],
    "ic": [("ic", C, (1, C, 1, 1), False)],
    "proxy": [("proxy:base=gn,groups=8", C, (4, C, 1, 1), True), ("proxy", 1, (4, 1, 1, 1), True)],
    "sn": [("sn", C, (4, C, 1, 1), True)],
    "rms": [("rms", 1, (4, 1), True), ("rms", 1, (4, 1, 1, 1), True)],
    "dbn": [("dbn", C, (1, C), False), ("dbn", C, (1, C, 1, 1), False)],
    "iternorm": [("iternorm", C, (1, C), False)],
}
#: variants with no statistic that a single value would make degenerate, and why
NO_SINGLE_VALUE_STATISTIC = {
    "none": "no statistics",
    # FRN's nu^2 is a mean square, not a variance: on one value (the paper's fully connected case,
    # Sec. 3.1) it is x^2, and the learned eps is the paper's answer to what that does
    "frn": "mean square about zero, defined by the paper for one value",
    "frozen": "fixed statistics, none computed from the input",
}


def test_every_variant_is_covered_by_the_single_value_check():
    assert set(ONE_VALUE) | set(NO_SINGLE_VALUE_STATISTIC) == set(available())
    assert not set(ONE_VALUE) & set(NO_SINGLE_VALUE_STATISTIC)


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, cases in sorted(ONE_VALUE.items()) for c in cases])
def test_one_value_per_statistic_is_refused(name, case):
    spec, channels, shape, in_eval = case
    layer = build_norm(spec, channels)
    with pytest.raises(ValueError, match=rf"^{name}: .*more than one .*{re.escape(str(tuple(shape)))}") as info:
        layer(torch.randn(shape))
    assert "\n" not in str(info.value)
    layer.eval()
    if in_eval:
        with pytest.raises(ValueError, match=rf"^{name}: .*more than one "):
            layer(torch.randn(shape))
    else:
        assert layer(torch.randn(shape)).shape == shape  # eval uses running statistics: fine


def test_bgn_with_groups_splitting_channels_refuses_another_spatial_size():
    layer = build_norm("bgn:groups=16", C)  # 16 groups of 8 channels: each group is half a channel
    layer(torch.randn(4, C, 4, 4))
    # same H*W, other layout: fine (the groups are cut from the flattened C*H*W values)
    assert layer(torch.randn(4, C, 2, 8)).shape == (4, C, 2, 8)
    for training in (True, False):
        layer.train(training)
        with pytest.raises(ValueError, match=r"^bgn: groups=16 does not divide num_features=8.*trained at\); got input "
                                             r"of shape \(4, 8, 6, 6\) with H\*W=36; use inputs of the training size"):
            layer(torch.randn(4, C, 6, 6))
    # the size is state: it survives a state_dict round trip
    restored = build_norm("bgn:groups=16", C)
    restored.load_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match=r"H\*W=16 positions"):
        restored.eval()(torch.randn(2, C, 6, 6))
    # groups dividing C hold whole channels: any spatial size, as BN
    whole = build_norm("bgn:groups=4", C)
    whole(torch.randn(4, C, 4, 4))
    assert whole.eval()(torch.randn(2, C, 5, 5)).shape == (2, C, 5, 5)


def test_bgn_loads_a_state_without_the_recorded_size():
    old = {k: v for k, v in build_norm("bgn:groups=16", C).state_dict().items() if k != "positions"}
    layer = build_norm("bgn:groups=16", C)
    layer.load_state_dict(old)
    assert int(layer.positions) == 0


def test_bound_kalman_chain_in_float64_keeps_float64_through_the_transition():
    """kn's prediction passes the previous layer's estimate through the bound conv (weights and bias):
    at a bias of 1e4 the output must equal that of the same chain without the offset (every statistic
    of the second layer moves with it), to float64 precision."""
    from torch import nn

    from normlayers import link_kalman_layers

    def chain(offset):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), build_norm("kn", C), nn.ReLU(),
                            nn.Conv2d(C, C, 3, padding=1), build_norm("kn", C)).double()
        net[1].bind_preceding(net[0])
        net[4].bind_preceding(net[3])
        link_kalman_layers(net)
        with torch.no_grad():
            net[3].bias += offset
        return net

    x = sample((8, 3, 4, 4), offset=0.0)
    with torch.no_grad():
        shifted, plain = chain(OFFSET)(x), chain(0.0)(x)
    assert shifted.dtype == torch.float64
    torch.testing.assert_close(shifted, plain, rtol=0, atol=1e-9)


def test_ghost_moments_of_float64_input_are_float64():
    from normlayers.sync import ghost_moments

    x = sample()
    moments = ghost_moments(x, 2)
    ghosts = (x - OFFSET).reshape(4, 2, C, -1).transpose(1, 2).reshape(4, C, -1)
    assert moments.mean.dtype == moments.var.dtype == torch.float64
    torch.testing.assert_close(moments.mean - OFFSET, ghosts.mean(2), rtol=0, atol=1e-10)
    # the variance comes from float64 sums of squares (the form that sums over ranks in one all-reduce):
    # rounding of 1e-16 * (mean / std)^2 = 4e-8 relative here, against 5e-4 for float32 statistics
    torch.testing.assert_close(moments.var, ghosts.var(2, correction=0), rtol=2e-7, atol=0)


def forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and parameter gradients of one step with a fixed output gradient."""
    leaf = x.clone().requires_grad_()
    y = layer(leaf)
    y.backward(torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape))
    return (y.detach(), leaf.grad, *(p.grad for p in layer.parameters() if p.requires_grad))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_variant_compiles_as_one_graph_and_matches_eager(name, training):
    """fullgraph=True fails on any graph break: a ``.item()``, a Python branch on a tensor's value, an
    op dynamo cannot trace. The aot_eager backend traces forward and backward through AOTAutograd
    as inductor does, without its C++ code generation (minutes on this machine); the benchmark
    (benchmarks/norm_layers.py) runs inductor. Two steps: running statistics and step counters
    carry over between calls, as in training."""
    torch._dynamo.reset()
    eager = trained(SPECS[name]).float().train(training)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    names = [f"grad of {n}" for n, p in eager.named_parameters() if p.requires_grad]
    for seed in range(2):
        x = (torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(seed)) + 0.5).float()
        for p in (*eager.parameters(), *compiled.parameters()):
            p.grad = None
        torch.manual_seed(seed)  # the same dropout draw (ic) in both
        want = forward_backward(eager, x)
        torch.manual_seed(seed)
        got = forward_backward(step, x)
        for what, w, g in zip(("output", "input gradient", *names), want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"{what}, step {seed}")
    for (key, w), g in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"{key} after two steps")
