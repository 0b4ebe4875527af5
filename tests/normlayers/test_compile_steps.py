"""Layers whose state links steps or layers compile once and stay compiled over many training steps.

A Python int read from a module and changed every step is specialised by torch.compile: one
recompile per step until the recompile limit (fullgraph then fails). kn's chained estimate: its flags
hold the same values at the start of every step (one graph). cbn's cross-iteration buffer runs eagerly
(one graph break per layer call, never a recompile). aot_eager: the same tracing as inductor without
its code generation (the benchmark runs inductor)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch._dynamo.utils import counters

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


def cbn_chain() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), build_norm("cbn:burnin=2,k=2", C), nn.ReLU(),
                        nn.Conv2d(C, C, 3, padding=1), build_norm("cbn:burnin=2,k=2", C))
    net[1].bind_preceding(net[0])
    net[4].bind_preceding(net[3])
    return net


def steps_match_eager(eager: nn.Sequential, fullgraph: bool) -> None:
    """Six compiled training steps against the same steps in eager; after the first three (the
    buffer filling, each layer's first call) nothing is compiled again."""
    torch._dynamo.reset()
    counters.clear()
    compiled_net = copy.deepcopy(eager)
    step = torch.compile(compiled_net, fullgraph=fullgraph, backend="aot_eager")
    for seed in range(6):
        if seed == 3:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        want, got = eager(x), step(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {seed}")
        want.square().sum().backward()
        got.square().sum().backward()
        for net in (eager, compiled_net):  # cbn's compensation reads the weights' change: take steps
            with torch.no_grad():
                for p in net.parameters():
                    if p.grad is not None:  # kn's first gain has no prediction to weigh
                        p -= 0.01 * p.grad
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup, "compiled again after the third step"
    for (name, w), g in zip(eager.named_parameters(), compiled_net.parameters(), strict=True):
        if w.grad is not None or g.grad is not None:
            torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (key, w), g in zip(eager.state_dict().items(), compiled_net.state_dict().values(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=key)


def test_kalman_chain_compiles_once_over_many_steps_and_matches_eager():
    eager = kalman_chain()
    steps_match_eager(eager, fullgraph=True)
    assert eager[4].prediction() is not None  # the second layer fused the first one's estimate


def test_cross_iteration_bn_compiles_once_with_its_buffer_run_eagerly():
    eager = cbn_chain()
    steps_match_eager(eager, fullgraph=False)
    assert len(eager[4]._history) == 2  # the buffer was filled and, past the burn-in, pooled
