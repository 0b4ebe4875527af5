"""The sweep file's schema (cluster/sweep_schema.py): OmegaConf's refusals as one line in the sweep's
words, and values passed on as the YAML gave them."""

from __future__ import annotations

import pytest
import yaml

from cluster import sweep_cli
from cluster.sweep import load_sweep


def _write(tmp_path, body: dict):
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.mark.parametrize("body, message", [
    ({"grid": {"model.norm": ["bn"]}, "bogus": 1, "other": 2},
     "unknown top-level key(s) bogus, other; valid: name, experiment, base, overrides, grid, zip, seeds, executor"),
    ({"grid": ["bn"]}, "`grid` must map dotted keys to lists of values"),
    ({"grid": {"model.norm": "bn"}}, "grid.model.norm must be a list of values, got 'bn'"),
    ({"grid": {"model.norm": ["bn"]}, "overrides": ["trainer.max_epochs=1"]}, "`overrides` must map dotted keys"),
    ({"grid": {"model.norm": ["bn"]}, "seeds": [0, True]}, "`seeds` must be a list of integers, got [0, True]"),
    ({"grid": {"model.norm": ["bn"]}, "executor": ["local"]}, "`executor` must be a mapping of settings, got list"),
    ({"grid": {"model.norm": ["bn"]}, "executor": {"sbatch": ["hold"]}}, "executor.sbatch must be a mapping"),
    ({"grid": {"model.norm": ["bn"]}, "executor": {"setup": [{"module": "load"}]}},
     "executor.setup must be a list of shell lines"),
    ({"grid": {"model.norm": ["bn"]}, "executor": {"nodes": True}}, "executor.nodes=True; it must be a positive"),
    ({"grid": {"model.norm": ["bn"]}, "executor": {"mem_gb": "lots"}}, "executor.mem_gb='lots'; it must be a positive"),
    ({"grid": {"model.norm": ["bn"]}, "executor": {"max_requeues": -1}}, "executor.max_requeues=-1; it must be an "
                                                                          "integer >= 0"),
])
def test_schema_refusals_are_one_line_and_exit_2(tmp_path, capsys, body, message):
    path = _write(tmp_path, {"name": "schema", **body})
    assert sweep_cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_values_pass_as_the_yaml_gave_them(tmp_path):
    path = _write(tmp_path, {
        "name": "schema", "overrides": {"model.depth": 8, "trainer.max_epochs": 1, "data.path": "${oc.env:HOME}"},
        "grid": {"model.norm": ["bn", {"name": "gn", "groups": 2}]},
        "executor": {"kind": "local", "mem_gb": 16, "sbatch": {"hold": True}},
    })
    sweep = load_sweep(path)
    assert sweep.executor.mem_gb == 16 and type(sweep.executor.mem_gb) is int  # submitit is given 16GB, not 16.0GB
    assert sweep.executor.kind == "local" and sweep.executor.sbatch == {"hold": True}
    # interpolations are the experiment's: passed on as written, resolved in each run's config
    assert all("data.path=${oc.env:HOME}" in run.overrides for run in sweep.runs)
    assert [run.values["model.norm"] for run in sweep.runs] == ["bn", {"name": "gn", "groups": 2}]
    assert sweep.runs[1].norm == "gn:groups=2"
