"""Model weights from another run: ``model.teacher`` and ``model.init_from`` name a normlab run key
(its ``<output.root>/<key>/checkpoints/last.ckpt``) or a checkpoint file of a normlab run.

A checkpoint carries the run's config (``hyper_parameters``), so the model it holds is rebuilt
from there: a teacher may have any architecture, norm or data shape of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.models import build_model

MODEL_PREFIX = "model."  # NormClassifier keeps its network in ``self.model``


def resolve_checkpoint(spec: str, output_root: str) -> Path:
    """The checkpoint file ``spec`` names; ValueError (one line) when there is none."""
    from trainer.run import CHECKPOINT  # the run directory's layout is the runner's

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    in_run = Path(output_root) / spec / "checkpoints" / CHECKPOINT
    if in_run.is_file():
        return in_run
    raise ValueError(f"{spec} is neither a checkpoint file nor a run key with {in_run}; give the run key "
                     f"of a trained run under {output_root}/ or the path of its .ckpt")


def _load(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint or "config" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{path} is not a normlab run checkpoint (no state_dict and config)")
    return checkpoint


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's own weights from a checkpoint's LightningModule state dict."""
    state = checkpoint["state_dict"]
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def load_model(spec: str, output_root: str) -> nn.Module:
    """The network of the run ``spec`` names, rebuilt from its config, with its trained weights, in eval mode."""
    checkpoint = _load(resolve_checkpoint(spec, output_root))
    hp = checkpoint["hyper_parameters"]
    model = build_model(hp["config"]["model"], hp["num_classes"], hp["in_channels"], hp["image_size"])
    model.load_state_dict(model_state(checkpoint))
    return model.eval()


def init_from(model: nn.Module, spec: str, output_root: str) -> None:
    """Copy the weights of the run ``spec`` names into ``model`` (same architecture; binarisation may differ)."""
    path = resolve_checkpoint(spec, output_root)
    missing, unexpected = model.load_state_dict(model_state(_load(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} holds a different network: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"(model.init_from needs the same arch, depth, width, norm and weight_std)")
