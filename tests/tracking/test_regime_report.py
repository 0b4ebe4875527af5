"""`normlab report` on runs logged with known values to a real MLflow server: the figures' data and
the markdown tables equal those values; missing dimensions are said, bad input exits 2."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from cluster.report import build_panels, main, read_runs

# Worked out by hand from KNOWN_ACC in conftest.py (error = 1 - val_acc, seeds 0 and 1).
# Per (norm, batch): the lr with the lowest mean error among lrs where no seed diverged.
EXPECTED_REGIMES = {
    "bn": [(2, 0.1, 0.38, 0.0282843), (8, 0.4, 0.13, 0.0141421), (32, 0.1, 0.10, 0.0)],
    "gn:groups=2": [(2, 0.1, 0.19, 0.0141421), (8, 0.4, 0.15, 0.0141421), (32, 0.1, 0.17, 0.0141421)],
}
# (norm, batch, lr) -> (runs, diverged, mean val_acc of the seeds that did not diverge)
EXPECTED_CELLS = {
    ("bn", 2, 0.1): (2, 0, 0.62), ("bn", 2, 0.4): (2, 1, 0.70),
    ("bn", 8, 0.1): (2, 0, 0.82), ("bn", 8, 0.4): (2, 0, 0.87),
    ("bn", 32, 0.1): (2, 0, 0.90), ("bn", 32, 0.4): (2, 0, 0.86),
    ("gn:groups=2", 2, 0.1): (2, 0, 0.81), ("gn:groups=2", 2, 0.4): (2, 0, 0.77),
    ("gn:groups=2", 8, 0.1): (2, 0, 0.82), ("gn:groups=2", 8, 0.4): (2, 0, 0.85),
    ("gn:groups=2", 32, 0.1): (2, 0, 0.83), ("gn:groups=2", 32, 0.4): (2, 2, None),
}
EXPECTED_LARGEST_STABLE = {
    ("bn", 2): 0.1, ("bn", 8): 0.4, ("bn", 32): 0.4,
    ("gn:groups=2", 2): 0.4, ("gn:groups=2", 8): 0.4, ("gn:groups=2", 32): 0.1,
}
# Probe runs sit at batch 8, lr 0.1; mean over the two seeds per layer.
EXPECTED_DEPTH = {
    "bn": {"act_std": [1.1, 1.0, 0.9], "grad_norm": [0.6, 0.3, 0.15]},
    "gn:groups=2": {"act_std": [2.1, 2.1, 2.1], "grad_norm": [2.0, 2.0, 2.0]},
}


def markdown_table(markdown: str, title: str) -> list[dict[str, str]]:
    """The rows of the table captioned **title** as dicts keyed by the header."""
    lines = markdown.splitlines()
    start = lines.index(f"**{title}**") + 2
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def close(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=tol))


def test_figure_data_equals_the_logged_values(mlflow_server, known_experiment, tmp_path):
    records, notes = read_runs(MlflowClient(mlflow_server.url), known_experiment["id"])
    assert len(records) == 24
    assert any("1 run(s) not finished" in note for note in notes)
    panels, run_notes = build_panels(records, tmp_path)
    by_key = {p.key: p for p in panels}
    assert run_notes == [] and [by_key[key].notes for key in ("batch", "lr", "depth")] == [[], [], []]
    assert [p.title for p in panels if p.shown][:2] == ["Batch-size regimes", "Learning-rate stability"]
    plotted = {key: p.plotted for key, p in by_key.items()}

    for norm, points in EXPECTED_REGIMES.items():
        x, y, std = plotted["batch"][norm]
        assert x == [p[0] for p in points]
        assert all(close(a, p[2]) for a, p in zip(y, points, strict=True)), (norm, y)
        assert all(close(a, p[3]) for a, p in zip(std, points, strict=True)), (norm, std)

    for batch_size, drawn in plotted["lr"].items():
        for row, norm in zip(drawn["acc"], ["bn", "gn:groups=2"], strict=True):
            for acc, lr in zip(row, [0.1, 0.4], strict=True):
                assert close(acc, EXPECTED_CELLS[(norm, batch_size, lr)][2]), (norm, batch_size, lr, acc)
        expected_marked = sorted((n, lr) for (n, b, lr), cell in EXPECTED_CELLS.items() if b == batch_size and cell[1])
        assert sorted(drawn["marked"]) == expected_marked
        for norm, lr in drawn["largest_stable_lr"].items():
            assert lr == EXPECTED_LARGEST_STABLE[(norm, batch_size)]

    for norm, stats in EXPECTED_DEPTH.items():
        for stat, values in stats.items():
            x, y = plotted["depth"][norm][stat]
            assert x == [0, 1, 2]
            assert all(close(a, b) for a, b in zip(y, values, strict=True)), (norm, stat, y)
            # the step-0 values, read from the server in bulk (GetMetricHistoryBulkInterval)
            assert plotted["depth"][norm][f"{stat}_init"] == ([0, 1, 2], [99.0, 99.0, 99.0])
    for name in ("batch_regimes.png", "lr_stability.png", "depth_stats.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_tables_equal_the_logged_values(known_experiment, known_report):
    assert known_report["code"] == 0, known_report["stdout"]
    markdown = (known_report["out"] / "report.md").read_text()

    rows = markdown_table(markdown, "Validation error by per-device batch size")
    got = {(r["norm"], int(r["batch"])): r for r in rows}
    assert len(got) == 6
    for norm, points in EXPECTED_REGIMES.items():
        for batch_size, lr, mean, std in points:
            row = got[(norm, batch_size)]
            assert float(row["lr"]) == lr and row["seeds"] == "2"
            assert close(float(row["val error mean"]), mean, 5e-5) and close(float(row["val error std"]), std, 5e-5)

    rows = markdown_table(markdown, "Final accuracy by learning rate")
    assert len(rows) == len(EXPECTED_CELLS)
    for row in rows:
        runs, diverged, acc = EXPECTED_CELLS[(row["norm"], int(row["batch"]), float(row["lr"]))]
        assert (int(row["runs"]), int(row["diverged"])) == (runs, diverged)
        assert row["val acc mean"] == "–" if acc is None else close(float(row["val acc mean"]), acc, 5e-5)

    rows = markdown_table(markdown, "Largest stable learning rate")
    assert {(r["norm"], int(r["batch"])): float(r["largest stable lr"]) for r in rows} == EXPECTED_LARGEST_STABLE

    rows = markdown_table(markdown, "Per-layer statistics, mean over seeds")
    for row in rows:
        expected = EXPECTED_DEPTH[row["norm"]]
        layer = int(row["layer"])
        assert row["module"] == known_experiment["layer_paths"][layer]
        assert close(float(row["act std"]), expected["act_std"][layer], 5e-5)
        assert close(float(row["grad norm"]), expected["grad_norm"][layer], 5e-5)
    assert len(rows) == 6
    assert "1 run(s) not finished (running, failed or killed): left out" in markdown


def test_html_is_self_contained_and_the_report_run_is_logged(mlflow_server, known_experiment, known_report):
    out = known_report["out"]
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page.replace(mlflow_server.url, "") and "https://" not in page
    assert "<caption>Largest stable learning rate</caption>" in page

    client = MlflowClient(mlflow_server.url)
    reports = client.search_runs([known_experiment["id"]], "tags.`normlab.kind` = 'report'")
    assert len(reports) == 1
    report_run = reports[0]
    assert "run_key" not in report_run.data.tags and report_run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert logged == {"report/batch_regimes.png", "report/lr_stability.png", "report/depth_stats.png",
                      "report/report.md", "report/report.html"}
    # The report run is not a training run: reading the experiment again finds the same 24.
    records, _ = read_runs(client, known_experiment["id"])
    assert len(records) == 24 and report_run.info.run_id not in {r.run_id for r in records}


def test_report_says_what_the_runs_do_not_allow(mlflow_server, log_known_run, tmp_path, capsys):
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("one-seed-one-lr")
    for norm, acc in (("bn", 0.7), ("ln", 0.6)):
        for batch_size in (4, 16):
            log_known_run(client, experiment_id, norm, batch_size, 0.1, 0, acc + batch_size / 100)

    code = main(["one-seed-one-lr", "--tracking-uri", mlflow_server.url, "--out", str(tmp_path / "r"), "--no-log"])
    assert code == 0
    stdout = capsys.readouterr().out
    for said in ("one seed per setting: no spread", "one learning rate (0.1): no learning-rate stability panel",
                 "no depth panel"):
        assert said in stdout
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["batch_regimes.png", "report.html", "report.md"]
    rows = markdown_table((tmp_path / "r" / "report.md").read_text(), "Validation error by per-device batch size")
    assert {(r["norm"], r["batch"], r["val error mean"], r["val error std"]) for r in rows} == {
        ("bn", "4", "0.2600", "–"), ("bn", "16", "0.1400", "–"),
        ("ln", "4", "0.3600", "–"), ("ln", "16", "0.2400", "–"),
    }
    assert client.search_runs([experiment_id], "tags.`normlab.kind` = 'report'") == []  # --no-log


def test_synchronised_and_placed_norms_get_their_own_lines(mlflow_server, log_known_run, tmp_path):
    """syncbn is bn with trainer.sync_norm=true, `final` a placement, 0.1 an initial scale: none merges into bn."""
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("sync-and-placement")
    variants = {"bn": ({}, 0.9), "bn (sync)": ({"trainer.sync_norm": "True"}, 0.8),
                "bn (placement=final)": ({"model.norm_placement": "final"}, 0.7),
                "bn (init scale=0.1)": ({"model.norm_init_scale": "0.1"}, 0.6)}
    for label, (params, acc) in variants.items():
        log_known_run(client, experiment_id, "bn", 8, 0.1, 0, acc, key=label.replace(" ", "_"), extra_params=params)
    assert main(["sync-and-placement", "--tracking-uri", mlflow_server.url, "--out", str(tmp_path), "--no-log"]) == 0
    rows = markdown_table((tmp_path / "report.md").read_text(), "Validation error by per-device batch size")
    assert {(r["norm"], r["val error mean"]) for r in rows} == {
        (label, f"{1 - acc:.4f}") for label, (_, acc) in variants.items()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-experiment", "--tracking-uri", None], "no MLflow experiment named 'no-such-experiment'"),
        (["sweeps/missing.yaml"], "no such sweep file: sweeps/missing.yaml"),
        (["some-experiment"], "no MLflow database at mlflow.db"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mlflow_server, tmp_path, capsys, argv, message):
    argv = [mlflow_server.url if a is None else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_a_sweep_file_reports_its_own_runs(mlflow_server, log_known_run, tmp_path, capsys):
    from cluster.sweep import load_sweep

    sweep_file = tmp_path / "regimes.yaml"
    sweep_file.write_text(
        "name: sweep-report\n"
        f"overrides: {{tracking.uri: '{mlflow_server.url}', data.name: synthetic, model.arch: plain_cnn,"
        " model.depth: 2, model.width: 8}\n"
        "grid: {model.norm: [bn, gn:groups=2], data.batch_size: [2, 8], optim.lr: [0.1, 0.4]}\n"
        "seeds: [0, 1]\n"
        "executor: {kind: local}\n")
    sweep = load_sweep(sweep_file)
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(sweep.experiment)
    last = sweep.runs[-1]
    for run in sweep.runs[:-1]:  # the last run has not finished: the report says so
        lr, seed = run.values["optim.lr"], run.values["seed"]
        acc = 0.6 + run.batch_size / 100 + lr / 10 + seed / 50  # bn, batch 2, lr 0.1: 0.63 and 0.65
        log_known_run(client, experiment_id, run.norm, run.batch_size, lr, seed, acc, key=run.key)
    # A run of an older grid in the same experiment is not part of this sweep's report.
    log_known_run(client, experiment_id, "bn", 2, 0.1, 0, 0.01, key="0123456789ab")

    assert main([str(sweep_file), "--out", str(tmp_path / "r"), "--no-log"]) == 0
    assert "1 of the sweep's 16 runs have no finished MLflow run yet" in capsys.readouterr().out
    rows = markdown_table((tmp_path / "r" / "report.md").read_text(), "Final accuracy by learning rate")
    got = {(r["norm"], int(r["batch"]), float(r["lr"])): (int(r["runs"]), r["val acc mean"]) for r in rows}
    missing = (last.norm, last.batch_size, last.values["optim.lr"])
    assert len(got) == 8 and got[missing][0] == 1
    assert got[("bn", 2, 0.1)] == (2, "0.6400")  # the older grid's 0.01 is not averaged in


def test_an_invalid_sweep_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\ngrid: {model.norm: [no-such-norm]}\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "no-such-norm" in err and len(err.strip().splitlines()) == 1, err


def test_a_run_that_ends_at_chance_is_not_stable(mlflow_server, log_known_run, tmp_path):
    """At a large lr SGD can collapse to one class without the loss exploding: for the stability panel such a
    run failed like a diverged one (its classes are known from the trainer's derived.num_classes)."""
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("collapse-at-chance")
    for lr, acc in ((0.1, 0.95), (0.3, 0.9), (1.0, 0.11)):
        log_known_run(client, experiment_id, "none", 8, lr, 0, acc, extra_params={"derived.num_classes": "10"})
    assert main(["collapse-at-chance", "--tracking-uri", mlflow_server.url, "--out", str(tmp_path), "--no-log"]) == 0
    rows = markdown_table((tmp_path / "report.md").read_text(), "Largest stable learning rate")
    assert [(r["norm"], r["largest stable lr"]) for r in rows] == [("none", "0.3")]
