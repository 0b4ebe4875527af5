"""What a config may ask of a model, checked without building one (no torch): the models import their rules here.

Archs and their default widths, each arch's depth rule, ResNet's published layouts, norm placements
and orders (:mod:`trainer.models.norms`), ReActNet's binary modes. ``trainer.config`` checks a
config with these alone, so that planning a sweep or asking its status never imports torch.
"""

from __future__ import annotations

from typing import Any

from normlayers.catalog import VARIANTS
from normlayers.spec import NormSpec

DEFAULT_WIDTH = {"cifar_resnet": 16, "cifar_preact_resnet": 16, "resnet": 64, "plain_cnn": 32, "mlp": 256,
                 "reactnet": 64}
# ImageNet-style ResNet depth -> (block, blocks per stage), as published (He et al. 2016)
RESNET_LAYOUT = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                 101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
BINARY_MODES = ("none", "activations", "weights_and_activations")
PLACEMENTS = ("all", "final", "none")
ORDERS = ("auto", "norm_act", "act_norm")


def cifar_resnet_depth_problem(depth: int) -> str | None:
    """Why ``depth`` is not a depth of the CIFAR ResNet (6n+2), or None."""
    if depth < 8 or (depth - 2) % 6:
        return f"needs depth 6n+2 (8, 14, 20, 32, 44, 56, 110 ...), got {depth}"
    return None


def resnet_depth_problem(depth: int) -> str | None:
    """Why ``depth`` is not one of the published depths (``RESNET_LAYOUT``), or None."""
    return None if depth in RESNET_LAYOUT else f"needs one of {', '.join(map(str, RESNET_LAYOUT))}, got {depth}"


def at_least_one_layer(depth: int) -> str | None:
    """The depth rule of both plain nets: at least one layer."""
    return None if depth >= 1 else f"needs at least 1 layer, got {depth}"


def any_depth(depth: int) -> str | None:
    return None  # ReActNet-18's topology always: model.depth is not used


DEPTH_RULES = {"cifar_resnet": cifar_resnet_depth_problem, "cifar_preact_resnet": cifar_resnet_depth_problem,
               "resnet": resnet_depth_problem, "plain_cnn": at_least_one_layer, "mlp": at_least_one_layer,
               "reactnet": any_depth}


def depth_problem(arch: str, depth: int) -> str | None:
    """Why ``depth`` does not fit ``arch``, or None: the model's own rule."""
    return DEPTH_RULES[arch](depth)


def resolve_order(spec: Any, order: str = "auto") -> str:
    """``norm_act`` or ``act_norm`` for ``spec`` under ``model.norm_order``; ValueError (one line) if it cannot be."""
    if order not in ORDERS:
        raise ValueError(f"must be one of {', '.join(ORDERS)}, got {order!r}")
    name = NormSpec.parse(spec).name
    variant = VARIANTS[name]
    if order == "auto":
        return "act_norm" if variant.before_weight_layer else "norm_act"
    if order == "act_norm" and (variant.includes_activation or variant.needs_preceding_weight):
        why = "includes its activation" if variant.includes_activation else "models the weight layer right before it"
        raise ValueError(f"act_norm puts the norm after the ReLU, but {name} {why}; use norm_act or auto")
    return order
