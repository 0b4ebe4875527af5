"""`quiet_lightning` (a run's output outside a terminal): the four expected warnings go, others stay."""

from __future__ import annotations

import logging
import warnings

import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities._pytree import _tree_flatten
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from trainer.run import quiet_lightning


def _shown(emit) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        emit()
    return [str(w.message) for w in caught]


def test_the_expected_warnings_go_and_the_rest_stay():
    # torch's deprecation, raised where Lightning flattens a batch (told apart by category and module)
    assert _shown(lambda: _tree_flatten(torch.zeros(2))) == []
    assert any("LeafSpec" in m for m in _shown(lambda: torch.utils._pytree.LeafSpec()))  # elsewhere: shown
    # Lightning's texts, in their categories (Lightning has no switch for them)
    assert _shown(lambda: rank_zero_warn("Checkpoint directory /r/checkpoints exists and is not empty.")) == []
    assert _shown(lambda: rank_zero_warn("The 'train_dataloader' does not have many workers which may be a "
                                         "bottleneck.", category=PossibleUserWarning)) == []
    assert _shown(lambda: rank_zero_warn("The `srun` command is available on your system but is not used.",
                                         category=PossibleUserWarning)) == []
    newer = "The loaded checkpoint was produced with Lightning v9.0.0, which is newer than your current version"
    assert _shown(lambda: rank_zero_warn(newer, category=PossibleUserWarning)) == [newer]
    assert logging.getLogger("pytorch_lightning").getEffectiveLevel() == logging.WARNING  # banners are INFO
