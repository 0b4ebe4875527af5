"""Norm sites: where a model puts a normalization layer, and what follows it.

Every model asks :class:`NormSites` for the layer at each site. Placement decides which sites get
the configured spec and which get the identity (``none``):

- ``all``: every site (the architecture as published);
- ``final``: only the site right before the classifier (Bjorck et al. 2018, "Understanding Batch
  Normalization": normalising only before the last layer recovers much of BN's benefit);
- ``none``: no site.

Each built layer is handed the module whose output it normalises (``bind_preceding``), and
:func:`activation_after` gives no ReLU after a layer that includes its own activation (FRN+TLU,
EvoNorm, Proxy Norm).

Order (``model.norm_order``): ``norm_act`` is the usual weight -> norm -> ReLU; ``act_norm`` puts
each norm after its activation, right before the next weight layer (weight -> ReLU -> norm ->
weight), the ordering the Independent-Component layer needs (Chen et al. 2019: "... -> ReLU -> IC
-> Weight"); ``auto`` is ``act_norm`` for a layer class that declares ``before_weight_layer``
(``ic``) and ``norm_act`` otherwise. Layers that include their activation, or that model the
weight layer before them (``needs_preceding_weight``: cbn's Taylor compensation, kn's transition),
only make sense right after that weight layer, so ``act_norm`` is refused for them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

import normlayers
from trainer.model_rules import ORDERS, PLACEMENTS, resolve_order  # noqa: F401  (the rules live there)

IDENTITY = normlayers.NormSpec("none")


class NormSites:
    """Builds the norm layer of every site of one model from one spec and a placement."""

    def __init__(self, spec: Any, placement: str = "all", init_scale: float = 1.0, order: str = "auto"):
        if placement not in PLACEMENTS:
            raise ValueError(f"norm placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.spec = normlayers.NormSpec.parse(spec)  # parsed once for every site
        self.placement = placement
        self.init_scale = init_scale
        try:
            self.order = resolve_order(self.spec, order)
        except ValueError as e:
            raise ValueError(f"model.norm_order: {e}") from None

    @property
    def act_first(self) -> bool:
        """True under ``act_norm``: every site is ReLU -> norm instead of norm -> ReLU."""
        return self.order == "act_norm"

    def _build(self, channels: int, preceding: nn.Module | None, enabled: bool) -> nn.Module:
        layer = (self.spec if enabled else IDENTITY).build(channels)
        if enabled:
            if preceding is not None:
                layer.bind_preceding(preceding)
            if self.init_scale != 1.0:
                layer.init_scale_(self.init_scale)
        return layer

    def inner(self, channels: int, preceding: nn.Module | None) -> nn.Module:
        """A site inside the network: normalised under placement ``all`` only."""
        return self._build(channels, preceding, self.placement == "all")

    def final(self, channels: int, preceding: nn.Module | None) -> nn.Module:
        """A site the architecture itself has right before the classifier (pre-activation nets)."""
        return self._build(channels, preceding, self.placement in ("all", "final"))

    def added_final(self, channels: int, preceding: nn.Module | None) -> nn.Module:
        """The site before the classifier of nets that have none of their own: used by ``final`` only."""
        return self._build(channels, preceding, self.placement == "final")


def site(x: Tensor, norm: nn.Module, act: nn.Module, act_first: bool) -> Tensor:
    """One norm site: ``act(norm(x))``, or ``norm(act(x))`` under ``act_norm``."""
    return norm(act(x)) if act_first else act(norm(x))


def activation_after(norm: nn.Module) -> nn.Module:
    """ReLU after a norm site, or nothing when the layer already includes its activation."""
    return nn.Identity() if getattr(norm, "includes_activation", False) else nn.ReLU()


def init_weights(model: nn.Module) -> None:
    """He et al. (2015) init for convolutions, as in the ResNet papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
