"""The Independent-Component (IC) layer: Batch Normalization followed by Dropout.

Chen, Chen, Shi, Hsieh, Liao & Zhang, "Rethinking the Usage of Batch Normalization and Dropout in the
Training of Deep Neural Networks", arXiv:1905.05928 (2019), Sec. 3. BN standardises each feature
and Dropout, with independent Bernoulli masks, reduces the mutual information between any two
features quadratically and their correlation linearly in the dropout parameter (the paper's
analysis), so the inputs of the next weight layer are closer to independent components:

    x_hat = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta              (BN)
    y = m * x_hat / (1 - p),   m ~ Bernoulli(1 - p) element-wise            (Dropout, training only)

The IC layer goes *before* the weight layer: ... -> ReLU -> IC -> Conv -> ..., which the models
build with their IC ordering option (the class says so with ``before_weight_layer``). ``drop`` is
p; the paper recommends 0.05 to 0.1 and 0.05 is the default. Eval uses BN's running statistics and
no dropout. The BN part is :class:`normlayers.batchnorm.BatchNorm`, so its statistics go through
:func:`normlayers.stats.batch_moments` when synchronised; ``state_dict`` keys are BN's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from normlayers.batchnorm import BatchNorm, check_channels
from normlayers.registry import register
from normlayers.stats import single_value_error


@register("ic", "Independent-Component layer (Chen et al. 2019): BN then Dropout, placed before the weight layer")
class IndependentComponent(BatchNorm):
    #: models put this layer after the activation, right before the next weight layer
    before_weight_layer: ClassVar[bool] = True

    def __init__(
        self,
        num_features: int,
        drop: float = 0.05,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"ic: drop (the dropout probability) must be in [0, 1), got {drop}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.drop = drop

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drop={self.drop}"

    def _check_input_dim(self, x: Tensor) -> None:
        check_channels("ic", x, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training and x.numel() // x.shape[1] <= 1:
            raise single_value_error("ic", x)
        y = super().forward(x)
        if not self.training or self.drop == 0.0:
            return y
        # Inverted dropout by a mask made in place of 0 or 1/(1-p) (no second mask is made or converted in
        # backward). In place on y: BN's backward needs its input, not its fresh output (autograd checks this).
        return y.mul_(dropout_scale(y.detach(), self.drop))


#: the mask's resolution: each element's draw is one 16-bit word, so p is realised to a multiple of 2^-16
MASK_WORD_STATES = 1 << 16


def realised_drop(drop: float) -> float:
    """The dropout probability the 16-bit mask draws: ``drop`` rounded to a multiple of 2^-16."""
    return round(drop * MASK_WORD_STATES) / MASK_WORD_STATES


@torch.library.custom_op("normlayers::dropout_scale", mutates_args=())
def dropout_scale(y: Tensor, drop: float) -> Tensor:
    """Inverted dropout's mask for ``y``: 0 with probability ``drop``, else 1 / (1 - drop).

    Each element's draw is one 16-bit word of uniform random int64 (the full 64-bit range, so all four
    words of each are uniform): a quarter of the generator's calls of a float draw per element, which
    on CPU made the mask the larger part of ic's cost. ``drop`` is realised to 2^-16 (:func:`realised_drop`)
    and the kept values are scaled by that realised rate, so the layer stays unbiased. An opaque op, so
    torch.compile keeps torch's kernel and generator: inductor's generated CPU random numbers made a
    compiled ic 12x compiled BatchNorm2d; the compiled mask is then also the eager one for the same seed.
    """
    drop = realised_drop(drop)
    words = torch.empty(-(-y.numel() // 4), dtype=torch.int64, device=y.device)
    words.random_(torch.iinfo(torch.int64).min, None)
    threshold = round(drop * MASK_WORD_STATES) - MASK_WORD_STATES // 2  # P(int16 word >= threshold) = 1 - drop
    keep = words.view(torch.int16)[: y.numel()].reshape(y.shape).ge(threshold)
    return keep.to(y.dtype).mul_(1.0 / (1.0 - drop))


@dropout_scale.register_fake
def _(y: Tensor, drop: float) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)
