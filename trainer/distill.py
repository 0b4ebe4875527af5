"""Knowledge distillation from a trained normlab run (``model.teacher``).

Liu et al., "ReActNet", ECCV 2020 (Eq. 5), the distributional loss: the student matches the
teacher's class distribution, averaged over the n samples of the batch,

    L = 1/n sum_i sum_c p_c^T(x_i) log(p_c^T(x_i) / p_c^S(x_i))

(KL(p^T || p^S); ReActNet writes it without the teacher's entropy term, which has no gradient for
the student). The student trains on this loss alone, as in ReActNet and "BNN - BN = ?".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.checkpoints import load_model


def distribution_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over the batch, in float32."""
    s = F.log_softmax(student_logits.float(), dim=1)
    t = F.log_softmax(teacher_logits.float(), dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


class Teacher:
    """A frozen network held outside the student's modules: not in its state dict, optimiser or probes."""

    def __init__(self, spec: str, config: Any):
        self.spec = spec
        self.model: nn.Module = load_model(spec, config, "teacher").requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != x.device:
            self.model.to(x.device)
        return self.model.eval()(x)
