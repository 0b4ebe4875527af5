"""Confidence intervals and findings of the report, on runs logged with known errors to a real MLflow
store: each batch-regime point carries the 95% t interval the test works out from its values, a
resolved and an unresolved paired comparison each give their sentence; the report states the resolved one
and counts and tabulates the unresolved one; one seed says no interval."""

from __future__ import annotations

import math
import time

import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cluster.report import main
from cluster.report.stats import compare, t_half_width

# t(0.975, df) read from a printed Student-t table: independent of the module's own table.
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776}

# validation error per (norm, batch) by seed; at batch 2 bn is worse by 0.04 on every seed but for
# +-0.01, at batch 8 the per-seed differences change sign.
ERRORS = {
    ("bn", 2): [0.40, 0.43, 0.41, 0.44, 0.42],
    ("gn", 2): [0.36, 0.38, 0.38, 0.39, 0.39],
    ("bn", 8): [0.20, 0.25, 0.18],
    ("gn", 8): [0.21, 0.20, 0.20],
}


def expected_half_width(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return T_TABLE[n - 1] * sd / math.sqrt(n)


def log_run(client, experiment_id, norm, batch_size, seed, error) -> None:
    tags = {"run_key": f"{norm}-{batch_size}-{seed}", "norm": norm, "batch_size": str(batch_size),
            "normlab.status": "finished"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("val_acc", 1.0 - error, now, 10), Metric("diverged", 0.0, now, 10)],
                     params=[Param("model.norm", norm), Param("data.batch_size", str(batch_size)),
                             Param("optim.lr", "0.1"), Param("seed", str(seed))])
    client.set_terminated(run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('findings') / 'mlflow.db'}"
    client = MlflowClient(uri)
    seeds = client.create_experiment("seeds")
    for (norm, batch_size), errors in ERRORS.items():
        for seed, error in enumerate(errors):
            log_run(client, seeds, norm, batch_size, seed, error)
    single = client.create_experiment("single")
    for norm, error in (("bn", 0.4), ("gn", 0.3)):
        log_run(client, single, norm, 2, 0, error)
    return uri


def report(uri, experiment, out) -> str:
    assert main([experiment, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    return (out / "report.md").read_text()


def test_t_interval_of_known_values():
    for values in ([0.30, 0.32, 0.28, 0.31, 0.29], [1.0, 3.0], [0.5, 0.7, 0.2]):
        assert t_half_width(values) == pytest.approx(expected_half_width(values), rel=1e-9)
    assert t_half_width([0.3]) is None


def test_a_resolved_and_an_unresolved_comparison():
    def by_seed(key):
        return dict(enumerate(ERRORS[key]))

    resolved = compare("bn", by_seed(("bn", 2)), "gn", by_seed(("gn", 2)), 2)
    diffs = [a - b for a, b in zip(ERRORS[("bn", 2)], ERRORS[("gn", 2)], strict=True)]
    assert resolved.resolved and resolved.seeds == 5
    assert resolved.difference == pytest.approx(0.04) and resolved.half_width == pytest.approx(
        expected_half_width(diffs))
    assert resolved.sentence() == ("bn is worse than gn at per-device batch 2 by 4.0 ± 1.2 points "
                                   "(95% t interval, 5 seeds).")

    unresolved = compare("gn", by_seed(("gn", 8)), "bn", by_seed(("bn", 8)), 8)
    diffs = [a - b for a, b in zip(ERRORS[("bn", 8)], ERRORS[("gn", 8)], strict=True)]
    half = 100 * expected_half_width(diffs)
    assert not unresolved.resolved and (unresolved.worse, unresolved.better) == ("bn", "gn")
    assert unresolved.sentence() == (f"bn vs gn at per-device batch 8: the difference 0.7 ± {half:.1f} points "
                                     "(95% t interval, 3 seeds) is not resolved at 3 seeds.")


def test_only_shared_seeds_are_paired():
    c = compare("bn", {0: 0.5, 1: 0.6, 7: 0.9}, "gn", {0: 0.4, 1: 0.4, 3: 0.0}, 2)
    assert c.seeds == 2 and c.difference == pytest.approx(0.15)
    assert compare("bn", {0: 0.5}, "gn", {1: 0.4}, 2) is None


def test_identical_differences_on_every_seed_are_not_resolved():
    # one validation image of 360 on each of 3 seeds: the differences are equal, the t interval has no width
    image = 1 / 360
    c = compare("bgn", {0: 3 * image, 1: 4 * image, 2: 2 * image}, "bn", {0: 2 * image, 1: 3 * image, 2: image}, 16)
    assert c.half_width == pytest.approx(0.0, abs=1e-15) and c.difference > 0
    assert not c.resolved and "is not resolved at 3 seeds" in c.sentence()
    # as the store gives them back: accuracies logged in float32
    as_logged = {k: 1 - float(torch.tensor(1 - v, dtype=torch.float32)) for k, v in
                 {0: 3 * image, 1: 4 * image, 2: 2 * image}.items()}
    baseline = {k: 1 - float(torch.tensor(1 - v, dtype=torch.float32)) for k, v in
                {0: 2 * image, 1: 3 * image, 2: image}.items()}
    logged = compare("bgn", as_logged, "bn", baseline, 16)
    assert 0 < logged.half_width < 1e-6 and not logged.resolved
    # the same difference with a spread across seeds, all well above zero, is resolved
    spread = compare("bgn", {0: 0.30, 1: 0.32, 2: 0.31}, "bn", {0: 0.10, 1: 0.11, 2: 0.10}, 16)
    assert spread.half_width > 0 and spread.resolved


def test_the_report_opens_with_findings_and_intervals(store, tmp_path):
    markdown = report(store, "seeds", tmp_path)
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Findings"
    findings = markdown.split("## Findings", 1)[1].split("\n## ", 1)[0]
    assert "- bn is worse than gn at per-device batch 2 by 4.0 ± 1.2 points (95% t interval, 5 seeds)." in findings
    assert "- 1 other difference(s) between norms are not resolved at their number of seeds" in findings
    assert "bn vs gn at per-device batch 8" not in findings
    unresolved = markdown.split("**Differences between norms not resolved at their number of seeds**", 1)[1]
    rows = [line for line in unresolved.split("\n\n", 2)[1].splitlines()[2:]]
    diffs = [a - b for a, b in zip(ERRORS[("bn", 8)], ERRORS[("gn", 8)], strict=True)]
    assert rows == [f"| 8 | bn | gn | {sum(diffs) / 3:.4f} | {expected_half_width(diffs):.4f} | 3 |"]
    header = next(line for line in markdown.splitlines() if line.startswith("| norm | batch | lr | seeds"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    column = columns.index("95% t interval ±")
    checked = 0
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(columns) and cells[0] in ("bn", "gn") and cells[1] in ("2", "8"):
            errors = ERRORS[(cells[0], int(cells[1]))]
            assert float(cells[column]) == pytest.approx(expected_half_width(errors), abs=5e-5)
            checked += 1
    assert checked == len(ERRORS)
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Findings</h2>") < html.index("<h2>Batch-size regimes</h2>")


def test_one_seed_says_no_interval_can_be_given(store, tmp_path):
    markdown = report(store, "single", tmp_path)
    findings = markdown.split("## Findings", 1)[1].split("\n## ", 1)[0]
    assert "no confidence interval can be given" in findings
    assert "worse than" not in findings
