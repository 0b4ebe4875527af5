"""A real browser on the MLflow UI: headless Debian Chromium, driven by Playwright, opens the test
server's UI and finds the experiment, a run with its metric, and the regime report's figure."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium; .ci/run installs it)"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
UI_TIMEOUT_MS = 90_000  # the UI is a large single-page app; a loaded 2-core CI machine is slow to start it


def test_the_mlflow_ui_shows_the_experiment_a_run_metric_and_the_report_figure(mlflow_server, known_experiment,
                                                                               known_report, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert known_report["code"] == 0
    experiment_id, name = known_experiment["id"], known_experiment["name"]
    run_id = known_experiment["run_ids"][("bn", 8, 0.4, 0)]  # final val_acc 0.86
    run_name = MlflowClient(mlflow_server.url).get_run(run_id).info.run_name
    shots = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)

            # The experiment's runs: the training runs and the report run are listed under its name.
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs")
            expect(page.get_by_text(run_name, exact=True).first).to_be_visible()
            expect(page.get_by_text("regime-report", exact=True).first).to_be_visible()
            expect(page.get_by_text(name).first).to_be_visible()
            shots.append(tmp_path / "1-experiment-runs.png")
            page.screenshot(path=shots[-1])

            # One run, opened from the list as a user would: its val_acc metric with the logged value.
            page.get_by_text(run_name, exact=True).first.click()
            expect(page).to_have_url(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}",
                                     timeout=UI_TIMEOUT_MS)
            metric_row = page.get_by_role("row").filter(has_text="val_acc").first
            expect(metric_row).to_contain_text("0.86")
            metric_row.scroll_into_view_if_needed()
            shots.append(tmp_path / "2-run-metric.png")
            page.screenshot(path=shots[-1])

            # The report run's artifacts: the batch-regime figure, fetched through the server and drawn.
            report_run = MlflowClient(mlflow_server.url).search_runs(
                [experiment_id], "tags.`normlab.kind` = 'report'")[0].info.run_id
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{report_run}/artifacts")
            page.get_by_text("report", exact=True).first.click()
            page.get_by_text("batch_regimes.png", exact=True).first.click()
            figure = page.locator("img[src^='blob:']").first
            expect(figure).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
            assert figure.evaluate("img => img.naturalWidth") == 770  # the PNG's width: 7 in at 110 dpi
            shots.append(tmp_path / "3-report-figure.png")
            page.screenshot(path=shots[-1])

            # The report's HTML page stands alone: opened from disk, its three figures are drawn.
            page.goto((known_report["out"] / "report.html").as_uri())
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(img => img.complete && img.naturalWidth)")
            assert len(widths) == 3 and all(widths), widths
            expect(page.get_by_role("heading", name="Learning-rate stability")).to_be_visible()
        finally:
            browser.close()
    for shot in shots:
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")


def test_a_sweep_opens_on_its_runs_table_with_distinct_cell_names(mlflow_server, tmp_path):
    """The experiment's link opens on its runs in the model-training view, not MLflow 3's GenAI overview,
    and the runs table shows each run's cell name (the names dispatch gives them)."""
    import yaml
    from playwright.sync_api import expect, sync_playwright

    from cluster.run_names import sweep_run_names
    from cluster.sweep import load_sweep
    from trainer import tracking

    path = tmp_path / "ui-names.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ui-names", "overrides": {"tracking.uri": mlflow_server.url, "output.root": str(tmp_path / "runs")},
        "grid": {"model.norm": ["bn", "gn:groups=2"], "optim.lr": [0.1]}, "seeds": [0, 1],
        "executor": {"kind": "local"}}))
    sweep = load_sweep(path)
    client = MlflowClient(mlflow_server.url)
    experiment_id = tracking.ensure_experiment(client, sweep.experiment)
    names = sweep_run_names(sweep.runs)
    assert len(set(names.values())) == len(sweep.runs) == 4
    for run in sweep.runs:
        run_id = client.create_run(experiment_id, run_name=names[run.key], tags={"run_key": run.key}).info.run_id
        client.log_metric(run_id, "val_acc", 0.5)
        client.set_terminated(run_id)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # the link normlab prints: MLflow 3.17 takes the training view from it, not from the kind tag
            page.goto(tracking.ui_experiment_url(mlflow_server.url, experiment_id))
            for name in names.values():
                expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_text("4 matching runs")).to_be_visible()
            expect(page.get_by_text("Overview", exact=True)).to_have_count(0)  # the GenAI side bar's first page
            assert "/runs" in page.url, page.url
            shot = tmp_path / "sweep-runs-table.png"
            page.screenshot(path=shot)
        finally:
            browser.close()
    assert sorted(names.values()) == ["bn b64 lr0.1 s0", "bn b64 lr0.1 s1",
                                      "gn:groups=2 b64 lr0.1 s0", "gn:groups=2 b64 lr0.1 s1"]
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
