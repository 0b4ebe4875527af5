"""The registry of normalization variants and the spec language that selects one.

A spec is a name (``"bn"``), a name with options (``"gn:groups=8,eps=1e-5"``), or a mapping
(``{"name": "bgn", "groups": 8}``). :func:`build_norm` turns a spec and a channel count into a
module; every mistake raises one ``ValueError`` that says what is wrong and what is valid.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from normlayers.catalog import VARIANTS

if TYPE_CHECKING:  # the classes load on first use (normlayers.catalog): checking a spec needs no torch
    from torch import nn

    from normlayers.base import NormLayer

_REGISTRY: dict[str, type[NormLayer]] = {}
_DESCRIPTIONS: dict[str, str] = {}


@dataclass(frozen=True)
class NormInfo:
    """One registered variant: its name, a one-line description and its options with defaults."""

    name: str
    description: str
    options: dict[str, Any]
    batch_dependent: bool
    includes_activation: bool
    before_weight_layer: bool = False

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "no options"
        return f"{self.name:12s} {self.description}  [{opts}]"


def register(name: str, description: str) -> Callable[[type[NormLayer]], type[NormLayer]]:
    """Class decorator: make ``cls`` buildable as ``name``."""

    def deco(cls: type[NormLayer]) -> type[NormLayer]:
        from normlayers.base import NormLayer  # the class's module has imported torch already

        if name in _REGISTRY:
            raise ValueError(f"normalization {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, NormLayer)):
            raise TypeError(f"{cls!r} must subclass normlayers.NormLayer to be registered")
        cls.norm_name = name
        _REGISTRY[name] = cls
        _DESCRIPTIONS[name] = description
        return cls

    return deco


def _options(cls: type[NormLayer]) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if not params or params[0].name != "num_features":
        raise TypeError(f"{cls.__name__}.__init__ must take num_features first")
    return {
        p.name: p
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def registered_class(name: str) -> type[NormLayer]:
    """The class of the variant ``name`` (a name of :data:`normlayers.catalog.VARIANTS`), its module imported."""
    if name not in _REGISTRY:
        importlib.import_module(VARIANTS[name].module)
    return _REGISTRY[name]


def info_of(name: str) -> NormInfo:
    """The registered variant ``name``: its description, options (with defaults) and placement needs."""
    cls = registered_class(name)
    return NormInfo(
        name=name,
        description=_DESCRIPTIONS[name],
        options={k: p.default for k, p in _options(cls).items()},
        batch_dependent=cls.batch_dependent,
        includes_activation=cls.includes_activation,
        before_weight_layer=cls.before_weight_layer,
    )


def available() -> dict[str, NormInfo]:
    """Every registered variant by name, with its description and options (and their defaults)."""
    return {name: info_of(name) for name in sorted(VARIANTS)}


def norm_class(spec: str | Mapping[str, Any]) -> type[NormLayer]:
    """The class a spec names (validates the name only)."""
    name, _ = parse_spec(spec)
    return registered_class(name)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a spec into its registered name and its (unchecked) options."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(
                f"norm spec {dict(spec)!r} has no 'name' key; write e.g. {{'name': 'gn', 'groups': 8}}"
            )
        name = options.pop("name")
    elif isinstance(spec, str):
        name, sep, rest = spec.strip().partition(":")
        options = {}
        if sep:
            if not rest.strip():
                raise ValueError(
                    f"norm spec {spec!r} has ':' but no options; write 'name' or 'name:key=value,key=value'"
                )
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key.strip() or not value.strip():
                    raise ValueError(
                        f"norm spec {spec!r}: malformed option {item.strip()!r}; "
                        f"write 'name:key=value,key=value' (e.g. 'gn:groups=8')"
                    )
                if key.strip() in options:
                    raise ValueError(f"norm spec {spec!r}: option {key.strip()!r} is given twice")
                options[key.strip()] = _parse_value(value)
    else:
        raise ValueError(
            f"norm spec must be a string like 'gn:groups=8' or a mapping with a 'name', "
            f"got {type(spec).__name__}"
        )
    name = str(name).strip()
    if name not in VARIANTS:
        raise ValueError(f"unknown normalization {name!r}; available: {', '.join(sorted(VARIANTS))}")
    return name, options


def _accepted_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation admits, or ``None`` when it is not checkable."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            sub = _accepted_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if annotation is type(None):
        return (type(None),)
    if annotation in (int, float, bool, str):
        return (annotation,)
    return None


def _check_type(name: str, key: str, value: Any, annotation: Any) -> Any:
    accepted = _accepted_types(annotation)
    if accepted is None:
        return value
    return check_types(name, key, value, accepted)


def check_types(name: str, key: str, value: Any, accepted: tuple[type, ...]) -> Any:
    """``value`` if it is one of ``accepted`` (an int is taken for a float, a bool never for a number)."""
    if isinstance(value, bool) and bool not in accepted:
        pass  # a bool is never a valid number here
    elif isinstance(value, accepted):
        return value
    elif float in accepted and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wanted = " or ".join("None" if t is type(None) else t.__name__ for t in accepted)
    raise ValueError(f"norm {name!r}: option {key!r} must be {wanted}, got {value!r}")


def build_norm(spec: Any, num_features: int) -> nn.Module:
    """Build the normalization layer ``spec`` names for ``num_features`` channels (see :class:`normlayers.NormSpec`)."""
    from normlayers.spec import NormSpec  # spec.py builds on this module

    return NormSpec.parse(spec).build(num_features)
