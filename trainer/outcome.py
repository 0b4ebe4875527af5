"""A run's outcome class, and the two rules it rests on (documented in docs/trainer.md, "Outcomes").

- ``finished``: trained to its budget and ended above chance (or was never validated).
- ``diverged``: the divergence rule tripped (see :class:`trainer.callbacks.DivergenceGuard`: a
  non-finite loss, or a loss above ``probes.divergence_factor`` x the first finite loss); the step
  and what tripped are recorded.
- ``collapsed``: some validation was above chance, the final one is at chance.
- ``not_learning``: no validation was ever above chance.

The chance rule: an accuracy is *at chance* when it is at most ``CHANCE_FACTOR`` / number of classes
(1.5 x the accuracy of guessing; on 10 classes, 15%). The validations are those of every epoch end
and the final weights' one (:class:`trainer.callbacks.ValidationHistory`). Only the standard
library here: the report (``cluster.report``) applies the same chance rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OUTCOMES = ("finished", "diverged", "collapsed", "not_learning")
#: an accuracy at most this multiple of chance (1 / classes) is "at chance"
CHANCE_FACTOR = 1.5


def at_chance(accuracy: float | None, num_classes: int | str | None) -> bool:
    """The chance rule: ``accuracy <= CHANCE_FACTOR / num_classes`` (False when either is unknown)."""
    return accuracy is not None and num_classes is not None and accuracy <= CHANCE_FACTOR / int(num_classes)


@dataclass
class Outcome:
    kind: str  # one of OUTCOMES
    step: int | None = None  # diverged: the optimizer step at which the rule tripped
    tripped: str | None = None  # diverged: what tripped it


def classify(diverged_step: int | None, tripped: str | None, accuracies: Sequence[float],
             num_classes: int) -> Outcome:
    """The outcome of a run from its divergence record and its validation accuracies in order."""
    if diverged_step is not None:
        return Outcome("diverged", diverged_step, tripped)
    if not accuracies:  # never validated (trainer.limit_val_batches=0): nothing says it did not learn
        return Outcome("finished")
    if all(at_chance(a, num_classes) for a in accuracies):
        return Outcome("not_learning")
    if at_chance(accuracies[-1], num_classes):
        return Outcome("collapsed")
    return Outcome("finished")
