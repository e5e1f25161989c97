"""The methods, one object each (`Method`, one file per method), and the pieces they share.

- `base`: `Method` (what a method needs, its teacher context, its per-token `Terms` of a `Step`), the registry
  `METHODS` (`loss.name` -> class) and `method_for`.
- one file per method: `distill` (with the per-batch on-policy/dataset choice of `lmbda`), `self_critique`,
  `continual`, `on_policy_kd`, `rl_feedback`, `grpo` (with group-normalized advantages and the
  policy-gradient terms), `sft` (with reference completions as a `Rollout` and the cross-entropy terms).
- `sdpo`: the RL-feedback teacher context (successful sibling + verifier feedback).
- `reason_first`: the self-critique teacher's generated analysis of the reference solution.
- `teacher_context`: `build_context`, the teacher-context builder for the loss options, and `TeacherPrompts`,
  which makes the teacher's prompt tensors with it.
- `contrast`: `ContrastiveTeacher`, the teacher's scores against a placebo context (`loss.contrast`).
- `requirements`: what a method needs from the other config groups.

Each method's own options (`Method.Options`: `MethodOptions`, `DistillOptions`, `PolicyGradientOptions`) hold their
defaults; `conf/loss/*.yaml` lists only what each recipe changes; `docs/methods.md` explains them.
"""

from lightning_sd.methods.base import (METHODS, Method, MethodOptions, Step, Terms, method_class, method_for,
                                      option_defaults, register)
from lightning_sd.methods.distill import Distill, DistillOptions, distillation, on_policy_batch
from lightning_sd.methods.self_critique import SelfCritique
from lightning_sd.methods.continual import Continual
from lightning_sd.methods.rl_feedback import RlFeedback
from lightning_sd.methods.on_policy_kd import OnPolicyKD
from lightning_sd.methods.grpo import Grpo, PolicyGradientOptions, group_advantages, policy_gradient, policy_gradient_terms
from lightning_sd.methods.sft import Sft, is_dataset_rollout, nll_terms, reference_rollout
from lightning_sd.methods.reason_first import generate_analyses, with_analysis
from lightning_sd.methods.requirements import check_method
from lightning_sd.methods.sdpo import sdpo_context, strip_reasoning, successful_sibling
from lightning_sd.methods.teacher_context import TeacherPrompts, build_context
from lightning_sd.methods.contrast import ContrastiveTeacher

__all__ = ["METHODS", "Method", "MethodOptions", "DistillOptions", "PolicyGradientOptions", "Step", "Terms",
           "method_class", "method_for", "option_defaults", "register", "Distill", "distillation", "SelfCritique", "Continual", "RlFeedback", "OnPolicyKD", "Grpo", "Sft",
           "group_advantages", "policy_gradient", "policy_gradient_terms", "on_policy_batch", "generate_analyses",
           "with_analysis", "check_method", "build_context", "TeacherPrompts", "ContrastiveTeacher", "sdpo_context", "strip_reasoning", "successful_sibling",
           "is_dataset_rollout", "nll_terms", "reference_rollout"]
