"""The config holds the norm spec as its canonical text: one run key and one MLflow value per spec."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, flatten, load_config, run_key, validated


def test_mapping_and_text_specs_are_one_config_and_one_run_key():
    as_text = load_config(None, ["model.norm=gn:eps=1e-5,groups=4"])
    as_mapping = validated({"model": {"norm": {"name": "gn", "groups": 4, "eps": 1e-5}}})
    assert as_text.model.norm == as_mapping.model.norm == "gn:groups=4,eps=1e-05"
    assert run_key(as_text) == run_key(as_mapping)
    assert flatten(as_mapping)["model.norm"] == "gn:groups=4,eps=1e-05"


def test_a_canonical_config_validates_to_itself():
    cfg = load_config(None, ["model.norm=ghost:virtual_batch=4"])
    assert run_key(validated(cfg)) == run_key(cfg) and validated(cfg).model.norm == "ghost:virtual_batch=4"


def test_width_rules_are_checked_before_anything_is_built():
    with pytest.raises(ConfigError, match=r"^model.norm: gn: groups=3 does not divide num_features=16"):
        load_config(None, ["model.norm=gn:groups=3"])
