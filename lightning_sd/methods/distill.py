"""`loss=distill`: the plain self-distillation method. The teacher (the student's own weights, or a copy) sees a
privileged context built from `loss.template`; the student is trained toward the teacher's distribution on the
student's own completion, token by token. The other distillation methods (`self_critique`, `continual`,
`on_policy_kd`) share these terms and differ in their options (`conf/loss/*.yaml`)."""

from __future__ import annotations

from lightning_sd.methods.base import Method, Step, Terms, register


def distillation(step: Step) -> Terms:
    """The teacher's per-token divergence on the rows that have a teacher context."""
    mask = step.teacher_mask()
    return Terms(step.distillation(mask), mask)


@register
class Distill(Method):
    name = "distill"

    def terms(self, step: Step) -> Terms:
        return distillation(step)


__all__ = ["distillation", "Distill"]
