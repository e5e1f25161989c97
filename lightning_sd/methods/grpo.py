"""GRPO: group-normalized scalar-reward policy gradient (the RL baseline), and its mix with SDPO.

For each prompt, G rollouts get rewards `r`; the advantage of rollout i is
`A_i = (r_i - mean(r)) / (std(r) + eps)` over its group (sample standard deviation, as TRL and the
DeepSeekMath code; rollouts whose verifier failed are left out of the statistics and of the loss).
Every completion token t of rollout i gets the per-token loss

    -A_i * w_t * log S(y_t),      w_t = min(exp(log S(y_t) - log S_sampler(y_t)), is_clip)  (detached)

so the gradient is the importance-weighted policy gradient `-A_i w_t grad log S(y_t)`; the loss is
reduced by a token mean like the distillation losses.

Mixing with SDPO (`loss=rl_feedback loss.grpo_mix=...`): the loss is `grpo_mix * GRPO + (1 - grpo_mix) * SDPO`.
With the sampled-token SDPO estimator (`support=sampled`, reverse KL) SDPO's per-token gradient is
`-(log T(y_t) - log S(y_t)) grad log S(y_t)`, so mixing the losses is exactly mixing the advantages
`A = grpo_mix * A_GRPO + (1 - grpo_mix) * A_SDPO` of the paper; with full or top-k support it is the analogous
mix of the two gradients.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from lightning_sd.losses import apply_importance_weight
from dataclasses import dataclass

from lightning_sd.methods.base import Method, MethodOptions, Step, Terms, register


GRPO_EPS = 1e-4


def group_advantages(rewards: Sequence[float | None] | torch.Tensor, group_size: int,
                     eps: float = GRPO_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`[R]` rewards (rows of one prompt adjacent, `None`/NaN = verifier failed) -> `([R]` advantages,
    `[R]` bool has-a-reward). A group with fewer than two rewards gives advantage 0."""
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().double().cpu()
    else:
        r = torch.tensor([float("nan") if x is None else float(x) for x in rewards], dtype=torch.float64)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of generation.n={group_size}")
    g = r.view(-1, group_size)
    valid = ~torch.isnan(g)
    count = valid.sum(-1, keepdim=True)
    zero = torch.zeros((), dtype=g.dtype)
    mean = torch.where(valid, g, zero).sum(-1, keepdim=True) / count.clamp(min=1)
    var = torch.where(valid, (g - mean) ** 2, zero).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    adv = torch.where(valid & (count >= 2), (g - mean) / (var.sqrt() + eps), zero)
    return adv.view(-1).float(), valid.view(-1)


def policy_gradient_terms(logp: torch.Tensor, advantages: torch.Tensor,
                          is_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token GRPO loss `[R, C]`: `-A_r * w_t * log S(y_t)`.

    `logp`: `[R, C]` student log-probs of the completion tokens (with grad); `advantages`: `[R]`;
    `is_weight`: `[R, C]` detached importance weights against the sampler's distribution (None: no weight,
    e.g. dataset completions; see `SelfDistillationModule.importance_weights`).
    """
    adv = apply_importance_weight(advantages.to(device=logp.device, dtype=logp.dtype)[:, None], is_weight)
    return -adv * logp


def policy_gradient(step: Step, method: str) -> Terms:
    """The GRPO terms of a step: on the rows with a reward; a row whose advantage is 0 (equal rewards in its
    group) carries no signal."""
    logp = step.logprobs()
    if step.rewards is None:
        raise RuntimeError(f"loss={method} needs verifier rewards in the batch: give the module a task "
                           "(data.task=..., or SelfDistillationModule(task=...)) and train with OnPolicyGeneration")
    advantages, has_reward = group_advantages(step.rewards, step.group_size)
    base = step.mask
    mask = base * has_reward.to(base.device, base.dtype)[:, None]
    signal = mask.bool() & (advantages != 0).to(base.device)[:, None]
    return Terms(policy_gradient_terms(logp, advantages, step.importance_weights), mask, signal)


@dataclass
class PolicyGradientOptions(MethodOptions):
    """The policy-gradient methods' own key under `loss.`: `grpo_mix`, the GRPO share of the loss (`rl_feedback`
    mixes `grpo_mix * GRPO + (1 - grpo_mix) * SDPO`; `grpo` is `grpo_mix=1`)."""

    grpo_mix: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.grpo_mix <= 1.0:
            raise ValueError(f"loss.grpo_mix must be in [0, 1], got {self.grpo_mix}")


@register
class Grpo(Method):
    """`loss=grpo`: the pure group-normalized policy gradient (no teacher)."""

    name = "grpo"
    Options = PolicyGradientOptions
    options: PolicyGradientOptions
    teacher = False
    rewards = True
    distills = False

    @property
    def policy_gradient(self) -> bool:
        return True

    def validate(self) -> None:
        if self.options.grpo_mix != 1.0:
            raise ValueError(f"loss=grpo is the pure policy gradient (loss.grpo_mix=1, got {self.options.grpo_mix}); to "
                             "mix it with self-distillation use loss=rl_feedback loss.grpo_mix=...")
        super().validate()

    def check(self, teacher: Any, generation: Any, data: Any) -> None:
        super().check(teacher, generation, data)
        if self.policy_gradient and generation.n < 2:  # a warning: every loss option must validate on its own
            warnings.warn(f"loss={self.loss.name} with loss.grpo_mix={self.options.grpo_mix} normalizes rewards within "
                          f"each prompt's group, so with generation.n={generation.n} every advantage is 0 and the GRPO "
                          "term learns nothing: set generation.n >= 2 (the papers use 8)", stacklevel=3)

    def terms(self, step: Step) -> Terms:
        return policy_gradient(step, self.loss.name)


__all__ = ["GRPO_EPS", "PolicyGradientOptions", "group_advantages", "policy_gradient_terms", "policy_gradient", "Grpo"]
