"""normlayers.catalog against the layer classes: same variants, options, flags, and the constructors' verdicts."""

from __future__ import annotations

import importlib
import inspect
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import normlayers
from normlayers.catalog import BNP_LAYER_TYPES, VARIANTS
from normlayers.registry import _REGISTRY, _accepted_types, _options

REPO = Path(__file__).resolve().parents[2]
for _module in sorted((REPO / "normlayers").glob("*.py")):  # every module: a variant the catalog lacks shows
    importlib.import_module(f"normlayers.{_module.stem}")

FLAGS = ("batch_dependent", "includes_activation", "before_weight_layer", "needs_preceding_weight")
CHANNELS = (1, 6, 16, 48)
STRINGS = ("ln", "gn", "relu", "silu", "gelu", "per_step", "per_ghost", "nonsense")
PROBES = {
    int: (-1, 0, 1, 2, 3, 4, 5, 8, 16, 32, 64),
    float: (-1.0, 0.0, 1e-5, 0.05, 0.5, 0.99, 1.0, 1.5, 3.0, math.nan),
    bool: (True, False),
    str: STRINGS,
    type(None): (None,),
}


def test_the_catalog_lists_every_registered_variant():
    assert sorted(VARIANTS) == sorted(_REGISTRY)
    for name, variant in VARIANTS.items():
        assert _REGISTRY[name].__module__ == variant.module, name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_options_and_flags_are_the_classes(name):
    cls, variant = _REGISTRY[name], VARIANTS[name]
    signature = _options(cls)
    hints = typing.get_type_hints(cls.__init__)
    assert [option.name for option in variant.options] == list(signature)
    for option in variant.options:
        assert option.default == signature[option.name].default, (name, option.name)
        assert set(option.types) == set(_accepted_types(hints[option.name])), (name, option.name)
    for flag in FLAGS:
        assert getattr(variant, flag) == getattr(cls, flag), (name, flag)


def _constructor_verdict(cls, num_features: int, options: dict) -> str | None:
    try:
        try:
            with torch.device("meta"):
                cls(num_features, **options)
        except ValueError:
            raise
        except Exception:  # a constructor that computes with tensor values, which the meta device has not
            cls(num_features, **options)
    except ValueError as error:
        return str(error)
    return None


def _catalog_verdict(name: str, num_features: int, options: dict) -> str | None:
    spec = normlayers.NormSpec(name, tuple(options.items()))
    try:
        spec.check(num_features)
    except ValueError as error:
        return str(error)
    return None


def _cases(name: str):
    """Every option at every probe value of its types, the others at their defaults; groups with group_size."""
    variant = VARIANTS[name]
    yield {}
    for option in variant.options:
        for kind in option.types:
            for value in PROBES[kind]:
                yield {option.name: value}
    names = {option.name for option in variant.options}
    if {"groups", "group_size"} <= names:
        for groups in (None, 2, 3):
            for size in (None, 2, 3):
                yield {"groups": groups, "group_size": size}
    if name == "proxy":
        for groups in (None, 2, 3, 32):
            yield {"base": "gn", "groups": groups}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rules_give_the_constructors_verdict_and_words(name):
    cls = _REGISTRY[name]
    for num_features in CHANNELS:
        for options in _cases(name):
            expected = _constructor_verdict(cls, num_features, options)
            assert _catalog_verdict(name, num_features, options) == expected, (name, num_features, options)


def test_bnp_options_name_bnp_layer_types():
    from normlayers import bnp

    assert tuple(bnp.LAYER_TYPES) == BNP_LAYER_TYPES


def test_checking_a_spec_imports_no_torch():
    code = ("import sys, normlayers; spec = normlayers.NormSpec.parse('gn:groups=4'); spec.check(16); "
            "print(spec, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "gn:groups=4 False"
    assert inspect.getsource(normlayers.catalog).count("import torch") == 0
