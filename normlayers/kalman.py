"""Kalman Normalization (KN).

Wang, Peng, Luo, Wang & Lin, "Kalman Normalization: Normalizing Internal Representations Across
Network Layers", NeurIPS 2018 (arXiv:1802.03133, "Batch Kalman Normalization"). Reference
code: github.com/wanggrun/Kalman-Normalization (``KalmanNorm/kalman_norm.py``, ``cifar-kn-*.py``).

The network is one system: layer k's statistics are estimated from its own batch observation
(mu_k, S_k) (mean and biased variance per channel, over the batch and positions) and a prediction
carried from layer k-1's estimate through a transition A^k:

    mu_{k|k-1},  Sigma_{k|k-1}  =  A^k (mu_{k-1|k-1}, Sigma_{k-1|k-1})                  (prediction)
    mu_{k|k}     =  p_k mu_{k|k-1} + q_k mu_k                                          (update)
    Sigma_{k|k}  =  p_k Sigma_{k|k-1} + q_k S_k + p_k q_k (mu_k - mu_{k|k-1})^2
    y = gamma (x - mu_{k|k}) / sqrt(Sigma_{k|k} + eps) + beta

with the gain q_k in (0, 1) and p_k = 1 - q_k; Sigma is per channel (diagonal), as in the authors'
code. Choices where the paper leaves the details to its code:

* Transition. As in the authors' code, layer k-1's estimate describes its input as N(mu, Sigma) per
  channel; that input goes through the ReLU and the weight layer bound to layer k (the learned A^k).
  The authors push Gaussian samples through the convolution; here the same moments are computed in
  closed form: the rectified Gaussian's mean and variance, then mean_o = sum_{c,r} W[o,c,r] E_c (+ bias)
  and var_o = sum_{c,r} W[o,c,r]^2 V_c (independent inputs; zero padding at borders is ignored).
* Gain. q_k is learned per channel (``q = sigmoid(logit)``), initialised to ``gain`` = 0.1, i.e. the
  authors' fixed p_rate = 0.9 on the prediction; ``learn_gain=False`` keeps it fixed.
* Guard. As in the authors' code, when the predicted variance is off by mean(Sigma_{k|k-1} / S_k) >= 100
  the layer uses its batch statistics alone for that step.
* Chain. A model binds the weight layer before each KN with ``bind_preceding(conv)`` and the KN before
  it with ``bind_preceding(previous_kn)``; :func:`link_kalman_layers` does the latter for every KN of a
  model in module order. The first KN, a KN whose predecessor has not run in the current step, or one
  whose weight layer does not take the predecessor's channels (a shortcut), uses its batch statistics.
  The prediction stays in the graph, so gradients flow to the earlier layers and the conv weights.
* Eval uses running averages of the estimated statistics (mu_{k|k}, Sigma_{k|k}), as the authors'
  code does with its moving averages, with torch's momentum convention. Sigma_{k|k} is built from the
  biased batch variance S_k and averaged as it is (``unbiased_running=False``, default: the authors'
  moving average of the estimate the layer normalises with); ``unbiased_running=True`` applies
  Bessel's correction to it as torch's BatchNorm does to its running variance.
* The transition's closed form is the exact expectation that the authors' Gaussian samples estimate,
  so no option brings the sampling back: it would only add Monte Carlo noise.

Batch statistics come from :func:`normlayers.stats.batch_moments`, so a process group synchronises
them (and, through the chain, the predictions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum, check_weight_layer
from normlayers.batchnorm import check_channels
from normlayers.cbn import normalize_with
from normlayers.registry import register
from normlayers.stats import batch_moments, unbiased, update_running
from normlayers.virtual import device_attribute

#: the authors' guard: beyond this ratio of predicted to observed variance, trust the batch alone
PRIOR_VARIANCE_RATIO_LIMIT = 100.0


class _StepEstimate:
    """This step's (mu_{k|k}, Sigma_{k|k}), still in the autograd graph; ``fresh``: made since the next
    layer's last training forward; ``took_prior``: the owner's last training forward used its
    predecessor's. Copies and pickles start empty (a graph cannot be deep-copied, and the estimate is
    meaningless outside its step). Flags, not step counts: torch.compile specialises the ints it reads
    on a module, so a count changing every step recompiled every step (and hit the recompile limit),
    where these flags hold the same values at every step's start."""

    def __init__(self) -> None:
        self.moments: tuple[Tensor, Tensor] | None = None
        self.fresh = False
        self.took_prior = False

    def __deepcopy__(self, memo) -> _StepEstimate:
        return _StepEstimate()

    def __getstate__(self) -> dict:
        return {"moments": None, "fresh": False, "took_prior": False}


