"""Root Mean Square Layer Normalization (RMSNorm).

Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019 (Eq. 4). LN without the
re-centring: per sample, over its n values (C, H, W for NCHW input, C for NC input),

    RMS(x) = sqrt(1/n sum_i x_i^2 + eps),   y_c = g_c x / RMS(x) (+ b_c)

with a learned per-channel gain g (ones; ``affine``) and, off by default as in the paper's
experiments, a per-channel bias b (``bias``). eps sits inside the root, as ``torch.nn.RMSNorm``
puts it (default 1e-8). No mean is subtracted and nothing crosses the batch (``batch_dependent``
False); train and eval compute the same thing. The mean square in float32 (float64 for float64
input) with autocast off. A sample of one value is refused (its RMS is |x|: the output is the sign).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import check_channels
from normlayers.registry import register
from normlayers.stats import channel_shape, check_values_per_statistic, compute_dtype, keep_format


@register("rms", "RMS Normalization (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) per sample; per-channel gain")
class RMSNorm(NormLayer):
    def __init__(self, num_features: int, eps: float = 1e-8, affine: bool = True, bias: bool = False):
        super().__init__()
        check_eps_momentum("rms", eps)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_channels("rms", x, self.num_features)
        check_values_per_statistic("rms", x, x[0].numel(), "per-sample", "rms needs more than one value per sample")
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            # mean square as a squared 2-norm (one reduction pass, no full-size squared temporary), and
            # the gain folded into the per-sample scale: one multiply(-add) over every value
            per_sample = tuple(range(1, x.dim()))
            mean_square = torch.linalg.vector_norm(xc, dim=per_sample, keepdim=True).square() / x[0].numel()
            scale = torch.rsqrt(mean_square + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype).reshape(channel_shape(x))
            if self.bias is None:
                y = xc * scale
            else:
                y = torch.addcmul(self.bias.to(dtype).reshape(channel_shape(x)), xc, scale)
        return keep_format(y.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}"
