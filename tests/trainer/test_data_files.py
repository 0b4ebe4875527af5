"""Each data module owns its file rules (``check_files``); config validation runs the same classmethod
without importing the modules, hence without Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from trainer.config import ConfigError, load_config
from trainer.data import (
    DATA_FILES,
    CifarDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    build_datamodule,
)


def test_config_validation_calls_the_data_modules_own_classmethod():
    modules = {"digits": DigitsDataModule, "cifar10": CifarDataModule, "cifar100": CifarDataModule,
               "imagefolder": ImageFolderDataModule, "synthetic": SyntheticDataModule}
    assert set(DATA_FILES) == set(modules)
    for name, module in modules.items():
        assert issubclass(module, DATA_FILES[name])  # the rule is the module's, inherited from its light base
        assert module.check_files.__func__ is DATA_FILES[name].check_files.__func__
    assert type(build_datamodule(load_config(None, ["data.name=synthetic"]))) is SyntheticDataModule


def test_the_module_refuses_what_validation_refuses(tmp_path):
    cfg = load_config(None, [])
    OmegaConf.update(cfg, "data.name", "cifar10")  # past validation, as a caller may do
    cfg.data.path = str(tmp_path)
    with pytest.raises(ConfigError, match="data.path: .* has no data_batch_1") as by_module:
        CifarDataModule.check_files(cfg.data)
    with pytest.raises(ConfigError) as by_validation:
        load_config(None, ["data.name=cifar10", f"data.path={tmp_path}"])
    assert str(by_module.value) == str(by_validation.value)


def test_validating_a_config_does_not_import_lightning():
    code = ("import sys\nfrom trainer.config import ConfigError, load_config\n"
            "for overrides in (['data.name=imagefolder', 'data.path=/nowhere'], ['data.name=cifar100'], []):\n"
            "    try:\n        load_config(None, overrides)\n    except ConfigError:\n        pass\n"
            "print(sorted(m for m in sys.modules if 'lightning' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
