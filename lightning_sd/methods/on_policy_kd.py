"""On-policy KD (GKD, Agarwal et al. 2024; Thinking Machines 2025): an external teacher scores the
student's own samples. `lmbda` is the fraction of batches trained on student samples; the other batches
train on the dataset's reference completions (`reference_rollout`), scored by the same divergence
(`Distill.samples_batch`)."""

from __future__ import annotations

from lightning_sd.methods.base import register
from lightning_sd.methods.distill import Distill, on_policy_batch


@register
class OnPolicyKD(Distill):
    """`loss=on_policy_kd`: an external teacher's divergence on the student's samples (the teacher sees the
    student's own prompt, `loss.template=student_prompt`); `loss.lmbda < 1` trains some batches on the
    dataset's completions (`on_policy_batch`)."""

    name = "on_policy_kd"


__all__ = ["on_policy_batch", "OnPolicyKD"]
