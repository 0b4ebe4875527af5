"""Probes of the output gradient and of the loss landscape's sharpness.

**Output-gradient concentration** (Bjorck, Gomes, Selman & Weinberger, "Understanding Batch
Normalization", NeurIPS 2018, Sec. 4): at initialisation an unnormalised deep net assigns almost
every input to the same class, so the gradient of the loss with respect to the logits is dominated
by that one class. :func:`logit_gradient_concentration` measures it on a batch of N inputs with
logits Z (N x C) and labels y: with G = softmax(Z) - onehot(y), row i being the gradient of
sample i's cross-entropy with respect to its logits,

    concentration = max_c sum_i G_ic^2 / sum_{i,c} G_ic^2,

the share of the squared gradient norm (over the batch) carried by the single most-affected
class. It is about 1/C when the gradient is spread over the classes (near-uniform outputs on
balanced labels) and tends to 1/2 when every input is confidently put in one class k (each row is
then +1 at k and -1 at the sample's own label: column k carries half of the norm and the other
half is spread over the labels). :class:`~trainer.callbacks.LayerProbe` logs it as
``probe/grad_concentration`` at every probe step, step 0 (the initialisation) included, from the
training batch of that step (global rank 0's under DDP).

**Largest Fisher eigenvalue** (Wei, Stokes & Schwab, "Mean-field Analysis of Batch
Normalization", 2019): BN flattens the loss landscape, measured by the largest eigenvalue
lambda_max of the Fisher information matrix, and this bounds the learning rate. For a softmax
classifier with Jacobian J_i = d z_i / d theta of sample i's logits on a probe batch of N inputs,

    F = (1/N) sum_i J_i^T H_i J_i,     H_i = diag(p_i) - p_i p_i^T,   p_i = softmax(z_i),

which is also the Gauss-Newton part of the Hessian of the mean cross-entropy (the whole Hessian
where the net fits the data). The paper characterises the maximal learning rate through lambda_max
with the classical bound for gradient descent on the local quadratic model
L(theta + d) ~ L + g^T d + d^T F d / 2 (LeCun et al. 1998; Karakida et al. 2019): the error
iteration d <- (I - eta F) d converges iff eta < 2 / lambda_max, so

    lr_max = 2 / lambda_max.

SGD with heavy-ball momentum mu (PyTorch's non-Nesterov SGD) on the same quadratic converges iff
eta < 2 (1 + mu) / lambda_max, logged too as ``fisher/lr_max_momentum`` to compare with runs
trained with momentum.

:func:`fisher_lambda_max` finds lambda_max by power iteration on Fisher-vector products that never
build J or F: ``F v`` is J^T (H (J v)) / N, where ``J^T u`` is a backward pass kept differentiable
and ``J v`` is its derivative with respect to u (the double-backward trick): one forward and one
such backward per estimate, then two backward passes per product. With batch statistics J is the
Jacobian of the whole batch's logits (each z_i depends on every sample); the formula is unchanged.
:class:`FisherProbe` runs it on a fixed probe batch (the first ``probes.fisher_batch`` samples of
the first training batch, kept in the checkpoint) at step 0 and every
``probes.fisher_every_n_steps`` steps, on a copy of the model in training mode (norm layers use
their batch statistics, as in training and in the paper's analysis), in float32, on global rank 0
only, under a forked random state (dropout masks come from the one forward and serve every
product; the run's own random stream is left as it was), and logs ``fisher/lambda_max``,
``fisher/lr_max`` and ``fisher/lr_max_momentum``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

import normlayers


def logit_gradient_concentration(logits: Tensor, targets: Tensor) -> Tensor:
    """Share of the batch's squared logit-gradient norm on its most-affected class (see the module docstring)."""
    grad = torch.softmax(logits.detach().float(), dim=1)
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    per_class = grad.square().sum(dim=0)
    return per_class.max() / per_class.sum().clamp_min(torch.finfo(per_class.dtype).tiny)


