"""The plan's shortcuts (one rule check per combination of the seed's co-values, grid values taken as their
override text) give every run the key, norm and batch the job's own ``load_config`` of its overrides gives."""

from __future__ import annotations

from cluster.sweep import load_sweep
from trainer.config import load_config, norm_spec_text, run_key


def _as_the_job_builds_it(sweep) -> list[tuple]:
    rebuilt = []
    for run in sweep.runs:
        cfg = load_config(sweep.base, run.overrides)
        rebuilt.append((run_key(cfg), norm_spec_text(cfg.model.norm), int(cfg.data.batch_size)))
    return rebuilt


def test_every_run_key_is_the_jobs(write_sweep):
    path = write_sweep("keys", {"model.norm": ["bn", "gn:groups=2", {"name": "gn", "groups": 4}, "frn"],
                                "optim.lr": [0.1, 1, "0.3"], "data.batch_size": [8, 16]},
                       {"kind": "local"}, seeds=[0, 1, 7])
    sweep = load_sweep(path)
    assert len(sweep.runs) == 4 * 3 * 2 * 3 and len({run.key for run in sweep.runs}) == len(sweep.runs)
    assert [(run.key, run.norm, run.batch_size) for run in sweep.runs] == _as_the_job_builds_it(sweep)


def test_a_value_that_follows_the_seed_is_resolved_per_run(write_sweep):
    # the interpolation makes each seed's config differ in more than the seed: no shared check
    path = write_sweep("follows", {"model.norm": ["bn", "ln"]}, {"kind": "local"},
                       overrides={"optim.warmup_steps": "${seed}"}, seeds=[0, 3])
    sweep = load_sweep(path)
    assert [(run.key, run.norm, run.batch_size) for run in sweep.runs] == _as_the_job_builds_it(sweep)
    assert sweep.runs[0].cfg.optim.warmup_steps == 0 and sweep.runs[1].cfg.optim.warmup_steps == 3


def test_no_rule_reads_the_keys_the_plan_checks_once_per_group():
    # the plan runs the rules once for all seeds of a combination: a rule reading the seed would be skipped
    import inspect

    from trainer import config

    rules = inspect.getsource(config.check_config) + inspect.getsource(config.check_binary_recipe)
    for key in config.UNCHECKED_KEYS:
        assert f".{key}" not in rules and f"[{key!r}]" not in rules and f'"{key}"' not in rules, key
