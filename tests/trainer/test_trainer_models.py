"""Model builders: published sizes, norm sites, placement, activation rules, NormClassifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlayers
from normlayers import NormLayer
from trainer import ConfigError, NormClassifier, load_config
from trainer.models import build_model
from trainer.module import lr_factor, parameter_groups


def model(arch="cifar_resnet", depth=20, norm="bn", placement="all", classes=10, channels=3, size=32, **kw):
    cfg = {"arch": arch, "depth": depth, "norm": norm, "norm_placement": placement, "norm_init_scale": 1.0, **kw}
    return build_model(cfg, classes, channels, size)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def norm_sites(m: nn.Module, name: str | None = None) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, NormLayer) and (name is None or x.norm_name == name)]


def test_cifar_resnets_have_the_papers_sizes():
    # He et al. 2016, table 6: ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M parameters
    for depth, millions in ((20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)):
        assert round(n_params(model(depth=depth)) / 1e6, 2 if depth < 110 else 1) == millions
    m = model()
    assert len(norm_sites(m, "bn")) == 19 and len([x for x in m.modules() if isinstance(x, nn.ReLU)]) == 19
    assert model()(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert model(channels=1, size=8)(torch.randn(4, 1, 8, 8)).shape == (4, 10)  # digits


def test_imagenet_resnets_match_torchvisions_parameter_counts():
    # torchvision's resnet18 / resnet50 (1000 classes): 11,689,512 and 25,557,032 parameters
    assert n_params(model("resnet", 18, classes=1000)) == 11_689_512
    assert n_params(model("resnet", 50, classes=1000)) == 25_557_032
    assert model("resnet", 18, size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preact_plain_and_mlp_build_and_run():
    pre = model("cifar_preact_resnet", 20)
    assert len(norm_sites(pre, "bn")) == 19  # two per block, one before the classifier
    assert pre(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = model("plain_cnn", 9, width=8)
    assert len([x for x in plain.modules() if isinstance(x, nn.Conv2d)]) == 9 and len(norm_sites(plain, "bn")) == 9
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mlp = model("mlp", 5, width=32, channels=1, size=8)
    assert len([x for x in mlp.modules() if isinstance(x, nn.Linear)]) == 6 and len(norm_sites(mlp, "bn")) == 5
    assert mlp(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("arch,depth", [("cifar_resnet", 8), ("cifar_preact_resnet", 8), ("resnet", 18),
                                        ("plain_cnn", 4), ("mlp", 3)])
def test_placement_final_and_none(arch, depth):
    everywhere = norm_sites(model(arch, depth, "bn", "all", width=8), "bn")
    final = model(arch, depth, "bn", "final", width=8)
    (only,) = norm_sites(final, "bn")
    assert only is final.final_norm  # the one site right before the classifier
    assert norm_sites(model(arch, depth, "bn", "none", width=8), "bn") == []
    assert len(everywhere) > 1
    x = torch.randn(4, 3, 32, 32)
    assert final(x).shape == (4, 10)


def test_no_relu_after_layers_that_include_their_activation():
    with_act = [n for n, i in normlayers.available().items() if i.includes_activation]
    assert "frn" in with_act
    for name in with_act:
        m = model(norm=name, depth=8)
        relus = [x for x in m.modules() if isinstance(x, nn.ReLU)]
        assert relus == [], f"{name}: ReLU after a layer that includes its activation"
        assert m(torch.randn(4, 3, 16, 16)).shape == (4, 10)
    pre = model("cifar_preact_resnet", 8, norm="frn")
    assert not [x for x in pre.modules() if isinstance(x, nn.ReLU)]


def test_every_norm_layer_is_bound_to_its_preceding_layer(monkeypatch):
    bound = {}
    original = NormLayer.bind_preceding

    def spy(self, module):
        bound[id(self)] = module
        original(self, module)

    monkeypatch.setattr(NormLayer, "bind_preceding", spy)
    m = model(depth=8)
    for layer in norm_sites(m, "bn"):
        assert isinstance(bound.get(id(layer)), nn.Conv2d)
    block = m.blocks[0]
    assert bound[id(block.norm1)] is block.conv1 and bound[id(block.norm2)] is block.conv2
    assert bound[id(m.stem_norm)] is m.stem


def test_norm_init_scale_sets_gamma():
    m = model(depth=8, norm_init_scale=0.25)
    for layer in norm_sites(m, "bn"):
        assert torch.all(layer.weight == 0.25)


def test_weight_decay_skips_norm_parameters_and_biases():
    m = model(depth=8)
    decay, no_decay = parameter_groups(m, 5e-4)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    norm_params = {id(p) for layer in norm_sites(m) for p in layer.parameters()}
    assert norm_params and norm_params <= {id(p) for p in no_decay["params"]}
    assert id(m.fc.bias) in {id(p) for p in no_decay["params"]}
    weights = {id(x.weight) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == weights


def test_lr_schedule_warmup_cosine_and_step():
    optim = {"schedule": "cosine", "step_gamma": 0.1, "step_milestones": [0.5, 0.75]}
    assert [lr_factor(s, 110, 10, optim) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, 110, 10, optim) == 1.0 and lr_factor(60, 110, 10, optim) == pytest.approx(0.5)
    assert lr_factor(110, 110, 10, optim) == pytest.approx(0.0)
    optim["schedule"] = "step"
    assert [lr_factor(s, 100, 0, optim) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_norm_classifier_is_importable_and_trains_one_step():
    cfg = load_config(None, ["model.norm=gn:groups=4", "model.depth=8"])
    module = NormClassifier.from_config(cfg, num_classes=10, in_channels=1, image_size=8)
    assert "Lightning" in type(module).__mro__[1].__name__ and NormClassifier.__doc__
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(module(x), y)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert len(norm_sites(module.model, "gn")) == 7


def test_channels_last_gives_the_same_logits():
    plain = NormClassifier.from_config(load_config(None, ["model.depth=8"]), num_classes=10, in_channels=3,
                                       image_size=16).eval()
    fast = NormClassifier.from_config(load_config(None, ["model.depth=8", "trainer.channels_last=true"]),
                                      num_classes=10, in_channels=3, image_size=16).eval()
    fast.model.load_state_dict(plain.model.state_dict())
    assert fast.model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def forward_order(m: nn.Module, x: torch.Tensor) -> list[str]:
    """The leaf modules in the order a forward pass calls them, as type names."""
    calls: list[str] = []
    hooks = [leaf.register_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
             for leaf in m.modules() if not list(leaf.children())]
    m(x)
    for hook in hooks:
        hook.remove()
    return calls


def after_relu_before_weight(order: list[str], norm_cls: str) -> bool:
    """Every ``norm_cls`` call comes right after a ReLU, and the next weight layer is the next real call."""
    for i, name in enumerate(order):
        if name != norm_cls:
            continue
        following = [n for n in order[i + 1:] if n not in ("Identity", "PadShortcut")]
        if order[i - 1] != "ReLU" or following[0] not in ("Conv2d", "Linear"):
            return False
    return True


def test_ic_goes_after_the_relu_before_the_next_weight_layer():
    x = torch.randn(4, 3, 16, 16)
    ic_cls, bn_cls = type(normlayers.build_norm("ic", 4)).__name__, type(normlayers.build_norm("bn", 4)).__name__
    # CIFAR ResNet-8, stem then the first block (identity shortcut): conv1 ReLU IC conv2 (+x) ReLU IC
    ic = forward_order(model(norm="ic", depth=8, width=4), x)
    assert ic[:10] == ["Conv2d", "ReLU", ic_cls, "Conv2d", "ReLU", ic_cls, "Conv2d", "Identity", "ReLU", ic_cls]
    assert ic.count(ic_cls) == 7 and after_relu_before_weight(ic, ic_cls)
    bn = forward_order(model(norm="bn", depth=8, width=4), x)
    assert bn[:10] == ["Conv2d", bn_cls, "ReLU", "Conv2d", bn_cls, "ReLU", "Conv2d", bn_cls, "Identity", "ReLU"]
    assert not after_relu_before_weight(bn, bn_cls)
    # either order on request
    forced = forward_order(model(norm="bn", depth=8, width=4, norm_order="act_norm"), x)
    assert after_relu_before_weight(forced, bn_cls) and forced.count(bn_cls) == 7
    assert forward_order(model(norm="ic", depth=8, width=4, norm_order="norm_act"), x)[:3] == [
        "Conv2d", ic_cls, "ReLU"]
    for arch, depth, kw in (("cifar_preact_resnet", 8, {}), ("plain_cnn", 3, {}), ("mlp", 2, {"width": 8}),
                            ("resnet", 18, {}), ("resnet", 50, {})):
        order = forward_order(model(arch, depth, norm="ic", **{"width": 4, **kw}), torch.randn(2, 3, 32, 32))
        sites = len(norm_sites(model(arch, depth, norm="bn", **{"width": 4, **kw}), "bn"))
        if arch != "resnet":  # resnet's projection shortcuts keep conv -> norm (no activation on that path)
            assert after_relu_before_weight(order, ic_cls), (arch, order)
        assert order.count(ic_cls) == sites and order[-1] == "Linear"
    assert forward_order(model("mlp", 2, norm="ic", width=8), torch.randn(2, 3, 32, 32)) == [
        "Flatten", "Linear", "ReLU", ic_cls, "Linear", "ReLU", ic_cls, "Identity", "Linear"]


def test_act_norm_is_refused_where_it_makes_no_sense():
    for norm in ("cbn", "kn", "frn"):
        with pytest.raises(ValueError, match="model.norm_order: act_norm"):
            model(norm=norm, depth=8, norm_order="act_norm")
        with pytest.raises(ConfigError, match=r"^model\.norm_order: act_norm .* use norm_act or auto$"):
            load_config(None, [f"model.norm={norm}", "model.norm_order=act_norm"])
    with pytest.raises(ConfigError, match="model.norm_order: must be one of auto, norm_act, act_norm"):
        load_config(None, ["model.norm_order=sideways"])


def test_kalman_layers_are_chained_in_module_order():
    m = model(norm="kn", depth=8, width=4)
    layers = norm_sites(m, "kn")
    assert len(layers) == 7
    assert layers[0].__dict__["_previous"] is None
    assert all(b.__dict__["_previous"] is a for a, b in zip(layers, layers[1:], strict=False))
    m.train()(torch.randn(4, 3, 8, 8))
    # the first block's first layer predicts from the stem's estimate (same channels, same step)
    assert m.blocks[0].norm1.prediction() is not None and layers[0].prediction() is None
