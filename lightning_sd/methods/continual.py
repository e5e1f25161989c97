"""`loss=continual` (SDFT): continual learning from demonstrations. An EMA teacher sees the demonstration
(`loss.template=demonstration`); the first `loss.skip_first=3` completion tokens do not train; sequence-mean
reduction (`conf/loss/continual.yaml`)."""

from __future__ import annotations

from lightning_sd.methods.base import register
from lightning_sd.methods.distill import Distill


@register
class Continual(Distill):
    name = "continual"


__all__ = ["Continual"]
