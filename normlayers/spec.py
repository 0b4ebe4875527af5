"""The norm spec: which registered variant, with which options, parsed and checked once.

A spec is written as a name (``"bn"``), a name with options (``"gn:groups=8,eps=1e-5"``) or a
mapping (``{"name": "gn", "groups": 8}``). :meth:`NormSpec.parse` turns any of these into a
``NormSpec`` whose options are checked against the variant's entry in :mod:`normlayers.catalog`
(names and types, in constructor order) without importing its class or torch; ``str(spec)`` is its
canonical text (options in constructor order, values as they parse back), the one form configs
store and MLflow shows. :meth:`NormSpec.check` runs the constructor's rules on the options and the
channel count (``groups`` dividing it, ``eps > 0`` ...) from the catalog too, cached; only
:meth:`NormSpec.build` (and ``cls``/``info``) loads the class.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from normlayers.catalog import VARIANTS
from normlayers.registry import NormInfo, check_types, info_of, parse_spec, registered_class

if TYPE_CHECKING:
    from normlayers.base import NormLayer


def _text(value: Any) -> str:
    """A value as the spec language writes it, so that it parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


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
        return registered_class(self.name)

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
        """The constructor's own rules for ``num_features`` channels (:mod:`normlayers.catalog`), cached."""
        try:
            hash(self)
        except TypeError:  # an option of a type the catalog does not check (a list ...): not cacheable
            _check_rules.__wrapped__(self, num_features)
            return
        _check_rules(self, num_features)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_text(v)}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name


@functools.lru_cache(maxsize=1024)
def _parse_text(text: str) -> NormSpec:
    return _checked(*parse_spec(text))


@functools.lru_cache(maxsize=1024)
def _check_rules(spec: NormSpec, num_features: int) -> None:
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"norm {spec.name!r}: num_features must be a positive int, got {num_features!r}")
    variant = VARIANTS[spec.name]
    variant.rules(num_features, {**{option.name: option.default for option in variant.options}, **spec.kwargs})


def _checked(name: str, options: dict[str, Any]) -> NormSpec:
    accepted = {option.name: option for option in VARIANTS[name].options}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) or "none"
        raise ValueError(f"norm {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    ordered = tuple((key, check_types(name, key, options[key], option.types))
                    for key, option in accepted.items() if key in options)
    return NormSpec(name, ordered)
