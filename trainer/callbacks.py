"""Cross-cutting behaviour of a run, as Lightning callbacks.

- :class:`LayerProbe`: every N optimizer steps from step 0 (the initialisation: the forward and the
  gradient of the first step come before any update), per weight layer (conv, linear; ``NNN`` is
  its depth index) the mean and std of its output and the norm of its weight gradient, logged as
  ``probe/act_mean/NNN_<path>``, ``probe/act_std/NNN_<path>``, ``probe/grad_norm/NNN_<path>``,
  and how concentrated the gradient on the logits is on one class, ``probe/grad_concentration``
  (:func:`trainer.probes.logit_gradient_concentration`). Bjorck et al. 2018 follow exactly these
  quantities to show unnormalised deep nets blowing up. The Fisher eigenvalue probe is
  :class:`trainer.probes.FisherProbe`.
- :class:`DivergenceGuard`: a non-finite loss, or one above ``factor`` times the first loss, stops
  training cleanly; ``diverged`` (0/1) and ``diverged_step`` are logged at the end.
- :class:`EpochSeeding`: re-seeds torch's global generator from ``(seed, epoch, rank)`` at every
  epoch start, so stochastic layers (dropout) replay identically after a resume.
- :class:`EpochLines`: one line per epoch when there is no terminal for a progress bar.
- :class:`ValidationHistory`: every validation's ``val_acc``, for the outcome class (:mod:`trainer.outcome`).
- :class:`LastValidation`: the step of the last validation during fit, so that a run whose training
  stopped elsewhere (``max_steps`` inside an epoch, ``check_val_every_n_epoch`` not dividing
  ``max_epochs``) gets its final weights validated.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from normlayers import trainable_weight
from trainer.data import derive_seed
from trainer.models import probed_layers
from trainer.probes import logit_gradient_concentration


class LayerProbe(Callback):
    def __init__(self, every_n_steps: int, activations: bool = True, gradients: bool = True):
        self.every_n_steps, self.activations, self.gradients = every_n_steps, activations, gradients
        self._hooks: list[Any] = []
        self._stats: dict[str, Tensor] = {}
        self._step: int | None = None

    def _active(self, trainer: pl.Trainer) -> bool:
        return (self.every_n_steps > 0 and trainer.is_global_zero and trainer.logger is not None
                and trainer.global_step % self.every_n_steps == 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step if self._active(trainer) else None
        if self._step is None:
            return
        model = pl_module.model
        self._hooks.append(model.register_forward_hook(self._logits_recorder(model, batch[1])))
        if not self.activations:
            return
        for name, layer in probed_layers(model):
            self._hooks.append(layer.register_forward_hook(self._recorder(name, layer)))

    # A copy of the model made meanwhile (the Fisher probe's) carries these hooks along: only the
    # run's own modules are recorded.
    def _logits_recorder(self, model: torch.nn.Module, targets: Tensor):
        def record(module: torch.nn.Module, inputs: Any, logits: Tensor) -> None:
            if module is model:
                self._stats["probe/grad_concentration"] = logit_gradient_concentration(logits, targets)

        return record

    def _recorder(self, name: str, layer: torch.nn.Module):
        def record(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
            if module is not layer:
                return
            out = output.detach().float()
            self._stats[f"probe/act_mean/{name}"] = out.mean()
            self._stats[f"probe/act_std/{name}"] = out.std()

        return record

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._remove_hooks()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._step is None or not self.gradients:
            return
        for name, layer in probed_layers(pl_module.model):
            weight = trainable_weight(layer)  # the raw weight under weight standardisation
            if weight.grad is not None:
                self._stats[f"probe/grad_norm/{name}"] = torch.linalg.vector_norm(weight.grad.detach().float())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._remove_hooks()
        if self._step is not None and self._stats:
            keys = list(self._stats)
            values = torch.stack([self._stats[k] for k in keys]).tolist()  # one device sync for all layers
            trainer.logger.log_metrics(dict(zip(keys, values, strict=True)), step=self._step)
        self._stats.clear()
        self._step = None

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class DivergenceGuard(Callback):
    """Stops a run whose loss is NaN/inf or above ``factor`` x its first value (``factor`` 0: NaN/inf only)."""

    def __init__(self, factor: float):
        self.factor = factor
        self.initial_loss: float | None = None
        self.diverged_step: int | None = None
        self.tripped: str | None = None  # what tripped the rule, e.g. "non-finite loss (nan)"

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach())
        bad = not math.isfinite(value) or (
            self.factor > 0 and self.initial_loss is not None and value > self.factor * self.initial_loss)
        if self.initial_loss is None and math.isfinite(value):
            self.initial_loss = value
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.diverged_step = trainer.global_step
            self.tripped = (f"non-finite loss ({value})" if not math.isfinite(value) else
                            f"loss {value:.4g} > {self.factor:g} x the first loss {self.initial_loss:.4g}" if bad else
                            "another rank's loss")
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is None:
            return
        metrics = {"diverged": float(self.diverged)}
        if self.diverged:
            metrics["diverged_step"] = float(self.diverged_step)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss, "diverged_step": self.diverged_step, "tripped": self.tripped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = state_dict["initial_loss"]
        self.diverged_step = state_dict["diverged_step"]
        self.tripped = state_dict.get("tripped")


class EpochSeeding(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(derive_seed(self.seed, trainer.current_epoch, trainer.global_rank, 2))


class EpochLines(Callback):
    """``epoch 3/15  train_loss 0.41  val_loss 0.38  val_acc 0.931  (2.1 s)`` on rank 0."""

    KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4f}" for k in self.KEYS if k in metrics]
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs > 0 else ""
        steps = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        print(f"epoch {trainer.current_epoch + 1}{epochs}  step {trainer.global_step}{steps}  "
              f"{'  '.join(parts)}  ({time.perf_counter() - self._start:.1f} s)", flush=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and trainer.is_global_zero:
            metrics = trainer.callback_metrics
            parts = [f"{k} {float(metrics[k]):.4f}" for k in self.KEYS[2:] if k in metrics]
            print(f"final weights  step {trainer.global_step}  {'  '.join(parts)}", flush=True)


class LastValidation(Callback):
    """Remembers the optimizer step at which fit last validated (``None``: never)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.step = trainer.global_step


class ValidationHistory(Callback):
    """The ``val_acc`` of every validation of the run (fit's and the final weights'), kept in checkpoints."""

    def __init__(self) -> None:
        self.accuracies: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_acc")
        if value is not None and not trainer.sanity_checking:
            self.accuracies.append(float(value))

    def state_dict(self) -> dict:
        return {"accuracies": list(self.accuracies)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.accuracies = list(state_dict["accuracies"])
