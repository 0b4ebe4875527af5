"""k virtual devices equal k separate copies of the model, each run on its slice without synchronisation.

The reference is what k unsynchronised DDP devices do: every copy has the same parameters, takes
its own slice, keeps its own per-device state (cbn's history, kn's chain), starts each step from
rank 0's buffers (DDP's broadcast_buffers) and steps with the sum of the copies' gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlayers
from normlayers import available, build_norm, link_kalman_layers, norm_class, set_virtual_devices, virtual

# options that make the batch-dependent machinery act within a few steps
OPTIONS = {"brn": ":warmup_steps=0,r_max_steps=2,d_max_steps=2", "cbn": ":burnin=1,k=2", "ghost": ":virtual_batch=2",
           "bgn": ":groups=2", "ic": ":drop=0.0"}  # dropout draws come in another order
BATCH_DEPENDENT = sorted(name for name in available() if norm_class(name).batch_dependent)


class Net(nn.Module):
    def __init__(self, spec: str):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.norm1, self.norm2 = build_norm(spec, 4), build_norm(spec, 4)
        self.norm1.bind_preceding(self.conv1)
        self.norm2.bind_preceding(self.conv2)
        link_kalman_layers(self)
        self.act = nn.Identity() if self.norm1.includes_activation else nn.ReLU()

    def forward(self, x):
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


def test_every_batch_dependent_variant_is_covered():
    assert {"bn", "brn", "bgn", "ghost", "evonorm_b0", "cbn", "iebn", "kn", "ic"} <= set(BATCH_DEPENDENT)


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_virtual_devices_equal_separate_copies(name):
    devices, per_device, steps, lr = 2, 4, 4, 0.1
    torch.manual_seed(0)
    virtual = Net(name + OPTIONS.get(name, ""))
    copies = [copy.deepcopy(virtual) for _ in range(devices)]
    set_virtual_devices(virtual, devices)
    weights = torch.randn(devices * per_device, 4, 4, 4)  # a fixed linear read-out as the loss
    for step in range(steps):
        x = torch.randn(devices * per_device, 3, 4, 4, requires_grad=True)
        torch.manual_seed(100 + step)  # ic's dropout: the same draws in the same device order
        out = virtual(x)
        (out * weights).sum().backward()

        torch.manual_seed(100 + step)
        slices = x.detach().chunk(devices)
        for model in copies[1:]:  # DDP broadcast_buffers: every device starts the step from rank 0's buffers
            for mine, rank0 in zip(model.buffers(), copies[0].buffers(), strict=True):
                mine.copy_(rank0)
        outs, input_grads = [], []
        for device, model in enumerate(copies):
            part = slices[device].clone().requires_grad_(True)
            y = model(part)
            (y * weights.chunk(devices)[device]).sum().backward()
            outs.append(y.detach())
            input_grads.append(part.grad)
        torch.testing.assert_close(out.detach(), torch.cat(outs), msg=f"{name} step {step}: outputs")
        torch.testing.assert_close(x.grad, torch.cat(input_grads), msg=f"{name} step {step}: input gradients")
        for (key, buffer), rank0 in zip(virtual.named_buffers(), copies[0].buffers(), strict=True):
            torch.testing.assert_close(buffer, rank0, msg=f"{name} step {step}: buffer {key} is not rank 0's")
        with torch.no_grad():  # one SGD step on the summed gradient, the same on every copy
            for (key, p), *ps in zip(virtual.named_parameters(), *(c.parameters() for c in copies), strict=True):
                if p.grad is None:  # a parameter this step did not use (kn's gain before a prediction)
                    assert all(q.grad is None for q in ps), f"{name} step {step}: gradient of {key}"
                    continue
                total = sum(q.grad for q in ps)
                # atol: a conv bias ahead of a norm gets a gradient of cancelling terms, near zero
                torch.testing.assert_close(p.grad, total, rtol=1e-4, atol=1e-4,
                                           msg=f"{name} step {step}: gradient of {key}")
                for q in [p, *ps]:
                    q -= lr * total
                    q.grad = None


def test_one_virtual_device_changes_nothing():
    torch.manual_seed(0)
    plain = Net("bn")
    one = set_virtual_devices(copy.deepcopy(plain), 1)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(one(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(one.norm1.running_var, plain.norm1.running_var, rtol=0, atol=0)


def test_eval_is_not_split_and_state_dict_keys_are_unchanged():
    torch.manual_seed(0)
    net = set_virtual_devices(Net("bn"), 4)
    plain = copy.deepcopy(net)
    set_virtual_devices(plain, 1)
    net.eval(), plain.eval()
    x = torch.randn(6, 3, 4, 4)  # 6 does not divide into 4 slices: eval does not need it to
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    assert net.state_dict().keys() == plain.state_dict().keys()


def test_a_batch_that_does_not_divide_is_one_clear_error():
    layer = set_virtual_devices(build_norm("bn", 4), 3)
    with pytest.raises(ValueError, match=r"^bn: virtual_devices=3 needs a batch that divides into 3 equal slices"):
        layer(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match="positive int"):
        set_virtual_devices(layer, 0)


def test_virtual_devices_and_sync_refuse_each_other():
    layer = build_norm("bn", 4)
    layer.process_group = object()
    with pytest.raises(ValueError, match="do not combine"):
        set_virtual_devices(layer, 2)
    assert normlayers.set_virtual_devices is set_virtual_devices


FOLDED = {"bn", "brn", "bgn", "ghost", "evonorm_b0", "iebn", "ic"}


def test_variants_with_per_channel_statistics_fold_and_the_others_run_per_slice():
    assert {name for name in BATCH_DEPENDENT if virtual.folds(norm_class(name))} == FOLDED
    assert not virtual.folds(norm_class("cbn")) and not virtual.folds(norm_class("kn"))


@pytest.mark.parametrize("name", sorted(FOLDED))
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (8, 4)], ids=["nchw", "nc"])
def test_the_folded_forward_equals_the_per_slice_one(name, shape):
    """Called directly (virtual_call falls back to the per-slice path on a refusal): the same outputs,
    input and parameter gradients and buffers, at the step the run's layers start from and after it."""
    if name == "evonorm_b0" and len(shape) == 2:
        pytest.skip("evonorm_b0 needs spatial input")
    torch.manual_seed(0)
    folded = set_virtual_devices(build_norm(name + OPTIONS.get(name, ""), 4), 4).train()
    sliced = copy.deepcopy(folded)
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        weights = torch.randn(*shape, dtype=torch.float64)
        ya = virtual._folded_call(folded, super(type(folded), folded).__call__, xa)
        yb = virtual._per_slice_call(sliced, super(type(sliced), sliced).__call__, xb)
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        torch.testing.assert_close(ya, yb, msg=f"{name} step {step}: outputs")
        torch.testing.assert_close(xa.grad, xb.grad, msg=f"{name} step {step}: input gradients")
        for (key, a), b in zip(folded.named_parameters(), sliced.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, msg=f"{name} step {step}: gradient of {key}")
        for (key, a), b in zip(folded.named_buffers(), sliced.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0 if a.dtype == torch.long else 1e-12,
                                       msg=f"{name} step {step}: buffer {key}")
    assert folded.num_features == 4  # the fold's channel count is undone
