"""`loss.contrast`: the contrastive teacher, a wrapper around the teacher's scores. The same tokens are scored a
second time with a *placebo* context, the same template around another record's fields (`TeacherPrompts` with
`placebo=True`), and the target is the student moved by `alpha` times the difference of the two teachers
(`losses.contrastive_target_logits`): what the real context's content adds, without the template's own shift. A
row counts only where both contexts exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_sd.batch import StepBatch, TeacherInputs
from lightning_sd.losses import contrastive_target_logits


@dataclass
class ContrastiveTeacher:
    alpha: float

    def scores(self, batch: StepBatch, inputs: TeacherInputs, teacher_out: torch.Tensor,
               build: Callable[..., TeacherInputs], forward: Callable[[StepBatch, TeacherInputs], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Score the placebo (`build(batch, placebo=True)`, then `forward`), leave out of `inputs.row_mask` the rows
        without a placebo, and return the target as a function of the student's logits `[R, C, V]` (detached)."""
        placebo = build(batch, placebo=True)
        placebo_out = forward(batch, placebo)
        inputs.row_mask = inputs.row_mask & placebo.row_mask
        return lambda student_out: contrastive_target_logits(student_out, teacher_out, placebo_out, self.alpha)


__all__ = ["ContrastiveTeacher"]
