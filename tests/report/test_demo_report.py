"""The demo's report opens with its Findings: `normlab demo` on the demo's own sweep file
(configs/sweeps/demo.yaml, whatever its grid is), cut to a few optimizer steps and two seeds so it stays
cheap; every other setting (data, model, norms, per-device batches, evaluations) is the demo's."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from cluster import demo

STEPS = 6


def reduced_demo(path: Path) -> Path:
    spec = yaml.safe_load(demo.DEMO_SWEEP.read_text())
    overrides = spec.setdefault("overrides", {})
    overrides.pop("trainer.max_epochs", None)
    overrides["trainer.max_steps"] = STEPS
    for key, small in (("optim.warmup_steps", 2), ("eval.precise_batches", 2), ("probes.every_n_steps", 3)):
        if key in overrides:
            overrides[key] = min(overrides[key], small)
    spec["seeds"] = list(spec.get("seeds", [0, 1]))[:2]
    spec["name"] = "demo-reduced"
    settings = math.prod(len(v) for v in spec.get("grid", {}).values()) * max(
        (len(v) for v in spec.get("zip", {}).values()), default=1)
    spec["executor"] = {**spec.get("executor", {}), "kind": "local", "array_parallelism": 2,
                        "runs_per_job": max(1, settings * len(spec["seeds"]) // 2 + 1)}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_demo_report_opens_with_its_findings(tmp_path, capsys):
    sweep = reduced_demo(tmp_path / "demo.yaml")
    assert demo.main(["--sweep", str(sweep), "--out", "report"]) == 0
    markdown = Path("report", "report.md").read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Findings"
    findings = [line for line in markdown.split("## Findings", 1)[1].split("\n## ", 1)[0].splitlines()
                if line.startswith("- ")]
    # two seeds: every comparison gives its interval and says whether it is resolved at 2 seeds
    assert findings and all("2 seeds" in line for line in findings if "per-device batch" in line), findings
    assert any("95% t interval" in line for line in findings)
    assert "## Batch-size regimes" in headings
