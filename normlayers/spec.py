"""The norm spec: which registered variant, with which options, parsed and checked once.

A spec is written as a name (``"bn"``), a name with options (``"gn:groups=8,eps=1e-5"``) or a
mapping (``{"name": "gn", "groups": 8}``). :meth:`NormSpec.parse` turns any of these into a
``NormSpec`` whose options are checked against the class's constructor signature (names and
types) without building a layer; ``str(spec)`` is its canonical text (options in constructor
order, values as they parse back), the one form configs store and MLflow shows. Rules that depend
on the channel count (``groups`` dividing it, ``eps > 0`` ...) live in the constructors:
:meth:`NormSpec.check` runs them on the meta device, once per spec and channel count.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from normlayers.base import NormLayer
from normlayers.registry import _REGISTRY, NormInfo, _check_type, _options, info_of, parse_spec


def _text(value: Any) -> str:
    """A value as the spec language writes it, so that it parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


@functools.lru_cache(maxsize=64)
def _hints(cls: type[NormLayer]) -> dict[str, Any]:
    return typing.get_type_hints(cls.__init__)


@dataclass(frozen=True)
class NormSpec:
    """A registered norm name and its checked options (in constructor order)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | NormSpec) -> NormSpec:
        """The spec ``spec`` writes; one ``ValueError`` naming what is wrong and what is valid."""
        if isinstance(spec, NormSpec):
            return spec
        if isinstance(spec, str):
            return _parse_text(spec)
        return _checked(*parse_spec(spec))

    @property
    def cls(self) -> type[NormLayer]:
        return _REGISTRY[self.name]

    @property
    def info(self) -> NormInfo:
        return info_of(self.name)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def build(self, num_features: int) -> NormLayer:
        """The layer for ``num_features`` channels."""
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"norm {self.name!r}: num_features must be a positive int, got {num_features!r}")
        return self.cls(num_features, **self.kwargs)

    def check(self, num_features: int) -> None:
        """The constructor's own rules for ``num_features`` channels, on the meta device (no memory), cached."""
        try:
            hash(self)
        except TypeError:  # an option of a type the signature does not check (a list ...): not cacheable
            _check_built.__wrapped__(self, num_features)
            return
        _check_built(self, num_features)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_text(v)}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name


@functools.lru_cache(maxsize=1024)
def _parse_text(text: str) -> NormSpec:
    return _checked(*parse_spec(text))


@functools.lru_cache(maxsize=1024)
def _check_built(spec: NormSpec, num_features: int) -> None:
    try:
        with torch.device("meta"):
            spec.build(num_features)
    except ValueError:
        raise
    except Exception:  # a constructor that computes with tensor values, which the meta device has not
        spec.build(num_features)


def _checked(name: str, options: dict[str, Any]) -> NormSpec:
    cls = _REGISTRY[name]
    accepted = _options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) or "none"
        raise ValueError(f"norm {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    hints = _hints(cls)
    ordered = tuple((key, _check_type(name, key, options[key], hints.get(key))) for key in accepted if key in options)
    return NormSpec(name, ordered)