def relu_gaussian_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of max(X, 0) for X ~ N(mean, var), element-wise."""
    std = var.clamp_min(1e-12).sqrt()
    alpha = mean / std
    cdf = torch.special.ndtr(alpha)
    pdf = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean * mean + var) * cdf + mean * std * pdf
    return first, (second - first * first).clamp_min(0.0)


def linear_transition(layer: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of a Conv/Linear output for independent inputs with per-channel ``mean`` and ``var``."""
    dtype = torch.promote_types(mean.dtype, layer.weight.dtype)  # float64 when either is
    weight = layer.weight.to(dtype)
    out_channels = weight.shape[0]
    groups = getattr(layer, "groups", 1)
    weight = weight.reshape(out_channels, weight.shape[1], -1)
    # input channels of each output channel's group, one row per output channel
    group_mean = mean.reshape(groups, -1).repeat_interleave(out_channels // groups, dim=0)
    group_var = var.reshape(groups, -1).repeat_interleave(out_channels // groups, dim=0)
    out_mean = (weight.sum(-1) * group_mean).sum(1)
    out_var = (weight.square().sum(-1) * group_var).sum(1)
    if layer.bias is not None:
        out_mean = out_mean + layer.bias.to(dtype)
    return out_mean, out_var


@register("kn", "Kalman Normalization (Wang et al. 2018): batch statistics fused with the preceding layer's")
class KalmanNorm(NormLayer):
    batch_dependent = True
    needs_preceding_weight = True
    device_state = ("_estimate",)  # each (virtual) device chains its own estimates

    def __init__(
        self,
        num_features: int,
        gain: float = 0.1,
        learn_gain: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        unbiased_running: bool = False,
    ):
        super().__init__()
        if not 0.0 < gain < 1.0:
            raise ValueError(f"kn: gain (the weight of the layer's own batch statistics) must be in (0, 1), got {gain}")
        check_eps_momentum("kn", eps, momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.unbiased_running = unbiased_running
        logit = torch.full((num_features,), math.log(gain / (1.0 - gain)))
        if learn_gain:
            self.gain_logit = nn.Parameter(logit)
        else:
            self.register_buffer("gain_logit", logit)
        self.init_affine(num_features, affine)
        self.init_running_stats(num_features)
        # plain attributes, not submodules: the bound layers belong to the model
        self.__dict__["_transition"] = None
        self.__dict__["_previous"] = None
        self._estimate = _StepEstimate()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def bind_preceding(self, module: nn.Module) -> None:
        """Bind the weight layer whose output this layer normalises, or the KN layer before it."""
        if isinstance(module, KalmanNorm):
            if module is self:
                raise ValueError("kn: a layer cannot precede itself")
            self.__dict__["_previous"] = module
            return
        check_weight_layer("kn", module, self.num_features, also=", or the preceding KalmanNorm")
        self.__dict__["_transition"] = module

    @property
    def gain(self) -> Tensor:
        """q_k per channel: the weight of this layer's own batch statistics."""
        return torch.sigmoid(self.gain_logit)

    def _predecessor_estimate(self) -> _StepEstimate | None:
        previous = self.__dict__["_previous"]
        # the predecessor's on this (virtual) device
        return None if previous is None else device_attribute(previous, "_estimate")

    def prediction(self) -> tuple[Tensor, Tensor] | None:
        """(mu_{k|k-1}, Sigma_{k|k-1}) from the preceding KN's estimate in this step, or None."""
        estimate = self._predecessor_estimate()
        # the predecessor must have run in this very step (its estimate is part of this step's graph)
        if estimate is None or not (estimate.fresh or self._estimate.took_prior):
            return None
        return self._predict(estimate)

    def _predict(self, estimate: _StepEstimate) -> tuple[Tensor, Tensor] | None:
        previous, layer = self.__dict__["_previous"], self.__dict__["_transition"]
        if layer is None or estimate.moments is None:
            return None
        in_channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
        if in_channels != previous.num_features:
            return None
        return linear_transition(layer, *relu_gaussian_moments(*estimate.moments))

    def forward(self, x: Tensor) -> Tensor:
        check_channels("kn", x, self.num_features)
        if not self.training:
            return normalize_with(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

        dims = [0, *range(2, x.dim())]
        mean, var, count = batch_moments(x, dims, self.process_group, who="kn")
        estimate = self._predecessor_estimate()
        fresh = estimate is not None and estimate.fresh
        if fresh:
            estimate.fresh = False  # taken: this step's estimate serves this step only
        self._estimate.took_prior = fresh
        with torch.autocast(device_type=x.device.type, enabled=False):
            predicted = self._predict(estimate) if fresh else None
            if predicted is not None:
                pred_mean, pred_var = predicted
                q = self.gain
                p = 1.0 - q
                fused_mean = p * pred_mean + q * mean
                fused_var = p * pred_var + q * var + p * q * (mean - pred_mean).square()
                trusted = (pred_var / var.clamp_min(self.eps)).mean() < PRIOR_VARIANCE_RATIO_LIMIT
                mean = torch.where(trusted, fused_mean, mean)
                var = torch.where(trusted, fused_var, var)
        self._estimate.moments, self._estimate.fresh = (mean, var), True
        self.num_batches_tracked.add_(1)
        update_running(self.running_mean, mean.detach(), self.momentum, self.num_batches_tracked)
        running_var = unbiased(var.detach(), count) if self.unbiased_running else var.detach()
        update_running(self.running_var, running_var, self.momentum, self.num_batches_tracked)
        return normalize_with(x, mean, var, self.weight, self.bias, self.eps)


def link_kalman_layers(model: nn.Module) -> int:
    """Bind every KalmanNorm of ``model`` to the KalmanNorm before it in module order; returns the links made."""
    layers = [m for m in model.modules() if isinstance(m, KalmanNorm)]
    for previous, layer in zip(layers, layers[1:], strict=False):
        layer.bind_preceding(previous)
    return max(len(layers) - 1, 0)
