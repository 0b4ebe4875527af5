"""precise_stats: the running statistics become the plain population mean and variance of the pooled values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlayers import build_norm, precise_stats, set_virtual_devices

SPECS = {"bn": "bn", "brn": "brn", "bgn": "bgn:groups=2", "ghost": "ghost:virtual_batch=2", "evonorm_b0": "evonorm_b0"}


def population(values: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Bessel-corrected variance of every value each statistic covers, written out."""
    if spec.startswith("bgn"):
        grouped = values.reshape(values.shape[0], 2, -1).transpose(0, 1).reshape(2, -1)  # group g of every sample
    else:
        grouped = values.transpose(0, 1).reshape(values.shape[1], -1)  # channel c of every sample and position
    grouped = grouped.double()
    mean = grouped.mean(1)
    var = ((grouped - mean[:, None]) ** 2).sum(1) / (grouped.shape[1] - 1)
    return mean.float(), var.float()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_precise_stats_are_the_population_statistics(name):
    torch.manual_seed(0)
    layer = build_norm(SPECS[name], 4)
    batches = [3.0 + 2.0 * torch.randn(4, 4, 3, 3) for _ in range(5)]
    layer.train()
    for batch in batches[:2]:  # some training, so the EMA differs from the population
        layer(batch)
    tracked = layer.num_batches_tracked.clone()
    layer.eval()
    assert precise_stats(layer, batches) == 5
    mean, var = population(torch.cat(batches), SPECS[name])
    if hasattr(layer, "running_mean"):
        torch.testing.assert_close(layer.running_mean, mean)
    if name == "brn":
        torch.testing.assert_close(layer.running_std, torch.sqrt(var + layer.eps))
    else:
        torch.testing.assert_close(layer.running_var, var)
    assert not layer.training and torch.equal(layer.num_batches_tracked, tracked)


class TwoLayers(nn.Module):
    def __init__(self, spec: str = "bn"):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 4, 3, padding=1), build_norm(spec, 4)
        self.conv2, self.norm2 = nn.Conv2d(4, 4, 3, padding=1), build_norm(spec, 4)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


@pytest.mark.parametrize("name", ["bn", "bgn", "brn"])
@pytest.mark.parametrize("devices", [1, 4])
def test_deeper_layers_see_training_mode_inputs_over_the_virtual_devices(devices, name):
    """Layer 2's population is over its inputs in a training-mode forward, where layer 1 normalises each
    virtual device's slice with that slice's statistics, as in training."""
    torch.manual_seed(0)
    net = set_virtual_devices(TwoLayers(SPECS[name]), devices)
    batches = [torch.randn(8, 3, 5, 5) for _ in range(3)]
    reference = set_virtual_devices(copy.deepcopy(net), 1).train()  # one plain copy per device's slice
    seen = []
    reference.norm2.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        for batch in batches:
            for part in batch.chunk(devices):
                reference(part)
    precise_stats(net, [(b, None) for b in batches])
    mean, var = population(torch.cat(seen), SPECS[name])
    torch.testing.assert_close(net.norm2.running_mean, mean)
    if name == "brn":
        torch.testing.assert_close(net.norm2.running_std, torch.sqrt(var + net.norm2.eps))
    else:
        torch.testing.assert_close(net.norm2.running_var, var)
    assert net.training


def test_no_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches given"):
        precise_stats(build_norm("bn", 4), [])
