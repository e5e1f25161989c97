"""The method variants as small pieces the module composes (one concept per file):

- `sdpo`: RL-feedback teacher context (successful sibling + verifier feedback).
- `grpo`: group-normalized advantages and the policy-gradient terms (the RL baseline, `lam` mixing).
- `sft`: reference completions as a `Rollout`, and the cross-entropy terms (the off-policy baseline).
- `kd`: on-policy KD's per-batch on-policy/dataset choice (`lmbda`), identical on every rank.
- `reason_first`: the self-critique teacher's generated analysis of the reference solution.
- `requirements`: what each loss needs from the other config groups.
- `teacher_context`: `build_context`, the teacher-context builder for the loss options.

The loss options themselves (defaults, templates) are `conf/loss/*.yaml`; `docs/methods.md` explains them.
"""

from lightning_sd.methods.grpo import group_advantages, policy_gradient_terms
from lightning_sd.methods.kd import on_policy_batch
from lightning_sd.methods.reason_first import generate_analyses, with_analysis
from lightning_sd.methods.requirements import check_method
from lightning_sd.methods.sdpo import sdpo_context, strip_reasoning, successful_sibling
from lightning_sd.methods.sft import is_dataset_rollout, nll_terms, reference_rollout
from lightning_sd.methods.teacher_context import build_context

__all__ = ["group_advantages", "policy_gradient_terms", "on_policy_batch", "generate_analyses", "with_analysis",
           "check_method", "build_context", "sdpo_context", "strip_reasoning", "successful_sibling",
           "is_dataset_rollout", "nll_terms", "reference_rollout"]
