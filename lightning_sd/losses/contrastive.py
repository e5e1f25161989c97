"""The contrastive teacher: distill only what the privileged context's *content* adds.

A teacher prompt changes two things at once: the content it shows (the reference solution) and the wording
around it (a template that asks to "reason step by step", that puts an answer in view, ...). The second part
shifts the teacher's distribution the same way for every record, right or wrong, and a small student learns
that shift (register, answer-first openings) as readily as the content. Scoring the same tokens a second time
with a *placebo* context, the same template around another record's solution, measures the template's shift;
the difference of the two teachers' log-probs keeps what the real content adds:

    log Q(v) = log S(v) + alpha * (log T_real(v) - log T_placebo(v)) + const        (Q normalized over v)

`S` is the student (detached: Q is a target), `alpha` how far to move. Softmax is invariant to per-row
constants, so on logits `q = s + alpha * (t_real - t_placebo)` (all divided by the loss temperature later,
which scales alpha's effect identically for every entry). Where the placebo equals the real context,
`Q = S` and every divergence between the student and Q is exactly zero.
"""

from __future__ import annotations

from torch import Tensor

from .support import compute_dtype

__all__ = ["contrastive_target_logits"]


def contrastive_target_logits(student_logits: Tensor, teacher_logits: Tensor, placebo_logits: Tensor,
                              alpha: float = 1.0) -> Tensor:
    """Target logits `[..., V]` (float32, float64 if an input is): `student.detach() + alpha * (teacher -
    placebo)`, no gradient.

    `student_logits`, `teacher_logits` (real context), `placebo_logits` (the same template around another
    record's context): `[..., V]`, the same completion tokens. Use the result wherever teacher logits go
    (`per_token_divergence(student_logits, target, ...)`): with `beta=0` that is the forward KL(Q||S)."""
    if not (student_logits.shape == teacher_logits.shape == placebo_logits.shape):
        raise ValueError(f"contrastive teacher: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)} and placebo {tuple(placebo_logits.shape)} logits must "
                         "score the same tokens with the same vocabulary")
    if not alpha > 0:
        raise ValueError(f"contrastive teacher: alpha must be > 0, got {alpha!r}")
    dtype = compute_dtype(student_logits, teacher_logits, placebo_logits)
    shift = teacher_logits.detach().to(dtype) - placebo_logits.detach().to(dtype)
    return student_logits.detach().to(dtype) + alpha * shift
