"""What every registered variant accepts, without importing its class (or torch): a config checks a spec here.

Each :class:`Variant` names the module that registers its class, its constructor's options (types and
defaults, in signature order), the class flags models and configs rely on, and ``rules``: the checks
its constructor makes on the options and the channel count, with the constructor's own words.
Building a layer still goes through the class (:meth:`normlayers.NormSpec.build`).
``tests/normlayers/test_catalog.py`` holds every entry against its class (signature, flags, and the
constructor's verdict and message on a grid of values), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NONE = type(None)
INT, FLOAT, BOOL, STR = (int,), (float,), (bool,), (str,)
OPT_INT, OPT_FLOAT = (int, NONE), (float, NONE)
DEFAULT_GROUPS = 32  # GN's default group count (normlayers.groupnorm)
GHOST_RUNNING_UPDATES = ("per_step", "per_ghost")
PROXY_BASES = ("ln", "gn")
PROXY_ACTIVATIONS = ("relu", "silu", "gelu")


@dataclass(frozen=True)
class Option:
    name: str
    types: tuple[type, ...]  # what a value may be (an int is taken for a float)
    default: Any


@dataclass(frozen=True)
class Variant:
    name: str
    module: str  # importing it registers the class
    options: tuple[Option, ...] = ()
    rules: Callable[[int, Mapping[str, Any]], None] = field(default=lambda n, o: None, repr=False)
    batch_dependent: bool = False
    includes_activation: bool = False
    before_weight_layer: bool = False
    needs_preceding_weight: bool = False


# --- the constructors' rules (same order and words as the constructors) -----------------------------------


def eps_momentum(who: str, eps: float, momentum: float | None = None) -> None:
    if not eps > 0:
        raise ValueError(f"{who}: eps must be > 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{who}: momentum must be in [0, 1] or None (cumulative average), got {momentum}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def groups_of(who: str, num_features: int, groups: int | None, group_size: int | None) -> int:
    if groups is not None and group_size is not None:
        raise ValueError(f"{who}: give groups or group_size, not both (got groups={groups}, group_size={group_size})")
    if group_size is not None:
        if group_size < 1 or num_features % group_size:
            raise ValueError(f"{who}: group_size={group_size} does not divide num_features={num_features}; "
                             f"use one of {_divisors(num_features)}")
        return num_features // group_size
    if groups is None:
        return math.gcd(DEFAULT_GROUPS, num_features)
    if groups < 1 or num_features % groups:
        raise ValueError(f"{who}: groups={groups} does not divide num_features={num_features}; "
                         f"use one of {_divisors(num_features)}")
    return groups


def _eps(who: str) -> Callable[[int, Mapping[str, Any]], None]:
    return lambda n, o: eps_momentum(who, o["eps"])


def _eps_momentum(who: str) -> Callable[[int, Mapping[str, Any]], None]:
    return lambda n, o: eps_momentum(who, o["eps"], o["momentum"])


def _bgn(n: int, o: Mapping[str, Any]) -> None:
    eps_momentum("bgn", o["eps"], o["momentum"])
    if o["groups"] < 1:
        raise ValueError(f"bgn: groups must be a positive int, got {o['groups']}")


def _brn(n: int, o: Mapping[str, Any]) -> None:
    eps_momentum("brn", o["eps"], o["momentum"])
    if o["r_max"] < 1.0 or o["d_max"] < 0.0:
        raise ValueError(f"brn: need r_max >= 1 and d_max >= 0 (1 and 0 are plain BN), got r_max={o['r_max']}, "
                         f"d_max={o['d_max']}")
    if min(o["warmup_steps"], o["r_max_steps"], o["d_max_steps"]) < 0:
        raise ValueError(f"brn: step counts must be >= 0, got warmup_steps={o['warmup_steps']}, "
                         f"r_max_steps={o['r_max_steps']}, d_max_steps={o['d_max_steps']}")


def _cbn(n: int, o: Mapping[str, Any]) -> None:
    if o["k"] < 0:
        raise ValueError(f"cbn: k (previous iterations to use) must be >= 0, got {o['k']}")
    if o["burnin"] < 0:
        raise ValueError(f"cbn: burnin (steps before the buffer is used) must be >= 0, got {o['burnin']}")
    eps_momentum("cbn", o["eps"], o["momentum"])


def _whitening(who: str, default_group_size: int = 16) -> Callable[[int, Mapping[str, Any]], None]:
    def rules(n: int, o: Mapping[str, Any]) -> None:
        if who == "iternorm" and o["iterations"] < 1:
            raise ValueError(f"iternorm: iterations (Newton-Schulz steps T) must be >= 1, got {o['iterations']}")
        eps_momentum(who, o["eps"], o["momentum"])
        groups, size = o["groups"], o["group_size"]
        if groups is None and size is None:
            size = math.gcd(default_group_size, n)
        groups_of(who, n, groups, size)

    return rules


def _evonorm_s0(n: int, o: Mapping[str, Any]) -> None:
    eps_momentum("evonorm_s0", o["eps"])
    groups_of("evonorm_s0", n, o["groups"], o["group_size"])


def _ghost(n: int, o: Mapping[str, Any]) -> None:
    eps_momentum("ghost", o["eps"], o["momentum"])
    if o["running_update"] not in GHOST_RUNNING_UPDATES:
        raise ValueError(f"ghost: running_update must be one of {', '.join(GHOST_RUNNING_UPDATES)}, "
                         f"got {o['running_update']!r}")
    if o["virtual_batch"] < 1:
        raise ValueError(f"ghost: virtual_batch must be a positive number of samples, got {o['virtual_batch']}")


def _gn(n: int, o: Mapping[str, Any]) -> None:
    groups_of("gn", n, o["groups"], o["group_size"])
    eps_momentum("gn", o["eps"])


def _ic(n: int, o: Mapping[str, Any]) -> None:
    if not 0.0 <= o["drop"] < 1.0:
        raise ValueError(f"ic: drop (the dropout probability) must be in [0, 1), got {o['drop']}")
    eps_momentum("ic", o["eps"], o["momentum"])


def _kn(n: int, o: Mapping[str, Any]) -> None:
    if not 0.0 < o["gain"] < 1.0:
        raise ValueError(f"kn: gain (the weight of the layer's own batch statistics) must be in (0, 1), "
                         f"got {o['gain']}")
    eps_momentum("kn", o["eps"], o["momentum"])


def _proxy(n: int, o: Mapping[str, Any]) -> None:
    base, groups = o["base"], o["groups"]
    if base not in PROXY_BASES:
        raise ValueError(f"proxy: base must be one of {', '.join(PROXY_BASES)}, got {base!r}")
    if base == "ln" and groups is not None:
        raise ValueError(f"proxy: groups={groups} only applies to base=gn; write proxy:base=gn,groups={groups}")
    if o["activation"] not in PROXY_ACTIVATIONS:
        raise ValueError(f"proxy: activation must be one of {', '.join(PROXY_ACTIVATIONS)}, got {o['activation']!r}")
    eps_momentum("proxy", o["eps"])
    if not o["proxy_eps"] > 0:
        raise ValueError(f"proxy: proxy_eps must be > 0, got {o['proxy_eps']}")
    if o["samples"] < 2:
        raise ValueError(f"proxy: samples (Gaussian quantiles for the proxy) must be >= 2, got {o['samples']}")
    if base == "gn":
        groups_of("proxy", n, groups, None)


# --- what else a config names: weight standardisation kinds, BNP's options (normlayers.weight_std, .bnp) ---

WEIGHT_STD_KINDS = ("none", "ws", "scaled_ws")
BNP_DEFAULT_MOMENTUM = 0.1
BNP_DEFAULT_EPS = 0.1
BNP_LAYER_TYPES = ("linear", "conv1d", "conv2d", "conv3d")  # the names bnp's ``skip`` accepts


def bnp_options(momentum: float, eps: float, skip: Iterable[str]) -> tuple[str, ...]:
    """One clear ``ValueError`` for a bad BNP option; returns ``skip`` as a tuple of layer-type names."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"bnp: momentum must be a number in [0, 1], got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bnp: momentum must be in [0, 1] (1: the current batch alone), got {momentum}")
    eps_momentum("bnp", eps)
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    unknown = [s for s in skip if s not in BNP_LAYER_TYPES]
    if unknown:
        raise ValueError(f"bnp: skip names layer types, {unknown[0]!r} is not one; choose from "
                         f"{', '.join(BNP_LAYER_TYPES)}")
    return skip


