"""The studies' report panels on runs logged with known values to a real MLflow store: the depth panel's
initial and final lines, the gradient concentration at initialisation and the Fisher-predicted learning
rate next to the largest stable one equal the logged values; without those metrics the report says so."""

from __future__ import annotations

import time

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cluster.report import RunRecord, build_panels, depth_setting, main, read_runs

LRS = (0.1, 0.4, 1.6)
DIVERGED = {("bn", 1.6, 1), ("none", 0.4, 0), ("none", 1.6, 0), ("none", 1.6, 1)}  # (norm, lr, seed)
LAMBDA = {("bn", 0): 4.0, ("bn", 1): 6.0, ("none", 0): 20.0, ("none", 1): 30.0}  # fisher/lambda_max at step 0
CONCENTRATION = {("bn", 0): 0.12, ("bn", 1): 0.14, ("none", 0): 0.45, ("none", 1): 0.47}
PATHS = ["features.1", "features.4", "fc"]
# per-layer probes of the runs at lr 0.1 (the depth panel's setting): (at init, at the end) per seed
PROBES = {
    ("bn", 0): {"act_std": ([1.0, 1.0, 0.8], [1.4, 1.2, 1.0]), "grad_norm": ([0.3, 0.2, 0.1], [0.1, 0.1, 0.1])},
    ("bn", 1): {"act_std": ([1.2, 1.0, 1.0], [1.6, 1.4, 1.2]), "grad_norm": ([0.5, 0.4, 0.3], [0.3, 0.3, 0.3])},
    ("none", 0): {"act_std": ([1.0, 4.0, 16.0], [2.0, 2.0, 2.0]), "grad_norm": ([8.0, 2.0, 0.5], [1.0, 1.0, 1.0])},
    ("none", 1): {"act_std": ([1.0, 6.0, 36.0], [4.0, 4.0, 4.0]), "grad_norm": ([6.0, 3.0, 1.5], [3.0, 3.0, 3.0])},
}


def log_run(client, experiment_id, norm, lr, seed, *, studies=True) -> None:
    diverged = (norm, lr, seed) in DIVERGED
    tags = {"run_key": f"{norm}-{lr}-{seed}", "norm": norm, "batch_size": "8",
            "normlab.status": "diverged" if diverged else "finished"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("diverged", float(diverged), now, 10)]
    if not diverged:
        metrics.append(Metric("val_acc", 0.9 - lr / 10 - seed / 100, now, 10))
    if studies:
        lam = LAMBDA[(norm, seed)]
        # step 0 is the initialisation; later values must not be read as initial ones
        for key, value in (("fisher/lambda_max", lam), ("fisher/lr_max", 2 / lam),
                           ("fisher/lr_max_momentum", 3.8 / lam),
                           ("probe/grad_concentration", CONCENTRATION[(norm, seed)])):
            metrics += [Metric(key, value, now, 0), Metric(key, 0.99, now, 10)]
    if studies and lr == 0.1:
        for stat, (initial, final) in PROBES[(norm, seed)].items():
            for index, path in enumerate(PATHS):
                key = f"probe/{stat}/{index:03d}_{path}"
                metrics += [Metric(key, initial[index], now, 0), Metric(key, final[index], now, 10)]
    params = [Param("model.norm", norm), Param("data.batch_size", "8"), Param("optim.lr", str(lr)),
              Param("seed", str(seed))]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_terminated(run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('studies') / 'mlflow.db'}"
    client = MlflowClient(uri)
    ids = {name: client.create_experiment(name) for name in ("studies", "plain")}
    for norm in ("bn", "none"):
        for lr in LRS:
            for seed in (0, 1):
                log_run(client, ids["studies"], norm, lr, seed)
                log_run(client, ids["plain"], norm, lr, seed, studies=False)
    return uri, client, ids


def mean(values):
    return sum(values) / len(values)


def test_panels_show_the_logged_initial_and_final_values(store, tmp_path):
    uri, client, ids = store
    records, _ = read_runs(client, ids["studies"])
    assert len(records) == 12
    panels = {p.key: p for p in build_panels(records, tmp_path)[0]}
    depth = panels["depth"].plotted
    for norm in ("bn", "none"):
        for stat in ("act_std", "grad_norm"):
            for which, key in ((0, f"{stat}_init"), (1, stat)):
                x, y = depth[norm][key]
                expected = [mean([PROBES[(norm, s)][stat][which][i] for s in (0, 1)]) for i in range(3)]
                assert x == [0, 1, 2] and y == pytest.approx(expected), (norm, key)

    assert panels["concentration"].plotted == pytest.approx({"bn": 0.13, "none": 0.46})
    fisher = panels["fisher"].plotted
    assert set(fisher) == {("bn", 8), ("none", 8)}
    for norm, largest in (("bn", 0.4), ("none", 0.1)):
        point = fisher[(norm, 8)]
        lams = [LAMBDA[(norm, s)] for s in (0, 1)]
        assert point["lr_max"] == pytest.approx(mean([2 / v for v in lams]))
        assert point["lr_max_momentum"] == pytest.approx(mean([3.8 / v for v in lams]))
        assert point["largest_stable_lr"] == largest
    studies = [panels["concentration"], panels["fisher"]]
    assert [p.notes for p in studies] == [[], []] and [p.title for p in studies] == [
        "Output-gradient concentration at initialisation", "Fisher-predicted maximal learning rate"]
    for name in ("grad_concentration.png", "fisher_lr.png", "depth_stats.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_puts_the_fisher_panel_beside_stability(store, tmp_path, capsys):
    uri, _, _ = store
    assert main(["studies", "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    stability = headings.index("Learning-rate stability")
    assert headings[stability + 1] == "Fisher-predicted maximal learning rate"
    assert "Output-gradient concentration at initialisation" in headings
    assert "| bn | 8 | 6 | 5.0000 | 0.4167 | 0.7917 | 0.4 |" in markdown
    assert "| none | 8 | 6 | 25.0000 | 0.0833 | 0.1583 | 0.1 |" in markdown
    assert "| none | 6 | 0.4600 | 0.4500 | 0.4700 |" in markdown


def test_without_the_study_probes_the_report_says_what_is_missing(store, tmp_path, capsys):
    uri, _, _ = store
    assert main(["plain", "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    stdout = capsys.readouterr().out
    assert "no output-gradient concentration panel" in stdout and "no Fisher learning-rate panel" in stdout
    assert "no depth panel" in stdout
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "batch_regimes.png", "lr_stability.png", "report.html", "report.md"]


def test_the_depth_panel_compares_norms_where_they_trained():
    def record(norm, lr, acc, diverged=False):
        return RunRecord(run_id=f"{norm}{lr}", norm=norm, batch_size=8, lr=lr, seed=0, val_acc=acc,
                         outcome="diverged" if diverged else "finished", act_std={0: 1.0})

    # every lr has probes of both norms: the lr where they trained best, not the smallest (barely moved)
    records = [record(n, lr, acc) for n in ("bn", "none") for lr, acc in ((1e-4, 0.2), (0.01, 0.95), (1.0, 0.1))]
    assert depth_setting(records) == (8, 0.01)
    # a setting where a norm diverged has fewer norms to compare: never chosen over a complete one
    records += [record("bn", 0.03, 0.99), record("none", 0.03, None, diverged=True)]
    assert depth_setting(records) == (8, 0.01)
