"""NormSpec: one parse of a spec, its canonical text, its checks without a real layer."""

from __future__ import annotations

import pytest
import torch

from normlayers import NormLayer, NormSpec, available, build_norm
from normlayers.groupnorm import GroupNorm
from normlayers.ic import IndependentComponent


def test_text_and_mapping_give_one_canonical_spec():
    written = [NormSpec.parse("gn:eps=1e-5,groups=8"), NormSpec.parse(" gn: groups=8, eps=0.00001"),
               NormSpec.parse({"name": "gn", "eps": 1e-5, "groups": 8})]
    assert written[0] == written[1] == written[2]
    # options in the constructor's order, values as they parse back
    assert str(written[0]) == "gn:groups=8,eps=1e-05"
    assert NormSpec.parse(str(written[0])) == written[0]
    assert str(NormSpec.parse("bn")) == "bn" and str(NormSpec.parse("ghost:virtual_batch=4")) == "ghost:virtual_batch=4"
    assert str(NormSpec.parse({"name": "bn", "affine": False, "momentum": None})) == "bn:momentum=none,affine=false"
    assert NormSpec.parse("bn:momentum=none,affine=false").kwargs == {"momentum": None, "affine": False}


def test_int_for_a_float_option_is_the_float():
    spec = NormSpec.parse("gn:eps=1")
    assert spec.kwargs == {"eps": 1.0} and isinstance(spec.kwargs["eps"], float) and str(spec) == "gn:eps=1.0"


def test_class_info_and_build():
    spec = NormSpec.parse("gn:groups=4")
    assert spec.cls is GroupNorm and spec.info == available()["gn"] and spec.info.name == "gn"
    layer = spec.build(8)
    assert isinstance(layer, GroupNorm) and layer.groups == 4 and layer.weight.device.type == "cpu"
    assert type(build_norm("gn:groups=4", 8)) is type(layer)


def test_placement_need_is_declared_on_the_class_and_its_info():
    assert NormLayer.before_weight_layer is False and IndependentComponent.before_weight_layer is True
    needs = {name for name, info in available().items() if info.before_weight_layer}
    assert needs == {"ic"}
    assert NormSpec.parse("ic").info.before_weight_layer and not NormSpec.parse("bn").info.before_weight_layer


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gn:group=4", r"norm 'gn': unknown option\(s\) group; valid options: groups, group_size, eps, affine"),
        ("gn:groups=four", r"norm 'gn': option 'groups' must be int or None, got 'four'"),
        ("gnn", r"unknown normalization 'gnn'"),
    ],
)
def test_parse_checks_names_and_types_against_the_signature(spec, message):
    with pytest.raises(ValueError, match=message):
        NormSpec.parse(spec)


def test_check_runs_the_constructor_rules_on_the_meta_device():
    spec = NormSpec.parse("gn:groups=3")  # the signature accepts it; 16 channels do not
    with pytest.raises(ValueError, match=r"gn: groups=3 does not divide num_features=16"):
        spec.check(16)
    spec.check(9)
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        NormSpec.parse("bn:eps=0").check(8)


def test_init_scale_is_set_by_the_layer():
    layer = NormSpec.parse("bn").build(4)
    layer.init_scale_(0.25)
    torch.testing.assert_close(layer.weight.detach(), torch.full((4,), 0.25))
    NormSpec.parse("bn:affine=false").build(4).init_scale_(0.25)  # no learned scale: nothing to set
