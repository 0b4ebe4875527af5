"""Layers whose state links steps or layers compile once and stay compiled over many training steps.

A Python int read from a module and changed every step is specialised by torch.compile: one
recompile per step until the recompile limit (fullgraph then fails). kn's chained estimate is the case
here: its flags hold the same values at the start of every step. aot_eager: the same tracing as
inductor without its code generation (the benchmark runs inductor)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from normlayers import build_norm, link_kalman_layers

C = 6


def kalman_chain() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), build_norm("kn", C), nn.ReLU(),
                        nn.Conv2d(C, C, 3, padding=1), build_norm("kn", C))
    net[1].bind_preceding(net[0])
    net[4].bind_preceding(net[3])
    link_kalman_layers(net)
    return net


def test_kalman_chain_compiles_once_over_many_steps_and_matches_eager():
    torch._dynamo.reset()
    eager = kalman_chain()
    compiled_net = copy.deepcopy(eager)
    step = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        for seed in range(6):
            x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
            want, got = eager(x), step(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {seed}")
            want.square().sum().backward()
            got.square().sum().backward()
    assert eager[4].prediction() is not None  # the second layer fused the first one's estimate
    for (name, w), g in zip(eager.named_parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (key, w), g in zip(eager.state_dict().items(), compiled_net.state_dict().values(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=key)
