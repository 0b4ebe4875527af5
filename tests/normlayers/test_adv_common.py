"""What every advanced variant must do: build from a spec, train in a model, round-trip, fail clearly."""

import pytest
import torch
from torch import nn

from normlayers import available, build_norm, link_kalman_layers

SPECS = ["cbn:burnin=0,k=2", "iebn", "proxy", "proxy:base=gn,groups=2", "kn", "ic:drop=0.1"]


class TinyNet(nn.Module):
    """conv -> norm (-> ReLU unless the norm includes it) twice, then a linear head; bound as models must."""

    def __init__(self, spec):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm1, self.norm2 = build_norm(spec, 4), build_norm(spec, 4)
        self.norm1.bind_preceding(self.conv1)
        self.norm2.bind_preceding(self.conv2)
        link_kalman_layers(self)
        self.act = nn.Identity() if self.norm1.includes_activation else nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("batch", [2, 32])
def test_trains_at_small_and_large_batch(spec, batch):
    torch.manual_seed(0)
    net = TinyNet(spec)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, target = torch.randn(batch, 3, 4, 4), torch.randint(0, 3, (batch,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        # (the first kn layer's gain has no prediction to weigh, so no gradient)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
        assert net.conv1.weight.grad.abs().sum() > 0 and net.norm1.weight.grad.abs().sum() > 0
        opt.step()
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 3)


@pytest.mark.parametrize("spec", SPECS)
def test_bfloat16_input_keeps_its_dtype(spec):
    torch.manual_seed(0)
    net = TinyNet(spec).to(torch.bfloat16)
    out = net(torch.randn(4, 3, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    layer_out = net.norm1(net.conv1(torch.randn(4, 3, 4, 4, dtype=torch.bfloat16)))
    assert layer_out.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip(spec):
    torch.manual_seed(0)
    trained, fresh = TinyNet(spec), TinyNet(spec)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        loss = trained(torch.randn(4, 3, 4, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = trained.state_dict()
    fresh.load_state_dict(state)
    assert state.keys() == fresh.state_dict().keys()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key])
    trained.eval(), fresh.eval()
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(fresh(x), trained(x))
    assert not any(torch.equal(value, TinyNet(spec).state_dict()[key]) for key, value in state.items()
                   if key.endswith("running_mean"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cbn:k=-1", "cbn: k (previous iterations to use) must be >= 0, got -1"),
        ("cbn:burnin=-5", "cbn: burnin (steps before the buffer is used) must be >= 0, got -5"),
        ("cbn:k=1.5", "norm 'cbn': option 'k' must be int, got 1.5"),
        ("cbn:momentum=2", "cbn: momentum must be in [0, 1] or None"),
        ("iebn:eps=0", "iebn: eps must be > 0, got 0"),
        ("proxy:base=bn", "proxy: base must be one of ln, gn, got 'bn'"),
        ("proxy:groups=2", "proxy: groups=2 only applies to base=gn; write proxy:base=gn,groups=2"),
        ("proxy:base=gn,groups=3", "proxy: groups=3 does not divide num_features=4; use one of 1, 2, 4"),
        ("proxy:activation=tanh", "proxy: activation must be one of relu, silu, gelu, got 'tanh'"),
        ("proxy:samples=1", "proxy: samples (Gaussian quantiles for the proxy) must be >= 2, got 1"),
        ("kn:gain=1.5", "kn: gain (the weight of the layer's own batch statistics) must be in (0, 1), got 1.5"),
        ("ic:drop=1.0", "ic: drop (the dropout probability) must be in [0, 1), got 1.0"),
        ("ic:p=0.1", "norm 'ic': unknown option(s) p; valid options: drop, eps, momentum, affine"),
    ],
)
def test_bad_options_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as info:
        build_norm(spec, 4)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["cbn", "kn"])
def test_single_value_batches_fail_with_the_layer_name(spec):
    with pytest.raises(ValueError, match=rf"^{spec}: training needs more than one value per statistic"):
        build_norm(spec, 4)(torch.randn(1, 4))


def test_wrong_channels_fail_clearly():
    for spec in ("cbn", "iebn", "proxy", "kn", "ic"):
        with pytest.raises(ValueError, match=rf"^{spec}: expected input \(N, 4\) or \(N, 4, H, W\), got shape"):
            build_norm(spec, 4)(torch.randn(2, 3, 5, 5))


def test_registry_flags():
    info = available()
    for name in ("cbn", "iebn", "kn", "ic"):
        assert info[name].batch_dependent and not info[name].includes_activation
    assert info["proxy"].includes_activation and not info["proxy"].batch_dependent
    assert build_norm("cbn", 4).needs_preceding_weight and build_norm("kn", 4).needs_preceding_weight
    assert not build_norm("iebn", 4).needs_preceding_weight