class FisherProducts:
    """``F v`` for the trainable parameters of ``model`` on inputs ``x``, by autograd products only.

    The forward pass runs once, here; every call then costs three backward passes. ``v`` and the
    result are lists of tensors shaped like :attr:`params`.
    """

    def __init__(self, model: nn.Module, x: Tensor):
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.autocast(device_type=x.device.type, enabled=False):
            self.logits = model(x).float()
        self.n = self.logits.shape[0]
        self.probs = torch.softmax(self.logits.detach(), dim=1)
        # J^T u is linear in u; its derivative with respect to u along v is J v
        self.u = torch.zeros_like(self.logits, requires_grad=True)
        self.jt_u = torch.autograd.grad(self.logits, self.params, self.u, create_graph=True, allow_unused=True)

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        used = [(g, vi) for g, vi in zip(self.jt_u, v, strict=True) if g is not None]
        (jv,) = torch.autograd.grad([g for g, _ in used], self.u, [vi for _, vi in used], retain_graph=True)
        p = self.probs
        h_jv = p * jv - p * (p * jv).sum(dim=1, keepdim=True)  # H_i (J v)_i, H_i = diag(p_i) - p_i p_i^T
        jt = torch.autograd.grad(self.logits, self.params, h_jv, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g / self.n for g, w in zip(jt, self.params, strict=True)]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def fisher_lambda_max(model: nn.Module, x: Tensor, iterations: int = 20, seed: int = 0) -> float:
    """The largest eigenvalue of the Fisher matrix of ``model`` on ``x`` by ``iterations`` power steps.

    Runs ``model`` as it is (its mode, its parameters); F is positive semi-definite, so the power
    iteration converges to lambda_max, at a rate set by the gap to the second eigenvalue. Returns the
    Rayleigh quotient v^T F v of the last unit iterate.
    """
    products = FisherProducts(model, x)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in products.params]
    lam = 0.0
    for _ in range(max(1, iterations)):
        norm = torch.sqrt(_dot(v, v))
        v = [vi / norm for vi in v]
        w = products(v)
        lam = float(_dot(v, w))
        if float(_dot(w, w)) == 0.0:
            return 0.0
        v = w
    return lam


def predicted_lr_max(lambda_max: float, momentum: float = 0.0) -> float:
    """2 (1 + momentum) / lambda_max: gradient descent (momentum 0) or heavy-ball SGD on the quadratic model."""
    if math.isnan(lambda_max):  # a diverged net's probe: nothing to predict
        return math.nan
    return 2.0 * (1.0 + momentum) / lambda_max if lambda_max > 0 else math.inf


class FisherProbe(Callback):
    """Logs ``fisher/lambda_max``, ``fisher/lr_max`` (and ``fisher/lr_max_momentum``) every N steps from step 0."""

    def __init__(self, every_n_steps: int, iterations: int = 20, batch_size: int = 64, momentum: float = 0.0,
                 nesterov: bool = False, seed: int = 0):
        self.every_n_steps, self.iterations, self.batch_size = every_n_steps, iterations, batch_size
        self.momentum = 0.0 if nesterov else momentum  # the heavy-ball bound does not hold for Nesterov
        self.seed = seed
        self.probe_batch: Tensor | None = None
        self._logged_step: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if (self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero
                or trainer.logger is None or self._logged_step == step):
            return
        if self.probe_batch is None:
            self.probe_batch = batch[0][: self.batch_size].detach().cpu().clone()
        lam = self.measure(pl_module.model, self.probe_batch.to(pl_module.device))
        metrics = {"fisher/lambda_max": lam, "fisher/lr_max": predicted_lr_max(lam)}
        if self.momentum:
            metrics["fisher/lr_max_momentum"] = predicted_lr_max(lam, self.momentum)
        trainer.logger.log_metrics(metrics, step=step)
        self._logged_step = step

    def measure(self, model: nn.Module, x: Tensor) -> float:
        """lambda_max of a training-mode copy of ``model`` (its statistics and buffers stay untouched)."""
        probe = copy.deepcopy(model).train()
        normlayers.revert_sync(probe)  # rank 0 alone: no collective may run in the probe
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return fisher_lambda_max(probe, x.float(), self.iterations, self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_batch": self.probe_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_batch = state_dict.get("probe_batch")

