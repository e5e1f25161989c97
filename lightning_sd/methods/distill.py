"""`loss=distill`: the plain self-distillation method. The teacher (the student's own weights, or a copy) sees a
privileged context built from `loss.template`; the student is trained toward the teacher's distribution on the
student's own completion, token by token. The other distillation methods (`self_critique`, `continual`,
`on_policy_kd`) share these terms and differ in their options (`conf/loss/*.yaml`).

`loss.lmbda < 1` trains some batches on the dataset's reference completions instead of samples, scored by the same
divergence (GKD's mixing). The choice for a batch depends only on `(seed, global_step, batch_idx)`, never on the
rank, so every rank of a data-parallel run takes the same branch (a rank that samples while another does not would
hang the collectives of the decode loop)."""

from __future__ import annotations

from lightning_sd.methods.base import Method, Step, Terms, register
from lightning_sd.rollout import derive_seed

_SALT = 0x6B64  # separates this stream from the sampling seeds derived from the same integers


def on_policy_batch(lmbda: float, seed: int, global_step: int, batch_idx: int) -> bool:
    """True when this batch should use student samples: a uniform draw from the hash of
    `(seed, global_step, batch_idx)` is below `lmbda` (`lmbda=1` always, `lmbda=0` never)."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    u = derive_seed(seed, global_step, batch_idx, _SALT) / float(1 << 63)
    return u < lmbda


def distillation(step: Step) -> Terms:
    """The teacher's per-token divergence on the rows that have a teacher context."""
    mask = step.teacher_mask()
    return Terms(step.distillation(mask), mask)


@register
class Distill(Method):
    name = "distill"

    def samples_batch(self, seed: int, global_step: int, batch_idx: int) -> bool:
        return on_policy_batch(self.loss.lmbda, seed, global_step, batch_idx)

    def terms(self, step: Step) -> Terms:
        return distillation(step)


__all__ = ["on_policy_batch", "distillation", "Distill"]
