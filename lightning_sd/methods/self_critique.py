"""`loss=self_critique` (OPSD): the teacher is the frozen initial student, shown the reference solution
(`loss.template=self_critique_v3`, optionally its own analysis of it first, `loss.reason_first`); forward KL at
temperature 1.1 with a per-entry gradient clip (`conf/loss/self_critique.yaml`)."""

from __future__ import annotations

from lightning_sd.methods.base import register
from lightning_sd.methods.distill import Distill


@register
class SelfCritique(Distill):
    name = "self_critique"


__all__ = ["SelfCritique"]
