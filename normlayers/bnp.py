"""Batch Normalization Preconditioning (BNP): BN's conditioning of the gradients, without a BN layer.

Lange, Helfrich & Ye, "Batch Normalization Preconditioning for Neural Network Training", JMLR
23(72), 2022 (arXiv 2108.01110). Instead of normalising a layer's inputs in the forward pass, BNP
preconditions the layer's parameter gradients so that gradient descent on the original layer takes
the step it would take on the layer with normalised inputs. No batch statistic enters the forward
pass, so the method is not constrained by the mini-batch size and works online (batch 1).

The equations (written out here; the test suite checks them against the re-parametrised layer). A
weight layer ``z = W x + b`` with running estimates ``mu`` (mean) and ``sigma^2`` (variance) of each
input feature is the normalised layer

    z = W' (x - mu) / sigma + b',       W = W' D^-1,   b = b' - W mu,   D = diag(sqrt(sigma^2 + eps)).

With the gradients ``g_w`` (one row of W, per output unit) and ``g_b`` of the loss, one gradient
step of size lr on (W', b') mapped back to (W, b) is

    delta_w = -lr * D^-2 (g_w - mu g_b)
    delta_b = -lr * (g_b - mu^T D^-2 (g_w - mu g_b))

so :meth:`BNPreconditioner.step` replaces the gradients by ``g_w <- D^-2 (g_w - mu g_b)`` and
``g_b <- g_b - mu^T g_w`` (with the new ``g_w``), and any torch optimiser then takes its step.
A layer without a bias cannot absorb the shift by ``mu``; its normalised layer is
``z = W' x / s`` with ``s^2 = E[x^2] + eps = sigma^2 + mu^2 + eps`` (the input's root mean square,
the diagonal of that layer's Gauss-Newton block ``E[x x^T]``), and ``g_w <- g_w / s^2``.

For a convolution the statistics are per input channel over batch and positions (as BN takes
them), and the channel's ``mu_c`` and ``sigma_c`` apply to every weight of the kernel window that
reads channel c: the normalised layer is the convolution of the patches with each entry ``x``
replaced by ``(x - mu_c) / sigma_c`` (zero padding entries are inputs of value 0 like any other).
Grouped and depthwise convolutions take each output's own group of input channels.

What comes from the paper and what is this implementation's reading
    From the paper (its abstract and introduction, the parts available to us): the idea itself,
    normalisation applied by conditioning the parameter gradients directly, designed to improve
    the Hessian's conditioning; its independence of the mini-batch size and its use online; that
    the connection explains BN's per-channel statistics in CNNs. Our reading (the paper's body was
    not available to us; check against it): the exact step above (derived from the
    re-parametrisation), the running estimator below, eps, the treatment of bias-free layers, the
    convolution window and padding, skipping layers, and how it meets momentum, weight decay and
    several processes.

Running statistics
    ``mu`` and ``sigma^2`` are the mean and variance of the exponentially weighted mixture of every
    input seen in training: with ``momentum = a`` and a step's batch mean ``m`` and (biased)
    variance ``v``, ``d = m - mu``, ``mu <- mu + a d`` and ``sigma^2 <- (1 - a)(sigma^2 + a d^2) + a v``
    (the running ``E[x]`` and ``E[x^2]`` of the inputs, in the form that does not cancel). So a batch
    of one value per feature still moves the variance, through ``d``. They start at ``mu = 0``,
    ``sigma^2 = 1`` (BN's initial running statistics): the first steps are close to plain gradient
    descent and move towards BNP as inputs arrive. ``momentum = 1`` uses the current batch alone and
    is refused where that batch has one value per statistic. The statistics include the current
    step's batch: every training-mode forward with gradients enabled since the last :meth:`step`
    (gradient accumulation's micro-batches pooled) is folded in at :meth:`step`, before the
    gradients are rewritten. Forwards in eval mode or under ``no_grad`` are not counted, nor are
    forwards of copies of the model.

eps (default 0.1, not BN's 1e-5)
    ``eps`` floors the variance a feature is normalised by: a feature whose RMS is below
    ``sqrt(eps)`` has its gradient amplified by at most ``1 / eps``. Rarely active ReLU channels have
    running second moments down to 1e-22; with 1e-5 their steps were amplified up to 1e5 and
    training at batch 1 diverged on digits at every learning rate tried (docs/studies.md).

Numerics
    Statistics are taken in float32 with autocast off (float64 inputs keep float64), the
    preconditioning in the statistics' dtype; the result is written back into ``.grad`` in its dtype.

Optimisers, weight decay, clipping
    K-FAC's convention: call :meth:`step` between ``loss.backward()`` and ``optimizer.step()``.
    With plain SGD the result is exactly gradient descent on the normalised layers; with momentum
    the momentum buffer accumulates preconditioned gradients. An optimiser's own weight decay is
    added to the preconditioned gradient afterwards (it is not preconditioned).

Several processes
    With ``process_group=None`` the statistics are local to each rank (under DDP the ranks'
    gradients are already averaged, but each rank preconditions with its own statistics, which
    then differ slightly between ranks). With a process group (``torch.distributed.group.WORLD``
    for all), each :meth:`step` averages the step's batch moments over the group with two packed
    all-reduces (means, then centred second moments), so every rank keeps the statistics of the
    union of the ranks' batches and takes identical steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlayers.catalog import BNP_DEFAULT_EPS as DEFAULT_EPS
from normlayers.catalog import BNP_DEFAULT_MOMENTUM as DEFAULT_MOMENTUM
from normlayers.catalog import bnp_options
from normlayers.stats import _var_mean

DESCRIPTION = ("Batch Normalization Preconditioning (Lange et al. 2022): no layer; every conv and linear layer's "
               "gradients conditioned as on inputs normalised by running statistics, at any batch size")

#: the layer types BNP registers on, by the names ``skip`` accepts
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv3d": nn.Conv3d,
}


def _type_name(module: nn.Module) -> str | None:
    for name, cls in LAYER_TYPES.items():
        if isinstance(module, cls):
            return name
    return None


def check_options(momentum: float, eps: float, skip: Iterable[str]) -> tuple[str, ...]:
    """One clear ``ValueError`` for a bad option; returns ``skip`` as a tuple of layer-type names."""
    return bnp_options(momentum, eps, skip)  # the catalog's: a config checks them without torch


class _Layer:
    """One registered layer: its running statistics and the batch moments pending since the last step."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.mean: Tensor | None = None  # running estimates, created at the first input
        self.var: Tensor | None = None
        self.steps = 0  # updates of the running estimates
        self.pending: tuple[float, Tensor, Tensor] | None = None  # (count, mean, biased var)

    @property
    def features(self) -> int:
        w = self.module.weight
        return w.shape[1] * getattr(self.module, "groups", 1)

    def stats_like(self, device: torch.device, dtype: torch.dtype) -> None:
        """Running estimates on ``device`` in ``dtype`` (float64 once a float64 input arrives)."""
        if self.mean is None:
            self.mean = torch.zeros(self.features, device=device, dtype=dtype)
            self.var = torch.ones(self.features, device=device, dtype=dtype)
        elif self.mean.device != device or (dtype == torch.float64 and self.mean.dtype != dtype):
            dtype = torch.float64 if torch.float64 in (dtype, self.mean.dtype) else dtype
            self.mean, self.var = self.mean.to(device, dtype), self.var.to(device, dtype)

    def observe(self, x: Tensor) -> None:
        """Fold a forward's input into the pending moments (Chan et al.'s pairwise combination)."""
        channel_dim = x.dim() - 1 if isinstance(self.module, nn.Linear) else (
            1 if x.dim() == self.module.weight.dim() else 0)  # conv: batched NC... or unbatched C...
        dims = tuple(d for d in range(x.dim()) if d != channel_dim)
        count = x.numel() // x.shape[channel_dim]
        if count == 0:
            return
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.detach().to(dtype)
            if dims:
                var, mean = _var_mean(xf, dims, count)
            else:
                mean, var = xf, torch.zeros_like(xf)
            if self.pending is None:
                self.pending = (float(count), mean, var)
                return
            n_a, mean_a, var_a = self.pending
            n = n_a + count
            delta = mean - mean_a.to(dtype)
            self.pending = (n, mean_a + delta * (count / n),
                            (var_a * n_a + var * count) / n + delta.square() * (n_a * count / n / n))

    def update(self, count: float, mean: Tensor, var: Tensor, momentum: float) -> None:
        """Move the running estimates towards a step's batch moments (see the module docstring)."""
        if momentum == 1.0 and count <= 1:
            raise ValueError(
                f"bnp: momentum=1 takes the statistics of the current batch alone, which holds one value per "
                f"input feature of layer {self.name or type(self.module).__name__!r}; use momentum < 1 so that "
                f"the running estimates accumulate over steps (or a larger batch)")
        self.stats_like(mean.device, mean.dtype)
        mean, var = mean.to(self.mean.dtype), var.to(self.mean.dtype)
        delta = mean - self.mean
        self.mean.add_(delta, alpha=momentum)
        self.var.add_(delta.square(), alpha=momentum).mul_(1.0 - momentum).add_(var, alpha=momentum)
        self.steps += 1

    def precondition(self, eps: float) -> None:
        """Rewrite ``weight.grad`` (and ``bias.grad``) as one gradient step on the normalised layer."""
        weight, bias = self.module.weight, self.module.bias
        if weight.grad is None or self.steps == 0:
            return
        self.stats_like(weight.grad.device, self.mean.dtype)
        centred = bias is not None and bias.grad is not None
        groups = getattr(self.module, "groups", 1)
        out, per_group = weight.shape[0], weight.shape[1]
        # (groups, outputs per group, inputs per group, kernel positions); a Linear is one group, one position
        g = weight.grad.reshape(groups, out // groups, per_group, -1).to(self.mean.dtype)
        mu = self.mean.reshape(groups, 1, per_group, 1)
        var = self.var.reshape(groups, 1, per_group, 1)
        if centred:
            gb = bias.grad.reshape(groups, out // groups, 1, 1).to(self.mean.dtype)
            gw = (g - mu * gb) / (var + eps)
            bias.grad.copy_((gb - (mu * gw).sum(dim=(2, 3), keepdim=True)).reshape(bias.grad.shape))
        else:
            gw = g / (var + mu.square() + eps)
        weight.grad.copy_(gw.reshape(weight.grad.shape))


class BNPreconditioner:
    """Batch Normalization Preconditioning of every Conv1d/2d/3d and Linear layer of ``model``.

    ``momentum``: weight of a step's batch in the running estimates (torch's convention: 1 is the
    current batch alone, 0 freezes them). ``eps``: added to the variance, > 0. ``skip``: layer types
    left plain (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``). ``process_group``: ``None``
    for statistics local to each rank, or the group to average them over.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``; :meth:`remove`
    takes the hooks off. Layers are named by their path in ``model`` (the keys of the state).
    """

    def __init__(self, model: nn.Module, momentum: float = DEFAULT_MOMENTUM, eps: float = DEFAULT_EPS,
                 skip: Iterable[str] = (),
                 process_group: Any = None):
        self.skip = check_options(momentum, eps, skip)
        self.momentum, self.eps, self.process_group = float(momentum), float(eps), process_group
        self.layers: dict[str, _Layer] = {}
        self._handles = []
        for name, module in model.named_modules():
            kind = _type_name(module)
            if kind is None or kind in self.skip:
                continue
            layer = _Layer(name, module)
            self.layers[name] = layer
            self._handles.append(module.register_forward_pre_hook(self._recorder(layer)))

    @staticmethod
    def _recorder(layer: _Layer):
        # a closure, not a bound method: deep copies of the model (probes) share it instead of copying
        # the preconditioner, and the identity check leaves their forwards out
        def record(module: nn.Module, args: tuple) -> None:
            if module is layer.module and module.training and torch.is_grad_enabled() and args:
                layer.observe(args[0])

        return record

    def remove(self) -> None:
        """Take the forward hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _synchronised(self) -> bool:
        return (self.process_group is not None and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _pending(self) -> list[tuple[_Layer, float, Tensor, Tensor]]:
        """Each layer's moments of this step (averaged over the group when one is set)."""
        if not self._synchronised():
            out = [(layer, *layer.pending) for layer in self.layers.values() if layer.pending is not None]
            for layer in self.layers.values():
                layer.pending = None
            return out
        layers = list(self.layers.values())
        device = next((p[1].device for p in (la.pending for la in layers) if p is not None), None)
        if device is None:
            device = layers[0].module.weight.device if layers else torch.device("cpu")
        counts, means, m2s, dtypes = [], [], [], []
        for la in layers:  # every registered layer takes part, with zeros where this rank saw none
            n, mean, var = la.pending or (0.0, torch.zeros(la.features, device=device),
                                          torch.zeros(la.features, device=device))
            counts.append(torch.tensor([n], dtype=torch.float64, device=device))
            means.append(mean.double() * n)
            m2s.append((mean.double(), var.double() * n, n))
            dtypes.append(mean.dtype if la.pending is not None else torch.float32)
            la.pending = None
        sizes = [la.features for la in layers]
        packed = torch.cat(counts + means)
        dist.all_reduce(packed, group=self.process_group)
        total_n = packed[: len(layers)]
        global_means = torch.split(packed[len(layers):], sizes)
        centred = []
        for i, (mean, m2, n) in enumerate(m2s):
            g_mean = global_means[i] / total_n[i].clamp_min(1.0)
            centred.append(m2 + n * (mean - g_mean).square())
        packed_m2 = torch.cat(centred)
        dist.all_reduce(packed_m2, group=self.process_group)
        out = []
        for i, (la, m2) in enumerate(zip(layers, torch.split(packed_m2, sizes), strict=True)):
            n = float(total_n[i])
            if n > 0:  # in the dtype of this rank's inputs (float64 stays float64)
                out.append((la, n, (global_means[i] / n).to(dtypes[i]), (m2 / n).to(dtypes[i])))
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Fold this step's inputs into the running estimates, then precondition every layer's gradients."""
        for layer, count, mean, var in self._pending():
            layer.update(count, mean, var, self.momentum)
        for layer in self.layers.values():
            if layer.module.weight.requires_grad:
                layer.precondition(self.eps)

    def statistics(self, name: str) -> tuple[Tensor, Tensor]:
        """The running ``(mean, variance)`` of layer ``name``'s input features (initial values before any input)."""
        layer = self.layers[name]
        if layer.mean is None:
            w = layer.module.weight
            layer.stats_like(w.device, torch.float64 if w.dtype == torch.float64 else torch.float32)
        return layer.mean, layer.var

    def state_dict(self) -> dict[str, Any]:
        """Running estimates per layer name, the options they were made with, the update counts.

        Taken between steps: inputs of forwards since the last :meth:`step` are not in it."""
        layers = {name: {"mean": la.mean.detach().clone(), "var": la.var.detach().clone(), "steps": la.steps}
                  for name, la in self.layers.items() if la.mean is not None}
        return {"momentum": self.momentum, "eps": self.eps, "skip": list(self.skip), "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s running estimates; the model must have the same layers."""
        unknown = sorted(set(state["layers"]) - set(self.layers))
        if unknown:
            raise ValueError(f"bnp: the saved state has layer {unknown[0]!r}, which this model does not have "
                             f"(or skips); load it into the model it was saved from")
        for name, layer in self.layers.items():
            saved = state["layers"].get(name)
            w = layer.module.weight
            if saved is None:
                layer.mean = layer.var = None
                layer.steps = 0
                continue
            if saved["mean"].shape != (layer.features,):
                raise ValueError(f"bnp: layer {name!r} has {layer.features} input features, the saved state "
                                 f"{tuple(saved['mean'].shape)}")
            layer.mean = saved["mean"].detach().clone().to(w.device)
            layer.var = saved["var"].detach().clone().to(w.device)
            layer.steps = int(saved["steps"])
            layer.pending = None

    def __repr__(self) -> str:
        return (f"BNPreconditioner({len(self.layers)} layers, momentum={self.momentum}, eps={self.eps}, "
                f"skip={list(self.skip)})")
