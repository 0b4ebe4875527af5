"""Virtual devices: k devices without synchronisation, simulated on one process.

In the GN paper (Wu & He 2018) the batch a BN layer's statistics see is the per-GPU batch N, while
SGD steps over the 8 x N images of all GPUs. :func:`set_virtual_devices` gives one process that
protocol: with ``k`` virtual devices, every batch-dependent layer (``batch_dependent`` true: bn,
brn, bgn, ghost, evonorm_b0, cbn, iebn, kn, ic and any new variant) cuts its training batch into
``k`` equal consecutive slices and treats each exactly as ``k`` unsynchronised devices would: each
slice is normalised by the layer's own forward, with its own statistics, from the same parameters
and the same starting buffers; the outputs are concatenated back. Gradients follow through the
concatenation, so an input's gradient is the one its device would compute and a parameter's
is the sum of the devices' (DDP averages the per-device mean losses; the mean loss over the whole
batch is that average when the slices are equal).

Running statistics: rank 0's
    Every buffer of the layer (running mean/var/std, ``num_batches_tracked``, anything a new variant
    keeps) ends the step as device 0's, i.e. updated from slice 0 alone. That is what k real devices
    keep under DDP: its default ``broadcast_buffers=True`` (also Lightning's) copies rank 0's buffers to
    every rank at each forward, so the other ranks' updates are overwritten and a variant whose forward
    reads its buffers (brn's r and d) sees rank 0's on every device, as here. The mean of the k would be
    a different, less noisy estimator than any real k-device run has; precise statistics
    (:func:`normlayers.precise_stats`) are the way to remove that noise explicitly.

Per-device state that is not a buffer
    A layer that keeps training state in plain attributes names them in ``device_state``; each
    virtual device keeps its own copy (cbn's buffer of past iterations, kn's per-step estimate that
    the next KN layer reads, through :func:`device_attribute`).

Two paths, both running the layer's own forward (its statistics, running update and schedule stay
the layer's alone)
    Folded (the fast path): a layer whose statistics are per channel, or per group of channels, over
    the batch and positions (bn, brn, bgn, ghost, evonorm_b0, iebn, ic) names in ``device_fold`` the
    attributes that count channels or groups. The k slices are laid side by side as k x C channels
    (device d's slice is channels d*C .. (d+1)*C of an (N/k, k*C, ...) batch), those attributes are
    multiplied by k, every per-channel (or per-group) parameter and buffer is repeated k times, and
    the layer's forward runs once: each of its statistics is then one device's, computed in one
    kernel over all k. Gradients of the repeated parameters sum over the devices; device 0's block
    of every buffer is kept. Dropout inside such a layer (ic) draws its mask over the folded layout:
    the same distribution, other draws than k slice passes.
    Forward hooks on a folded layer (and on layers inside it) see the folded batch and the folded
    counts (:func:`folding_devices`; ``precise_stats`` pools each statistic's k copies).
    Per slice: every other variant (state across steps: cbn, kn; statistics across channels: sn,
    dbn, iternorm) runs its forward once per slice, which is exact by construction and costs ``k``
    calls per layer. Per-slice statistics inside :func:`normlayers.stats.batch_moments` would give every
    statistic a slice axis that every variant's normalisation would have to carry.

``k = 1`` changes nothing. Eval mode (running statistics) is per sample and is not split, except
for a layer that normalises with batch statistics in eval (``track_running_stats=False``). Virtual
devices and a process group (``convert_sync``) do not combine: which slices would be synchronised is
not defined, so either refuses the other.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from normlayers.stats import keep_format

#: the virtual device whose slice is being normalised now (None: outside a virtual forward)
_current_device: int | None = None
#: the number of devices of the folded forward being run now (0: none): a layer within it sees its input whole
_folding = 0


def set_virtual_devices(model: nn.Module, devices: int) -> nn.Module:
    """Make every batch-dependent normlayers layer of ``model`` act as ``devices`` unsynchronised devices.

    Works in place and returns ``model``; ``devices=1`` is the plain layer.
    """
    from normlayers.base import NormLayer

    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"virtual_devices must be a positive int, got {devices!r}")
    for name, module in model.named_modules():
        if isinstance(module, NormLayer) and module.batch_dependent:
            if devices > 1 and module.process_group is not None:
                raise ValueError(f"virtual_devices: {name or type(module).__name__} is synchronised (convert_sync); "
                                 f"virtual devices and synchronised statistics do not combine")
            module.virtual_devices = devices
            module.__dict__.pop("_device_states", None)
    return model


def splits_batch(layer: nn.Module) -> bool:
    """Does this call of ``layer`` go through the virtual devices?"""
    if layer.virtual_devices == 1 or _current_device is not None or _folding:
        return False  # a layer inside another's slice (iebn's bn) sees that slice whole
    return layer.training or getattr(layer, "track_running_stats", True) is False


def device_attribute(layer: nn.Module, name: str):
    """``layer.<name>`` as the virtual device being run now holds it (the attribute itself outside)."""
    states = layer.__dict__.get("_device_states")
    if _current_device is None or states is None or _current_device >= len(states):
        return getattr(layer, name)
    return states[_current_device][name]


def folds(layer: nn.Module | type) -> bool:
    """Does ``layer`` (a layer or its class) take the folded path (all devices in one forward)?"""
    return layer.device_fold is not None and not layer.device_state


def virtual_call(layer: nn.Module, call, x: Tensor, *args, **kwargs) -> Tensor:
    """``call`` (the module's own ``__call__``) as ``layer.virtual_devices`` devices would: folded or per slice."""
    devices = layer.virtual_devices
    if x.dim() == 0 or x.shape[0] % devices:
        raise ValueError(
            f"{layer.norm_name or type(layer).__name__}: virtual_devices={devices} needs a batch that divides into "
            f"{devices} equal slices, got input of shape {tuple(x.shape)}; use a batch size that is a multiple "
            f"of {devices}"
        )
    if folds(layer) and not args and not kwargs and x.dim() >= 2 and x.shape[1] == layer.num_features:
        try:
            return _folded_call(layer, call, x)
        except ValueError:
            pass  # refused (e.g. too few values per statistic): the per-slice path says it in the device's terms
    return _per_slice_call(layer, call, x, *args, **kwargs)


def _folded_call(layer: nn.Module, call, x: Tensor) -> Tensor:
    """The k slices side by side as k x C channels, the layer's forward once (see the module docstring)."""
    global _folding
    devices = layer.virtual_devices
    n, channels, positions = x.shape[0], x.shape[1], x.shape[2:]
    folded = x.reshape(devices, n // devices, channels, *positions).transpose(0, 1)
    folded = folded.reshape(n // devices, devices * channels, *positions)
    modules = list(layer.modules())
    counts = [(m, name, getattr(m, name)) for m in modules for name in (getattr(type(m), "device_fold", None) or ())]
    # per-channel (per-group) tensors repeated once per device; scalars (step counts, learned eps) are shared
    params = [(m, key, p) for m in modules for key, p in m._parameters.items() if p is not None and p.dim() > 0]
    buffers = [(m, key, b) for m in modules for key, b in m._buffers.items() if b is not None and b.dim() > 0]
    repeated = [b.repeat(devices, *[1] * (b.dim() - 1)) for _, _, b in buffers]
    try:
        for m, name, value in counts:
            setattr(m, name, value * devices)
        for m, key, p in params:
            m._parameters[key] = p.repeat(devices, *[1] * (p.dim() - 1))
        for (m, key, _), copy_of in zip(buffers, repeated, strict=True):
            m._buffers[key] = copy_of
        _folding = devices
        y = call(folded)
    finally:
        _folding = 0
        for m, name, value in counts:
            setattr(m, name, value)
        for m, key, p in params:
            m._parameters[key] = p
        for m, key, b in buffers:
            m._buffers[key] = b
    with torch.no_grad():
        for (_, _, b), updated in zip(buffers, repeated, strict=True):
            b.copy_(updated[: b.shape[0]])  # device 0's block: rank 0's buffers
    return keep_format(_unfolded(y, devices), x)


def _unfolded(y: Tensor, devices: int) -> Tensor:
    """(N/k, k*C, ...) with device d's slice in channels d*C .. (d+1)*C back to (N, C, ...)."""
    per_device, channels = y.shape[0], y.shape[1] // devices
    y = y.reshape(per_device, devices, channels, *y.shape[2:]).transpose(0, 1)
    return y.reshape(devices * per_device, channels, *y.shape[3:])


def folding_devices() -> int:
    """Inside a folded forward, its number of devices k (0 elsewhere). A layer in it, and its forward
    hooks, see the folded (N/k, k*C, ...) batch with the layer's channel and group counts times k, so
    every statistic they compute appears once per device, device-major (``precise_stats`` pools them)."""
    return _folding


def _per_slice_call(layer: nn.Module, call, x: Tensor, *args, **kwargs) -> Tensor:
    """``call`` once per slice, each from the same starting buffers; device 0's buffers kept."""
    global _current_device
    devices = layer.virtual_devices
    owned = [(owner, key, tensor) for owner in layer.modules() for key, tensor in owner._buffers.items()
             if tensor is not None]
    names = type(layer).device_state
    states = layer.__dict__.get("_device_states")
    if states is None or len(states) != devices:
        own = {n: getattr(layer, n) for n in names}
        states = [own] + [{n: copy.deepcopy(v) for n, v in own.items()} for _ in range(devices - 1)]
        layer.__dict__["_device_states"] = states
    outputs, device_zero = [], []
    try:
        for device, part in enumerate(x.chunk(devices)):
            # fresh copies of the starting buffers: the originals take no part in any graph, so setting them
            # afterwards cannot disturb a backward that saved a slice's buffers
            for owner, key, tensor in owned:
                owner._buffers[key] = tensor.clone()
            for n in names:
                setattr(layer, n, states[device][n])
            _current_device = device
            outputs.append(call(part, *args, **kwargs))
            _current_device = None
            for n in names:
                states[device][n] = getattr(layer, n)
            if device == 0:
                device_zero = [owner._buffers[key] for owner, key, _ in owned]
    finally:
        _current_device = None
        for (owner, key, tensor), kept in zip(owned, device_zero or [t for _, _, t in owned], strict=True):
            if kept is not tensor:
                tensor.copy_(kept.detach())
            owner._buffers[key] = tensor
        for n in names:
            setattr(layer, n, states[0][n])
    return torch.cat(outputs, dim=0)
