"""Models with a pluggable normalization layer at every norm site.

``build_model(model_cfg, num_classes, in_channels, image_size)`` builds ``model.arch``:
``cifar_resnet`` / ``cifar_preact_resnet`` (He et al. 2016, depth 6n+2), ``resnet``
(ImageNet-style, depth 18/34/50/101/152), ``plain_cnn`` and ``mlp`` (depth studies), ``reactnet`` (binary ReActNet-18,
:mod:`trainer.models.reactnet`). ``model.weight_std`` standardises every conv and linear weight
but the classifier's (:mod:`normlayers.weight_std`). Every norm
site uses ``model.norm`` under ``model.norm_placement`` and ``model.norm_order`` (see
:mod:`trainer.models.norms`); kn layers are chained in module order (``link_kalman_layers``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

import normlayers
from trainer.model_rules import DEFAULT_WIDTH, depth_problem  # noqa: F401  (the config's rules, without torch)
from trainer.models.cifar_resnet import CifarResNet
from trainer.models.norms import NormSites
from trainer.models.plain import MLP, PlainCNN
from trainer.models.reactnet import ReActNet
from trainer.models.resnet import ResNet

# arch -> the class that builds it (its depth rule is trainer.model_rules')
ARCHS: dict[str, type[nn.Module]] = {"cifar_resnet": CifarResNet, "cifar_preact_resnet": CifarResNet,
                                     "resnet": ResNet, "plain_cnn": PlainCNN, "mlp": MLP, "reactnet": ReActNet}


def build_model(model_cfg: Any, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The network ``model_cfg`` (the config's ``model`` section) describes."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
    arch, depth = model_cfg["arch"], model_cfg["depth"]
    if arch not in DEFAULT_WIDTH:
        raise ValueError(f"unknown model.arch {arch!r}; choose from {', '.join(DEFAULT_WIDTH)}")
    width = model_cfg.get("width") or DEFAULT_WIDTH[arch]
    norms = NormSites(model_cfg.get("norm", "bn"), model_cfg.get("norm_placement", "all"),
                      float(model_cfg.get("norm_init_scale", 1.0)), model_cfg.get("norm_order", "auto"))
    if arch in ("cifar_resnet", "cifar_preact_resnet"):
        model = CifarResNet(depth, num_classes, in_channels, width, norms, preact=arch == "cifar_preact_resnet")
    elif arch == "resnet":
        model = ResNet(depth, num_classes, in_channels, width, norms)
    elif arch == "reactnet":
        model = ReActNet(num_classes, in_channels, width, norms, model_cfg.get("binary", "none"),
                         normalizer_free=model_cfg.get("weight_std") == "scaled_ws")
    elif arch == "plain_cnn":
        model = PlainCNN(depth, num_classes, in_channels, width, norms)
    else:
        model = MLP(depth, num_classes, in_channels * image_size * image_size, width, norms)
    # Kalman Normalization carries each layer's estimate to the next kn layer (no-op without kn)
    normlayers.link_kalman_layers(model)
    normlayers.standardize_weights(model, model_cfg.get("weight_std", "none"), skip=[classifier(model)],
                                   gamma=getattr(model, "weight_std_gamma", normlayers.GAMMA_RELU))
    return model


def classifier(model: nn.Module) -> nn.Module:
    """The final linear layer: every arch names it ``fc``. AGC and weight standardisation leave it alone."""
    return model.fc


def probed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weight layers (conv, linear) in depth order, named ``NNN_<module.path>``."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [(f"{i:03d}_{name}", m) for i, (name, m) in enumerate(layers)]


__all__ = ["CifarResNet", "MLP", "NormSites", "PlainCNN", "ReActNet", "ResNet", "build_model", "classifier",
           "probed_layers"]
