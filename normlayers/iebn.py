"""Instance Enhancement Batch Normalization (IEBN).

Liang, Huang, Liang & Yang, "Instance Enhancement Batch Normalization: an Adaptive Regulator of
Batch Noise", AAAI 2020 (arXiv:1908.04008). Reference code: github.com/gbup-group/IEBN
(``models/cifar/iebn_resnet.py``, class ``_BatchAttNorm``).

BN without its affine, then a per-sample, per-channel gate computed from the channel's average
over positions of the layer's input, then the affine:

    x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps)                       (BN, batch statistics)
    g_{n,c} = sigmoid(w_c * AVG_{h,w}(x_{n,c}) + b_c)                  (instance enhancement)
    y = x_hat * (gamma_c * g_{n,c}) + beta_c

w, b are initialised to 0 and -1 as in the reference code (so every gate starts at sigmoid(-1)),
gamma, beta to 1 and 0. The BN part is :class:`normlayers.batchnorm.BatchNorm` with
``affine=False``, so its statistics go through :func:`normlayers.stats.batch_moments` when the
layer is synchronised (setting ``process_group`` on this layer sets it on that BN), and eval uses
its running mean and variance; the gate is per sample and works the same in train and eval.
On NC input the "average over positions" is the value itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import BatchNorm, check_channels
from normlayers.fused import scale_shift
from normlayers.registry import register
from normlayers.stats import channel_shape, compute_dtype, keep_format, single_value_error


@register("iebn", "Instance Enhancement BN (Liang et al. 2020): BN gated by sigmoid(w*avgpool(x)+b) per sample")
class InstanceEnhancementBatchNorm(NormLayer):
    batch_dependent = True
    device_fold = ("num_features",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gate_weight_init: float = 0.0,
        gate_bias_init: float = -1.0,
    ):
        super().__init__()
        check_eps_momentum("iebn", eps, momentum)
        self.num_features = num_features
        self.bn = BatchNorm(num_features, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.gate_weight = nn.Parameter(torch.full((num_features,), float(gate_weight_init)))
        self.gate_bias = nn.Parameter(torch.full((num_features,), float(gate_bias_init)))

    # The statistics are the inner BN's: one process group for both, whoever sets it.
    @property
    def process_group(self):
        return self.bn.process_group

    @process_group.setter
    def process_group(self, group) -> None:
        self.bn.process_group = group

    def forward(self, x: Tensor) -> Tensor:
        check_channels("iebn", x, self.num_features)
        if self.training and x.numel() // x.shape[1] <= 1:
            raise single_value_error("iebn", x)
        x_hat = self.bn(x)
        shape = channel_shape(x)
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            pooled = xf.mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else xf
            gate = torch.sigmoid(pooled * self.gate_weight.to(dtype).reshape(shape)
                                 + self.gate_bias.to(dtype).reshape(shape))
            y = scale_shift(x_hat.to(dtype), self.weight.to(dtype).reshape(shape) * gate,
                            self.bias.to(dtype).reshape(shape))
        return keep_format(y.to(x.dtype), x)
