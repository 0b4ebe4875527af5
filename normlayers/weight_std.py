"""Weight Standardization (WS) and Scaled Weight Standardization, as weight parametrizations.

Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
arXiv 1903.10520 (Eq. 5-6): per output unit i of a conv or linear weight, over its fan-in
(the ``in * kh * kw`` weights feeding unit i),

    W_hat_i = (W_i - mean(W_i)) / sqrt(var(W_i) + eps)             (``ws``, eps 1e-5)

so every output unit has zero-mean, unit-variance weights.

Brock, De & Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021 (Eq. 3), used by NFNets (Brock et al. 2021, arXiv 2102.06171):

    W_hat_i = g_i * gamma * (W_i - mean(W_i)) / sqrt(max(N * var(W_i), eps))   (``scaled_ws``)

with N the fan-in, a learnable gain g (ones at init), gamma the gain that keeps the activation
after the layer variance preserving (1.7139588594436646 for ReLU, 1 for sign or identity
inputs) and eps 1e-4 as in the reference implementation of NFNets. Each output unit's weights
then have mean 0 and variance (g_i * gamma)^2 / N: a unit-variance input gives a unit-variance
(times gamma^2) output.

Both are ``torch.nn.utils.parametrize`` modules: :func:`standardize_weights` registers one on the
``weight`` of every conv and linear layer of a model (the learnable gain lives in the
parametrization, the raw weight in ``layer.parametrizations.weight.original``). Statistics are
computed in float32 for half/bfloat16 weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlayers.catalog import WEIGHT_STD_KINDS

GAMMA_RELU = 1.7139588594436646  # sqrt(2 / (1 - 1/pi)): E[relu(z)^2] - E[relu(z)]^2 = 1/gamma^2, z ~ N(0, 1)
WS_EPS = 1e-5
SCALED_WS_EPS = 1e-4
KINDS = WEIGHT_STD_KINDS
STANDARDIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fan_in_moments(weight: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-output-unit (population) variance and mean over the fan-in, in at least float32."""
    fan_in = weight[0].numel()
    if fan_in < 2:
        raise ValueError(f"weight standardization needs a fan-in of at least 2 weights per output unit, "
                         f"got {fan_in} (weight shape {tuple(weight.shape)})")
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, correction=0)
    return var, mean, fan_in


class WeightStandardization(nn.Module):
    """``ws``: W_hat = (W - mean_fanin) / sqrt(var_fanin + eps) per output unit (Qiao et al. 2019)."""

    def __init__(self, num_features: int, eps: float = WS_EPS):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"ws: eps must be > 0, got {eps}")
        self.num_features, self.eps = num_features, eps

    def forward(self, weight: Tensor) -> Tensor:
        var, mean, _ = _fan_in_moments(weight)
        return ((weight - mean) * torch.rsqrt(var + self.eps)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ScaledWeightStandardization(nn.Module):
    """``scaled_ws``: W_hat = g * gamma * (W - mean) / sqrt(max(N * var, eps)) (Brock et al. 2021)."""

    def __init__(self, num_features: int, gamma: float = GAMMA_RELU, eps: float = SCALED_WS_EPS):
        super().__init__()
        if not eps > 0 or not gamma > 0:
            raise ValueError(f"scaled_ws: eps and gamma must be > 0, got eps={eps}, gamma={gamma}")
        self.num_features, self.gamma, self.eps = num_features, gamma, eps
        self.gain = nn.Parameter(torch.ones(num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gain)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.shape[0] != self.num_features:
            raise ValueError(f"scaled_ws: the weight has {weight.shape[0]} output units, the gain {self.num_features}")
        var, mean, fan_in = _fan_in_moments(weight)
        gain = self.gain.to(var.dtype).reshape([-1] + [1] * (weight.dim() - 1))
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * (gain * self.gamma)
        return ((weight - mean) * scale).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, gamma={self.gamma}, eps={self.eps}"


def weight_standardization(kind: str, num_features: int, gamma: float = GAMMA_RELU) -> nn.Module:
    """The parametrization module for ``kind`` (``ws`` or ``scaled_ws``)."""
    if kind == "ws":
        return WeightStandardization(num_features)
    if kind == "scaled_ws":
        return ScaledWeightStandardization(num_features, gamma=gamma)
    raise ValueError(f"weight standardization must be one of {', '.join(KINDS)}, got {kind!r}")


def standardize_weights(model: nn.Module, kind: str, gamma: float = GAMMA_RELU,
                        skip: Iterable[nn.Module] = ()) -> nn.Module:
    """Register ``kind`` weight standardization on every conv and linear layer of ``model`` except
    those in ``skip`` (the classifier, typically); ``none`` leaves the model as it is."""
    if kind not in KINDS:
        raise ValueError(f"weight standardization must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return model
    skipped = {id(m) for m in skip}
    for module in list(model.modules()):
        if isinstance(module, STANDARDIZED_LAYERS) and id(module) not in skipped \
                and not parametrize.is_parametrized(module, "weight"):
            _fan_in_moments(module.weight)  # a fan-in of 1 is refused here, at build time
            parametrize.register_parametrization(module, "weight",
                                                 weight_standardization(kind, module.weight.shape[0], gamma))
    return model


def trainable_weight(layer: nn.Module) -> Tensor:
    """The leaf tensor the optimiser updates for ``layer.weight``: the raw weight under a parametrization."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight
