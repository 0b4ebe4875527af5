"""The experiment schema and `normlab train`'s config errors: one line, exit code 2, nothing built."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import trainer.config
from trainer import ConfigError, load_config, run_key
from trainer.cli import main
from trainer.config import ExperimentConfig, checked, flatten, help_text, resolved

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "configs" / "experiments"


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert not Path("runs").exists() and not Path("mlflow.db").exists()  # nothing half-done
    return lines[0]


def test_unknown_key(capsys):
    line = _error(capsys, ["model.depht=20"])
    assert "model.depht: unknown key" in line and "depth" in line


def test_unknown_top_level_key_in_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  depth: 20\n")
    line = _error(capsys, [str(bad)])
    assert "modle: unknown key" in line and "bad.yaml" in line


def test_wrong_type(capsys):
    line = _error(capsys, ["data.batch_size=big"])
    assert line.startswith("normlab train: data.batch_size:") and "'big'" in line and "int" in line


def test_bad_norm_spec(capsys):
    assert "unknown normalization 'bnx'" in _error(capsys, ["model.norm=bnx"])
    assert "model.norm:" in _error(capsys, ["model.norm=gn:grups=4"])
    assert "does not divide" in _error(capsys, ["model.norm=gn:groups=5"])


def test_missing_data_path(capsys, tmp_path):
    line = _error(capsys, [str(EXPERIMENTS / "cifar10_resnet20.yaml")])
    assert "data.path" in line and "cifar" in line
    line = _error(capsys, [str(EXPERIMENTS / "cifar10_resnet20.yaml"), f"data.path={tmp_path / 'nowhere'}"])
    assert "data.path" in line and "does not exist" in line
    line = _error(capsys, ["data.name=cifar100", f"data.path={tmp_path}"])
    assert "data.path" in line and "train" in line  # the files it looked for


def test_invalid_choice_and_missing_experiment(capsys):
    assert "model.norm_placement: 'middle' is not one of all, final, none" in _error(
        capsys, ["model.norm_placement=middle"])
    assert "model.depth: cifar_resnet needs depth 6n+2" in _error(capsys, ["model.depth=21"])
    assert "experiment file not found" in _error(capsys, ["nope.yaml"])


def test_batch_larger_than_a_shard_is_a_config_error(capsys):
    assert "data.batch_size: 5000 is more than" in _error(capsys, ["data.batch_size=5000"])


def test_batch_too_small_for_bn_is_caught_before_training(capsys):
    # an MLP's bn sees (N, C): one value per statistic at batch 1
    line = _error(capsys, ["model.arch=mlp", "model.depth=2", "data.batch_size=1"])
    assert "model.norm" in line and "larger batch" in line


def test_help_lists_every_key_with_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    keys = flatten(OmegaConf.structured(ExperimentConfig))
    for key, value in keys.items():
        if not isinstance(value, dict):
            assert f"  {key}=" in out, key
    assert "model.norm=bn" in out and "data.batch_size=64" in out and "tracking.uri=sqlite:///mlflow.db" in out
    assert help_text() in out


def test_default_yaml_is_the_embedded_default():
    assert load_config(str(EXPERIMENTS / "digits_resnet20.yaml")) == load_config(None)


def test_overrides_and_mapping_norm_spec(tmp_path):
    cfg = load_config(None, ["model.norm=gn:groups=8", "data.batch_size=4", "optim.lr=0.05"])
    assert cfg.model.norm == "gn:groups=8" and cfg.data.batch_size == 4 and cfg.optim.lr == 0.05
    yaml = tmp_path / "e.yaml"
    yaml.write_text("model:\n  norm: {name: gn, groups: 8}\n")
    cfg2 = load_config(str(yaml))
    assert flatten(cfg2)["model.norm"] == "gn:groups=8"
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(None, ["model.norm={name: gn, groups: 3}"])


def test_run_key_is_stable_and_ignores_tracking_and_output():
    a = load_config(None, ["model.norm=gn:groups=8"])
    assert run_key(a) == run_key(load_config(None, ["model.norm=gn:groups=8"]))
    assert len(run_key(a)) == 12 and int(run_key(a), 16) >= 0
    b = load_config(None, ["model.norm=gn:groups=8", "tracking.experiment=other", "output.root=/elsewhere"])
    assert run_key(a) == run_key(b)
    assert run_key(a) != run_key(load_config(None, ["model.norm=gn:groups=4"]))
    assert run_key(a) != run_key(load_config(None, ["model.norm=gn:groups=8", "seed=1"]))


def test_cifar_config_loads_with_a_data_path(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(pickle.dumps({b"data": b"", b"labels": []}))
    cfg = load_config(str(EXPERIMENTS / "cifar10_resnet20.yaml"), [f"data.path={tmp_path}"])
    assert cfg.data.name == "cifar10" and cfg.data.val_split == 0.0 and cfg.optim.schedule == "step"


def test_unreachable_tracking_server_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    line = _error(capsys, ["model.depth=8", "trainer.max_steps=1", "tracking.uri=http://127.0.0.1:9"])
    assert line.startswith("normlab train: tracking.uri: no MLflow server answers at http://127.0.0.1:9")


def test_a_validated_config_is_not_checked_again_until_it_changes(monkeypatch):
    cfg = load_config(None, ["model.depth=8"])
    expected_key = run_key(cfg)
    calls = []
    real = trainer.config.check_config
    monkeypatch.setattr(trainer.config, "check_config", lambda c: (calls.append(c), real(c))[1])
    assert checked(cfg) is cfg and calls == []  # what train() does first
    cfg.optim.lr = -1.0  # a config stays mutable: the mark holds only for the values that were checked
    with pytest.raises(ConfigError, match="optim.lr: must be positive"):
        checked(cfg)
    assert len(calls) == 1
    plain = checked({"model": {"depth": 8}})  # a mapping (a checkpoint's, a sweep's) is checked
    assert len(calls) == 2 and run_key(plain) == expected_key
    assert checked(plain) is plain and len(calls) == 2
    copy = OmegaConf.merge(plain, {"model": {"depth": 9}})  # a merge is a new, unmarked config
    with pytest.raises(ConfigError, match="model.depth"):
        checked(copy)


def test_enum_fields_keep_the_text_a_config_was_written_with(capsys):
    cfg = load_config(None, ["trainer.precision=32", "model.arch=cifar_preact_resnet"])
    assert cfg.model.arch == "cifar_preact_resnet" and f"{cfg.trainer.precision}" == "32"  # YAML's int 32, as text
    plain = resolved(cfg)
    assert type(plain["model"]["arch"]) is str and plain["trainer"]["precision"] == "32"
    assert "arch: cifar_preact_resnet" in OmegaConf.to_yaml(cfg)
    line = _error(capsys, ["eval.norm_stats=[running,fast]"])
    assert "eval.norm_stats[1]: 'fast' is not one of running, precise, batch" in line
    line = _error(capsys, ["trainer.precision=${oc.env:NORMLAB_NO_SUCH_VAR,half}"])
    assert "trainer.precision: 'half' is not one of 32-true, 32" in line
