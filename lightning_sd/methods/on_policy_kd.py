"""On-policy KD (GKD, Agarwal et al. 2024; Thinking Machines 2025): an external teacher scores the
student's own samples. `lmbda` is the fraction of batches trained on student samples; the other batches
train on the dataset's reference completions (`reference_rollout`), scored by the same divergence.

The choice for a batch depends only on `(seed, global_step, batch_idx)`, never on the rank, so every
rank of a data-parallel run takes the same branch (a rank that samples while another does not would
hang the collectives of the decode loop).
"""

from __future__ import annotations

from lightning_sd.methods.base import register
from lightning_sd.methods.distill import Distill
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


@register
class OnPolicyKD(Distill):
    """`loss=on_policy_kd`: an external teacher's divergence on the student's samples (the teacher sees the
    student's own prompt, `loss.template=student_prompt`); `loss.lmbda < 1` trains some batches on the
    dataset's completions (`on_policy_batch`)."""

    name = "on_policy_kd"


__all__ = ["on_policy_batch", "OnPolicyKD"]
