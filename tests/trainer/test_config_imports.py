"""Checking a config needs neither torch nor Lightning (sweep planning and status check thousands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CODE = """
import sys
from trainer.config import ConfigError, load_config, run_key
cfg = load_config("configs/experiments/digits_resnet20.yaml", ["model.norm=gn:groups=4", "model.norm_order=auto",
                  "optim.precondition=bnp", "model.weight_std=ws"])
print(cfg.model.norm, len(run_key(cfg)))
for bad in ("model.norm=gn:groups=3", "model.depth=9", "model.norm_order=act_norm"):
    try:
        load_config(None, [bad] + (["model.norm=frn"] if "order" in bad else []))
    except ConfigError as error:
        print(str(error).splitlines()[0])
print(sorted(m for m in ("torch", "lightning", "pytorch_lightning", "mlflow", "submitit") if m in sys.modules))
"""


def test_load_config_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "gn:groups=4 12"
    assert lines[1] == "model.norm: gn: groups=3 does not divide num_features=16; use one of 1, 2, 4, 8, 16"
    assert lines[2].startswith("model.depth: cifar_resnet needs depth 6n+2")
    assert lines[3] == ("model.norm_order: act_norm puts the norm after the ReLU, but frn includes its activation; "
                        "use norm_act or auto")
    assert lines[4] == "[]"