# --- the variants ---------------------------------------------------------------------------------------

_EPS = Option("eps", FLOAT, 1e-5)
_MOMENTUM = Option("momentum", OPT_FLOAT, 0.1)
_AFFINE = Option("affine", BOOL, True)
_GROUPS = (Option("groups", OPT_INT, None), Option("group_size", OPT_INT, None))

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bgn", "normlayers.batchgroup", (Option("groups", INT, 32), _EPS, _MOMENTUM, _AFFINE), _bgn,
            batch_dependent=True),
    Variant("bn", "normlayers.batchnorm", (_EPS, _MOMENTUM, _AFFINE, Option("track_running_stats", BOOL, True)),
            _eps_momentum("bn"), batch_dependent=True),
    Variant("brn", "normlayers.renorm", (Option("r_max", FLOAT, 3.0), Option("d_max", FLOAT, 5.0),
                                         Option("warmup_steps", INT, 5000), Option("r_max_steps", INT, 40000),
                                         Option("d_max_steps", INT, 25000), _EPS, _MOMENTUM, _AFFINE),
            _brn, batch_dependent=True),
    Variant("cbn", "normlayers.cbn", (Option("k", INT, 3), Option("burnin", INT, 500), Option("compensate", BOOL, True),
                                      _EPS, _MOMENTUM, _AFFINE), _cbn, batch_dependent=True,
            needs_preceding_weight=True),
    Variant("dbn", "normlayers.whitening", (*_GROUPS, _EPS, _MOMENTUM, _AFFINE), _whitening("dbn"),
            batch_dependent=True),
    Variant("evonorm_b0", "normlayers.evonorm", (_EPS, _MOMENTUM, Option("unbiased_running", BOOL, True)),
            _eps_momentum("evonorm_b0"), batch_dependent=True, includes_activation=True),
    Variant("evonorm_s0", "normlayers.evonorm", (*_GROUPS, _EPS), _evonorm_s0, includes_activation=True),
    Variant("frn", "normlayers.frn", (Option("eps", FLOAT, 1e-6), Option("learn_eps", BOOL, True)), _eps("frn"),
            includes_activation=True),
    Variant("frozen", "normlayers.frozen", (_EPS,), _eps("frozen")),
    Variant("ghost", "normlayers.ghost", (Option("virtual_batch", INT, 32), _EPS, _MOMENTUM, _AFFINE,
                                          Option("running_update", STR, "per_step")), _ghost, batch_dependent=True),
    Variant("gn", "normlayers.groupnorm", (*_GROUPS, _EPS, _AFFINE), _gn),
    Variant("ic", "normlayers.ic", (Option("drop", FLOAT, 0.05), _EPS, _MOMENTUM, _AFFINE), _ic,
            batch_dependent=True, before_weight_layer=True),
    Variant("iebn", "normlayers.iebn", (_EPS, _MOMENTUM, Option("gate_weight_init", FLOAT, 0.0),
                                        Option("gate_bias_init", FLOAT, -1.0)), _eps_momentum("iebn"),
            batch_dependent=True),
    Variant("in", "normlayers.groupnorm", (_EPS, _MOMENTUM, Option("affine", BOOL, False),
                                           Option("track_running_stats", BOOL, False)), _eps_momentum("in")),
    Variant("iternorm", "normlayers.whitening", (Option("iterations", INT, 5), *_GROUPS, _EPS, _MOMENTUM, _AFFINE),
            _whitening("iternorm"), batch_dependent=True),
    Variant("kn", "normlayers.kalman", (Option("gain", FLOAT, 0.1), Option("learn_gain", BOOL, True), _EPS, _MOMENTUM,
                                        _AFFINE, Option("unbiased_running", BOOL, False)), _kn,
            batch_dependent=True, needs_preceding_weight=True),
    Variant("ln", "normlayers.groupnorm", (_EPS, _AFFINE), _eps("ln")),
    Variant("none", "normlayers.batchnorm"),
    Variant("pn", "normlayers.positional", (_EPS, _AFFINE), _eps("pn")),
    Variant("proxy", "normlayers.proxy", (Option("base", STR, "ln"), Option("groups", OPT_INT, None),
                                          Option("activation", STR, "relu"), _EPS, Option("proxy_eps", FLOAT, 0.03),
                                          Option("samples", INT, 256)), _proxy, includes_activation=True),
    Variant("rms", "normlayers.rms", (Option("eps", FLOAT, 1e-8), _AFFINE, Option("bias", BOOL, False)), _eps("rms")),
    Variant("sn", "normlayers.switchable", (_EPS, _MOMENTUM, _AFFINE), _eps_momentum("sn"), batch_dependent=True),
)}
