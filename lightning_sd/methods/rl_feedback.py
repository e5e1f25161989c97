"""`loss=rl_feedback` (SDPO): self-distillation from rich feedback. The teacher sees a successful sibling rollout
and the verifier's feedback (`loss.template=sdpo`, see `methods.sdpo`); `loss.grpo_mix > 0` mixes in GRPO's
policy gradient: `grpo_mix * GRPO + (1 - grpo_mix) * SDPO`, each term on its own mask (GRPO: rows with a reward;
SDPO: rows with a sibling solution or feedback), normalized over their union. `grpo_mix=1` is GRPO alone (no
teacher forward)."""

from __future__ import annotations

import torch

from lightning_sd.contexts import context_kind
from lightning_sd.methods.base import Step, Terms, register
from lightning_sd.methods.distill import distillation
from lightning_sd.methods.grpo import Grpo, policy_gradient


@register
class RlFeedback(Grpo):
    name = "rl_feedback"

    @property
    def needs_teacher(self) -> bool:
        return self.options.grpo_mix < 1.0

    @property
    def policy_gradient(self) -> bool:
        return self.options.grpo_mix > 0.0

    @property
    def uses_rewards(self) -> bool:
        return self.policy_gradient or context_kind(self.options.template) == "rl_feedback"

    def validate(self) -> None:
        super(Grpo, self).validate()  # any grpo_mix in [0, 1], not only grpo's 1

    def terms(self, step: Step) -> Terms:
        grpo_mix = self.options.grpo_mix
        if grpo_mix == 0.0:
            return distillation(step)
        pg = policy_gradient(step, self.loss.name)
        if grpo_mix == 1.0:
            return pg
        sd = distillation(step)
        zero = torch.zeros((), dtype=pg.per_token.dtype, device=pg.per_token.device)
        per_token = (grpo_mix * torch.where(pg.mask.bool(), pg.per_token, zero)
                     + (1.0 - grpo_mix) * torch.where(sd.mask.bool(), sd.per_token.to(pg.per_token.dtype), zero))
        return Terms(per_token, (pg.mask.bool() | sd.mask.bool()).to(step.mask.dtype),
                     signal=pg.signal | sd.mask.bool())


__all__ = ["RlFeedback"]
