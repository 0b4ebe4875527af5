"""Positional Normalization (PONO).

Li, Yang, Chen, Belongie & Weinberger, "Positional Normalization", NeurIPS 2019 (Eq. 1-2).
For each sample n and each spatial position (h, w), over the C channels:

    mu_{n,h,w} = mean_c x_{n,c,h,w},   sigma_{n,h,w} = sqrt(mean_c (x_{n,c,h,w} - mu_{n,h,w})^2 + eps)
    y = gamma_c * (x - mu_{n,h,w}) / sigma_{n,h,w} + beta_c

The paper removes (mu, sigma) at one layer and can re-inject them later ("moment shortcut"); that
is an architecture choice, so this layer is the normalization alone, with an optional per-channel
affine (on by default, as a drop-in replacement for the other layers). Defined on feature maps
(NCHW); per sample, so not batch dependent. It is torch's fused ``layer_norm`` over the channel
axis of the channels-last view; the output keeps the input's memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.groupnorm import cast, check_spatial, compute_dtype
from normlayers.registry import register
from normlayers.stats import check_values_per_statistic


@register("pn", "Positional Normalization (Li et al. 2019): per sample per position over C; NCHW")
class PositionalNorm(NormLayer):
    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        check_eps_momentum("pn", eps)
        self.num_features = num_features
        self.eps = eps
        self.init_affine(num_features, affine)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("pn", x, self.num_features)
        check_values_per_statistic("pn", x, self.num_features, "per-position", "pn needs more than one channel")
        dtype = compute_dtype(x)
        channels_last = x.movedim(1, -1)
        was_channels_last = channels_last.is_contiguous()
        with torch.autocast(device_type=x.device.type, enabled=False):
            # an explicit copy to channels-last first is faster than layer_norm on the strided view
            y = F.layer_norm(channels_last.contiguous().to(dtype), (self.num_features,), cast(self.weight, dtype),
                             cast(self.bias, dtype), self.eps)
        y = y.movedim(-1, 1).to(x.dtype)
        # the output keeps the input's memory format
        return y if was_channels_last else y.contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
