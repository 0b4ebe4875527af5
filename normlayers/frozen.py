"""Frozen normalization: fixed statistics and affine, as detectron2 and timm keep a pretrained BN.

``frozen`` (``FrozenBatchNorm``) is Batch Normalization's eval-mode equation with everything fixed:

    y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta = x * s + t,   s = gamma / sqrt(sigma^2 + eps),  t = beta - mu s

where mu, sigma^2 (``running_mean``, ``running_var``) and gamma, beta (``weight``, ``bias``) are
buffers, not parameters: nothing is trained, no batch statistics are taken, train and eval compute
the same thing, and a ``bn`` layer's ``state_dict`` loads into it unchanged (same keys). Used when
fine-tuning at small per-device batches, where batch statistics would be noise.

:func:`freeze_norms` converts, in place, every layer of a model with running statistics:

* layers whose eval output is exactly the equation above with their own buffers (``bn``, ``ic``,
  ``ghost``, ``cbn``, ``kn``, ``in`` with ``track_running_stats``, and torch's BatchNorm) become a
  ``FrozenBatchNorm`` with those buffers and their affine (ones and zeros where they have none);
* the others (``brn``, ``bgn``, ``evonorm_b0``, ``iebn``, ``sn``, ``dbn``, ``iternorm``, whose eval
  uses running statistics in another equation) are wrapped in :class:`FrozenNorm`, which always runs
  the layer in eval mode with its parameters' ``requires_grad`` off.

:func:`unfreeze_norms` undoes it: each converted layer becomes the layer it came from (same class
and options), with the frozen statistics and affine, and its parameters trainable again. A
``FrozenBatchNorm`` that was not made by :func:`freeze_norms` (built from the spec, or restored in a
fresh process) becomes a ``bn`` layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import BatchNorm, check_channels
from normlayers.cbn import CrossIterationBatchNorm
from normlayers.ghost import GhostBatchNorm
from normlayers.groupnorm import InstanceNorm
from normlayers.kalman import KalmanNorm
from normlayers.registry import register
from normlayers.stats import channel_shape, compute_dtype, keep_format

#: classes whose eval output is F.batch_norm with their running_mean/var, weight/bias and eps
BN_LIKE = (_BatchNorm, GhostBatchNorm, CrossIterationBatchNorm, KalmanNorm, InstanceNorm)


@register("frozen", "Frozen BN (as detectron2/timm): fixed running statistics and affine, nothing trained")
class FrozenBatchNorm(NormLayer):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        check_eps_momentum("frozen", eps)
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # the layer freeze_norms made this from (not a submodule: not in parameters() or state_dict())
        self.__dict__["_unfrozen"] = None

    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        check_channels("frozen", x, self.num_features)
        dtype = compute_dtype(x)
        shape = channel_shape(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scale = self.weight.to(dtype) * torch.rsqrt(self.running_var.to(dtype) + self.eps)
            shift = self.bias.to(dtype) - self.running_mean.to(dtype) * scale
            y = torch.addcmul(shift.reshape(shape), x.to(dtype), scale.reshape(shape))
        return keep_format(y.to(x.dtype), x)

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: nn.Module) -> FrozenBatchNorm:
        """The frozen form of a layer whose eval output is BN's equation with its own buffers."""
        frozen = cls(layer.running_mean.numel(), eps=layer.eps)
        frozen.to(layer.running_mean.device)
        frozen.running_mean.copy_(layer.running_mean)
        frozen.running_var.copy_(layer.running_var)
        if getattr(layer, "num_batches_tracked", None) is not None:
            frozen.num_batches_tracked.copy_(layer.num_batches_tracked)
        if getattr(layer, "weight", None) is not None:
            frozen.weight.copy_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            frozen.bias.copy_(layer.bias)
        frozen.__dict__["_unfrozen"] = layer
        return frozen

    @torch.no_grad()
    def unfrozen(self) -> nn.Module:
        """The trainable layer this came from (or a ``bn`` layer), holding this layer's values."""
        layer = self.__dict__["_unfrozen"]
        if layer is None:
            layer = BatchNorm(self.num_features, eps=self.eps).to(self.running_mean.device)
        layer.running_mean.copy_(self.running_mean)
        layer.running_var.copy_(self.running_var)
        if getattr(layer, "num_batches_tracked", None) is not None:
            layer.num_batches_tracked.copy_(self.num_batches_tracked)
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(self.weight)
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(self.bias)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenNorm(NormLayer):
    """A layer with running statistics kept in eval mode, its parameters not trained (see the module doc)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.includes_activation = getattr(layer, "includes_activation", False)
        self.__dict__["_requires_grad"] = {name: p.requires_grad for name, p in layer.named_parameters()}
        for p in layer.parameters():
            p.requires_grad_(False)
        layer.eval()

    def train(self, mode: bool = True) -> FrozenNorm:
        super().train(mode)
        self.layer.eval()  # the statistics stay the running ones
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def unfrozen(self) -> nn.Module:
        for name, p in self.layer.named_parameters():
            p.requires_grad_(self.__dict__["_requires_grad"].get(name, True))
        return self.layer.train(self.training)


def _has_running_statistics(module: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1].startswith("running_") for name, _ in module.named_buffers())


def _frozen(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (FrozenBatchNorm, FrozenNorm)) or not _has_running_statistics(module):
        return None
    if isinstance(module, BN_LIKE) and getattr(module, "running_mean", None) is not None:
        return FrozenBatchNorm.from_layer(module).train(module.training)
    if isinstance(module, NormLayer):
        return FrozenNorm(module).train(module.training)
    return None


def freeze_norms(model: nn.Module) -> nn.Module:
    """Freeze every normalization layer with running statistics in ``model``, in place (see the module
    doc). Returns ``model``, or its frozen form when ``model`` itself is such a layer."""
    frozen = _frozen(model)
    if frozen is not None:
        return frozen
    for name, child in model.named_children():
        converted = _frozen(child)
        if converted is not None:
            setattr(model, name, converted)
        else:
            freeze_norms(child)
    return model


def unfreeze_norms(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_norms` in place: every frozen layer becomes trainable again. Returns ``model``,
    or its trainable form when ``model`` itself is a frozen layer."""
    if isinstance(model, (FrozenBatchNorm, FrozenNorm)):
        return model.unfrozen()
    for name, child in model.named_children():
        if isinstance(child, (FrozenBatchNorm, FrozenNorm)):
            setattr(model, name, child.unfrozen())
        else:
            unfreeze_norms(child)
    return model
