"""The conventions a paper leaves open, each reading against its update written out here."""

from __future__ import annotations

import pytest
import torch

from normlayers import build_norm

C = 4


def batches(n=12, steps=3, shape=(3, 3)):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, C, *shape, generator=generator) * 2 + 1 for _ in range(steps)]


@pytest.mark.parametrize(("running_update", "momentum_of_one_ghost"), [("per_step", 0.3 / 4), ("per_ghost", 0.3)])
def test_ghost_running_statistics_per_ghost_batch(running_update, momentum_of_one_ghost):
    layer = build_norm(f"ghost:virtual_batch=3,momentum=0.3,running_update={running_update}", C)
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for x in batches():
        layer(x)
        for ghost in x.double().split(3):  # in order, one BN-style update per ghost batch
            values = ghost.transpose(0, 1).reshape(C, -1)
            mean = (1 - momentum_of_one_ghost) * mean + momentum_of_one_ghost * values.mean(1)
            var = (1 - momentum_of_one_ghost) * var + momentum_of_one_ghost * values.var(1, correction=1)
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_ghost_running_update_is_checked():
    with pytest.raises(ValueError, match=r"^ghost: running_update must be one of per_step, per_ghost, got 'often'$"):
        build_norm("ghost:running_update=often", C)


@pytest.mark.parametrize(("spec", "correction"), [
    ("evonorm_b0", 1), ("evonorm_b0:unbiased_running=false", 0),
    ("kn", 0), ("kn:unbiased_running=true", 1),
])
def test_running_variance_bessel_correction(spec, correction):
    layer = build_norm(f"{spec},momentum=0.2" if ":" in spec else f"{spec}:momentum=0.2", C)
    var = torch.ones(C, dtype=torch.float64)
    for x in batches():
        layer(x)
        var = 0.8 * var + 0.2 * x.double().transpose(0, 1).reshape(C, -1).var(1, correction=correction)
    # (an unbound kn has no prediction: its estimate is the batch's own statistics)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)
