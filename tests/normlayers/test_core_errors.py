"""Every bad input to the core layers gets one clear ValueError saying what is wrong and what is valid."""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers import build_norm


def test_unknown_name_lists_the_variants():
    with pytest.raises(ValueError, match=r"unknown normalization 'gnn'; available: .*bgn.*brn.*evonorm_b0.*ghost.*gn"):
        build_norm("gnn", 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gn:group=4", r"norm 'gn': unknown option\(s\) group; valid options: groups, group_size, eps, affine"),
        ({"name": "ghost", "virtual": 4}, r"unknown option\(s\) virtual; valid options: virtual_batch, eps"),
        ("brn:rmax=3", r"unknown option\(s\) rmax; valid options: r_max, d_max, warmup_steps"),
        ("gn:groups=four", r"norm 'gn': option 'groups' must be int or None, got 'four'"),
        ("ghost:virtual_batch=2.5", r"option 'virtual_batch' must be int, got 2\.5"),
        ("frn:learn_eps=1", r"option 'learn_eps' must be bool, got 1"),
        ("bgn:groups=true", r"option 'groups' must be int, got True"),
        ("brn:r_max=big", r"option 'r_max' must be float, got 'big'"),
    ],
)
def test_unknown_or_mistyped_option(spec, message):
    with pytest.raises(ValueError, match=message):
        build_norm(spec, 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gn:groups", r"malformed option 'groups'; write 'name:key=value,key=value'"),
        ("gn:groups=4,", r"malformed option ''"),
        ("ghost:", r"has ':' but no options"),
        ({"groups": 4}, r"has no 'name' key"),
    ],
)
def test_malformed_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        build_norm(spec, 8)


@pytest.mark.parametrize(
    ("spec", "channels", "message"),
    [
        ("gn:groups=3", 8, r"gn: groups=3 does not divide num_features=8; use one of 1, 2, 4, 8"),
        ("gn:group_size=3", 8, r"gn: group_size=3 does not divide num_features=8; use one of 1, 2, 4, 8"),
        ("gn:groups=0", 8, r"gn: groups=0 does not divide num_features=8"),
        ("gn:groups=2,group_size=4", 8, r"gn: give groups or group_size, not both"),
        ("evonorm_s0:groups=4", 10, r"evonorm_s0: groups=4 does not divide num_features=10; use one of 1, 2, 5, 10"),
    ],
)
def test_groups_not_dividing_channels(spec, channels, message):
    with pytest.raises(ValueError, match=message):
        build_norm(spec, channels)


def test_bgn_groups_not_dividing_the_values_of_a_sample():
    layer = build_norm("bgn:groups=7", 8)
    with pytest.raises(ValueError, match=r"bgn: groups=7 does not divide the C\*H\*W=128 values of each sample"):
        layer(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ("brn", (1, 8)),
        ("brn", (1, 8, 1, 1)),
        ("bgn:groups=8", (1, 8)),
        # (evonorm_b0 on one value per channel also has one value per instance: refused in eval too,
        # see test_zoo_every_variant.py)
    ],
)
def test_one_value_per_channel_in_training(spec, shape):
    layer = build_norm(spec, 8)
    who = spec.split(":")[0]
    with pytest.raises(ValueError, match=rf"{who}: training needs more than one value per statistic.*got input of "
                                         rf"shape \({shape[0]}, 8.*use a larger batch, a per-sample norm"):
        layer(torch.randn(shape))
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # eval uses running statistics: fine


def test_ghost_batches_of_one_value():
    layer = build_norm("ghost:virtual_batch=1", 8)
    message = r"ghost: training needs more than one value per statistic, but virtual_batch=1 on input of shape "
    with pytest.raises(ValueError, match=message + r"\(4, 8\) gives one; use virtual_batch >= 2"):
        layer(torch.randn(4, 8))
    assert layer(torch.randn(4, 8, 2, 2)).shape == (4, 8, 2, 2)  # one sample, four positions: fine


def test_instance_norm_on_1x1_maps():
    with pytest.raises(ValueError, match=r"in: instance statistics need more than one spatial position.*use ln or gn"):
        build_norm("in", 8)(torch.randn(4, 8, 1, 1))


@pytest.mark.parametrize("batch", [6, 2])
def test_virtual_batch_not_dividing_the_batch(batch):
    layer = build_norm("ghost:virtual_batch=4", 8)
    with pytest.raises(ValueError, match=rf"ghost: virtual_batch=4 does not divide the batch of {batch} samples; "
                                         rf"use a batch size that is a multiple of 4 or a virtual_batch that divides"):
        layer(torch.randn(batch, 8, 3, 3))
    assert int(layer.num_batches_tracked) == 0  # nothing half-done


@pytest.mark.parametrize("spec", ["pn", "in", "evonorm_b0", "evonorm_s0"])
def test_feature_map_only_layers_reject_nc_input(spec):
    with pytest.raises(ValueError, match=rf"{spec}: needs spatial input \(N, 8, H, W\), got shape \(4, 8\)"):
        build_norm(spec, 8)(torch.randn(4, 8))


@pytest.mark.parametrize("spec", ["ghost", "brn", "gn", "ln", "frn", "bgn", "pn"])
def test_wrong_channel_count(spec):
    message = rf"{spec}: expected input \(N, 8\) or \(N, 8, H, W\), got shape \(4, 6, 3, 3\)"
    with pytest.raises(ValueError, match=message):
        build_norm(spec, 8)(torch.randn(4, 6, 3, 3))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("brn:r_max=0.5", r"brn: need r_max >= 1 and d_max >= 0"),
        ("brn:d_max=-1", r"brn: need r_max >= 1 and d_max >= 0"),
        ("brn:warmup_steps=-1", r"brn: step counts must be >= 0"),
        ("ghost:virtual_batch=0", r"ghost: virtual_batch must be a positive number of samples, got 0"),
        ("bgn:groups=0", r"bgn: groups must be a positive int, got 0"),
    ],
)
def test_invalid_option_values(spec, message):
    with pytest.raises(ValueError, match=message):
        build_norm(spec, 8)



WITH_EPS = [name for name, info in sorted(normlayers.available().items()) if "eps" in info.options]
WITH_MOMENTUM = [name for name, info in sorted(normlayers.available().items()) if "momentum" in info.options]


@pytest.mark.parametrize("name", WITH_EPS)
def test_eps_must_be_positive_for_every_variant(name):
    with pytest.raises(ValueError, match=rf"^{name}: eps must be > 0, got 0\.0$"):
        build_norm(f"{name}:eps=0", 8)


@pytest.mark.parametrize("name", WITH_MOMENTUM)
def test_momentum_must_be_a_fraction_for_every_variant(name):
    message = rf"^{name}: momentum must be in \[0, 1\] or None \(cumulative average\), got 1\.5$"
    with pytest.raises(ValueError, match=message):
        build_norm(f"{name}:momentum=1.5", 8)
