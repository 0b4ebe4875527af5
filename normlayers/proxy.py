"""Proxy Normalization on top of Layer or Group Normalization (LN+PN, GN+PN).

Labatie, Masters, Eaton-Rosen & Luschi, "Proxy-Normalizing Activations to Match Batch
Normalization while Removing Batch Dependence", NeurIPS 2021 (arXiv:2106.03743), Sec. 4 and the
proxy-normalized activation step (PN-Act) of its Fig. 3. Per sample, LN (``base=ln``) or GN
(``base=gn``, ``groups``) normalises x without an affine; the activation step then becomes

    y = gamma_c * x_hat + beta_c                          (the norm's channel-wise affine)
    z = phi(y)                                            (the activation, part of this layer)
    Y_c = gamma_c * V + beta_c,  V ~ N(0, 1)              (the proxy: what y_c would be if x_hat_c were N(0, 1))
    z_tilde = (z - E[phi(Y_c)]) / sqrt(Var[phi(Y_c)] + eps_proxy)

E[phi(Y_c)] and Var[phi(Y_c)] are taken over a fixed set of ``samples`` Gaussian quantiles,
v_i = Phi^{-1}((i + 1/2) / samples) for i = 0 .. samples - 1, passed through the same affine and
activation, as in the authors' code (256 quantiles, eps_proxy = 0.03). The paper leaves the number
open; 256 follows the authors' code. The midpoint quantiles then give the proxy's mean to 1e-3 and
its variance to 7e-3 (relative, a ReLU at the initial gamma = 1, beta = 0; 1024 give 2e-4 and
2e-3); ``samples`` sets another number. The proxy moments depend on
gamma and beta only, so the layer uses no batch or running statistics: train and eval compute the
same thing and ``batch_dependent`` is False. The layer includes the activation
(``includes_activation``): models put no ReLU after it. Everything is computed in float32 and cast
back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import check_channels
from normlayers.groupnorm import resolve_groups
from normlayers.registry import register
from normlayers.stats import channel_shape, compute_dtype, keep_format

_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}
_BASES = ("ln", "gn")


def gaussian_quantiles(samples: int) -> Tensor:
    """Phi^{-1}((i + 1/2) / samples), i = 0 .. samples - 1: a deterministic stand-in for N(0, 1)."""
    probs = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
    return torch.special.ndtri(probs).float()


@register("proxy", "Proxy Normalization (Labatie et al. 2021) on ln or gn, includes the activation")
class ProxyNorm(NormLayer):
    includes_activation = True

    def __init__(
        self,
        num_features: int,
        base: str = "ln",
        groups: int | None = None,
        activation: str = "relu",
        eps: float = 1e-5,
        proxy_eps: float = 0.03,
        samples: int = 256,
    ):
        super().__init__()
        if base not in _BASES:
            raise ValueError(f"proxy: base must be one of {', '.join(_BASES)}, got {base!r}")
        if base == "ln" and groups is not None:
            raise ValueError(f"proxy: groups={groups} only applies to base=gn; write proxy:base=gn,groups={groups}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"proxy: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        check_eps_momentum("proxy", eps)
        if not proxy_eps > 0:
            raise ValueError(f"proxy: proxy_eps must be > 0, got {proxy_eps}")
        if samples < 2:
            raise ValueError(f"proxy: samples (Gaussian quantiles for the proxy) must be >= 2, got {samples}")
        self.num_features = num_features
        self.base = base
        self.groups = 1 if base == "ln" else resolve_groups("proxy", num_features, groups, None)
        self.activation = activation
        self.eps = eps
        self.proxy_eps = proxy_eps
        self.samples = samples
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # derived from `samples`, so not part of the state to save
        self.register_buffer("quantiles", gaussian_quantiles(samples), persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, base={self.base}, groups={self.groups}, activation={self.activation}, "
                f"eps={self.eps}, proxy_eps={self.proxy_eps}, samples={self.samples}")

    def proxy_moments(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """E[phi(gamma_c V + beta_c)] and Var[...] per channel over the Gaussian quantiles V."""
        phi = _ACTIVATIONS[self.activation]
        quantiles = self.quantiles.to(dtype)
        proxy = phi(self.weight.to(dtype)[:, None] * quantiles[None, :] + self.bias.to(dtype)[:, None])
        var, mean = torch.var_mean(proxy, dim=1, correction=0)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        check_channels("proxy", x, self.num_features)
        if x[0].numel() // self.groups <= 1:
            raise ValueError(
                f"proxy: {self.base} needs more than one value per sample and group, got shape {tuple(x.shape)}"
            )
        shape = channel_shape(x)
        phi = _ACTIVATIONS[self.activation]
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.activation == "relu":
                # relu is positively homogeneous and the proxy scale s is > 0: s * relu(gamma x_hat + beta) =
                # relu(s gamma x_hat + s beta), so the norm and both affines are one native group_norm with
                # weight s * gamma and bias s * beta, then a ReLU and the per-channel shift (3x fewer passes)
                mean, var = self.proxy_moments(dtype)
                scale = torch.rsqrt(var + self.proxy_eps)
                z = F.group_norm(x.to(dtype), self.groups, self.weight.to(dtype) * scale,
                                 self.bias.to(dtype) * scale, self.eps).relu_()
                return keep_format((z - (mean * scale).reshape(shape)).to(x.dtype), x)
            x_hat = F.group_norm(x.to(dtype), self.groups, None, None, self.eps)
            # each affine step as one multiply-add per element (per-channel scale and shift formed
            # first): fewer full-size passes forward and backward than multiply-then-add
            z = phi(torch.addcmul(self.bias.to(dtype).reshape(shape), x_hat, self.weight.to(dtype).reshape(shape)))
            mean, var = self.proxy_moments(dtype)
            scale = torch.rsqrt(var + self.proxy_eps)
            y = torch.addcmul((-mean * scale).reshape(shape), z, scale.reshape(shape))
        return keep_format(y.to(x.dtype), x)
