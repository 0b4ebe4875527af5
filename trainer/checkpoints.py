"""Model weights from another run: ``model.teacher`` and ``model.init_from`` name a normlab run key
(its ``<output.root>/<key>/checkpoints/last.ckpt``), a checkpoint file of a normlab run, or
``with:KEY=VALUE ...``: the run whose config is this run's with those overrides (space-separated
dot-list) and the naming key set to null. The last form lets one sweep file refer to the runs of
another (step 2 of the binary recipe to its step 1, a student to its teacher) without writing
down run keys: ``model.init_from: "with:model.binary=activations optim.weight_decay=1e-5"`` (no space
after the colon: on the command line ``with: ...`` would parse as a YAML mapping).

A checkpoint carries the run's config (``hyper_parameters``), so the model it holds is rebuilt
from there: a teacher may have any architecture, norm or data shape of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer.models import build_model

MODEL_PREFIX = "model."  # NormClassifier keeps its network in ``self.model``
DERIVED = "with:"


def derived_run_key(spec: str, config: Any, key: str) -> str:
    """The run key of ``config`` with the ``with:`` overrides of ``spec`` and ``model.<key>`` null."""
    from trainer.config import ExperimentConfig, run_key  # config imports this module

    container = OmegaConf.to_container(config, resolve=True, enum_to_str=True) if isinstance(config, DictConfig) \
        else config
    base = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), container)
    base.model[key] = None
    items = spec[len(DERIVED):].split()
    if not items or any("=" not in item for item in items):
        raise ValueError(f"{spec!r}: write 'with:KEY=VALUE ...' (space-separated overrides of this run's config)")
    return run_key(OmegaConf.merge(base, OmegaConf.from_dotlist(items)))


def resolve_checkpoint(spec: str, config: Any, key: str) -> Path:
    """The checkpoint file ``spec`` (the value of ``model.<key>`` in ``config``) names; ValueError (one line)
    when there is none."""
    from trainer.run import CHECKPOINT  # the run directory's layout is the runner's

    output_root = config["output"]["root"]
    if spec.startswith(DERIVED):
        derived = derived_run_key(spec, config, key)
        in_run = Path(output_root) / derived / "checkpoints" / CHECKPOINT
        if not in_run.is_file():
            raise ValueError(f"{spec!r} is run {derived}, which has no {in_run}; train it first")
        return in_run
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    in_run = Path(output_root) / spec / "checkpoints" / CHECKPOINT
    if in_run.is_file():
        return in_run
    raise ValueError(f"{spec} is neither a checkpoint file nor a run key with {in_run}; give the run key "
                     f"of a trained run under {output_root}/ or the path of its .ckpt")


def _load(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle's and zipfile's errors alike
        raise ValueError(f"{path} is not a readable checkpoint: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint \
            or "config" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{path} is not a normlab run checkpoint (no state_dict and config)")
    return checkpoint


def check_checkpoint(spec: str, config: Any, key: str) -> Path:
    """The checkpoint ``spec`` names, opened (memory-mapped) to see that it is a normlab run's."""
    path = resolve_checkpoint(spec, config, key)
    _load(path)
    return path


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's own weights from a checkpoint's LightningModule state dict."""
    state = checkpoint["state_dict"]
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def load_model(spec: str, config: Any, key: str = "teacher") -> nn.Module:
    """The network of the run ``spec`` names, rebuilt from its config, with its trained weights, in eval mode."""
    checkpoint = _load(resolve_checkpoint(spec, config, key))
    hp = checkpoint["hyper_parameters"]
    model = build_model(hp["config"]["model"], hp["num_classes"], hp["in_channels"], hp["image_size"])
    model.load_state_dict(model_state(checkpoint))
    return model.eval()


def init_from(model: nn.Module, spec: str, config: Any) -> None:
    """Copy the weights of the run ``spec`` names into ``model`` (same architecture; binarisation may differ)."""
    path = resolve_checkpoint(spec, config, "init_from")
    missing, unexpected = model.load_state_dict(model_state(_load(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} holds a different network: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"(model.init_from needs the same arch, depth, width, norm and weight_std)")
