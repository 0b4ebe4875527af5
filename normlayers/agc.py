"""Adaptive Gradient Clipping (AGC).

Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021 (arXiv 2102.06171), Eq. 3: for each unit i of a parameter (row i of a
linear weight, output channel i of a conv weight, each element of a bias or gain),

    G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i     if ||G_i|| / max(||W_i||, eps) > lambda
    G_i <- G_i                                             otherwise

with Frobenius norms over the unit and eps = 1e-3 (so that zero-initialised parameters can move).
The paper does not clip the final linear classifier; callers leave its parameters out. Norms are
computed in float32 for half/bfloat16 gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

AGC_EPS = 1e-3


def unitwise_norm(x: Tensor) -> Tensor:
    """||x_i|| per unit: over every dim but the first (output units); elementwise for 0-d and 1-d tensors."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.dim() <= 1:
        return x.abs()
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[Tensor], clipping: float, eps: float = AGC_EPS) -> None:
    """Clip the ``.grad`` of each parameter in place, unit by unit, to ``clipping`` (lambda) times its weight norm."""
    if not clipping > 0:
        raise ValueError(f"adaptive gradient clipping needs lambda > 0, got {clipping}")
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p).clamp(min=eps) * clipping
        grad_norm = unitwise_norm(p.grad)
        # grad_norm > max_norm > 0 wherever the factor is used; the clamp only keeps the other branch finite
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=torch.finfo(grad_norm.dtype).tiny),
                             torch.ones_like(grad_norm))
        p.grad.mul_(factor.to(p.grad.dtype))
