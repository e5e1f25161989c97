"""The keys of a training batch, in one place: `StepBatch` names every key, who writes it and its shape. The
data module's collator writes the prompt keys, the rollout callback (`OnPolicyGeneration`) the rollout and the
verifier's verdicts, the module what the step computed (`loss_terms`, `diagnostics`) for the callbacks that show
it. The batch stays a plain dict at run time (Lightning moves it to the device as one); these types say what it
holds. `TeacherInputs` and `LossOutput` type the two other records of a step: the teacher's prompts and the
reduced loss.

Shapes: B prompts, R = B x n rollout rows (rows of one prompt adjacent), P prompt length (left-padded), C
completion length (right-padded), k the teacher alternatives kept per token.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from lightning_sd.sampling import Rollout


class LossTerms(TypedDict, total=False):
    """What the step trained on, per token (written by the module, read by `TokenView` and `SampleLogger`):
    `per_token` `[R, C]` the loss terms (detached), `mask` `[R, C]` the tokens they count on, and, on the steps a
    callback asks for it (`wants_teacher_topk`), `teacher_topk`: `{"ids": [R, C, k], "probs": [R, C, k]}`."""

    per_token: torch.Tensor
    mask: torch.Tensor
    teacher_topk: dict[str, torch.Tensor]


class StepBatch(TypedDict, total=False):
    """One training micro-batch.

    From the collator (`PromptDataModule`): `records` (the B raw records, privileged fields included),
    `prompt_ids` / `prompt_mask` `[B, P]`, `prompt_text` (the B chat-formatted prompts).

    From the rollout callback (`OnPolicyGeneration`): `on_policy` (False: this batch trains on the dataset's
    completions, no rollout was sampled), `rollout` (`Rollout`, R rows; the module builds it from the records'
    solutions when none was sampled), `completion_text` (R str), `gen_seconds` (sampling time), and with a
    verifier `rewards` (R floats, None where the verifier failed), `feedback` (R str or None) and
    `verifier_failures` (count in this batch).

    From the module's training step: `loss_terms` (`LossTerms`), `diagnostics` (the step's diagnostics, plain
    floats by name, `SelfDistillationModule.step_diagnostics`) and, with `loss.reason_first`, `analyses` (the
    teacher's B generated analyses of the reference solutions, shown in its context)."""

    records: list[dict]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_text: list[str]
    on_policy: bool
    rollout: Rollout
    completion_text: list[str]
    gen_seconds: float
    rewards: list[float | None]
    feedback: list[str | None]
    verifier_failures: int
    loss_terms: LossTerms
    diagnostics: dict[str, float]
    analyses: list[str]


class TeacherInputs(TypedDict, total=False):
    """The teacher's prompts for each rollout row (`SelfDistillationModule.build_teacher_inputs`): `prompt_ids` /
    `prompt_mask` `[R, P']` (left-padded), `row_mask` `[R]` bool (False: no privileged context, the row is left
    out of the loss), `texts` (the R teacher messages). Without a teacher forward only `row_mask` (all True)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    row_mask: torch.Tensor
    texts: list[str]


class LossOutput(TypedDict):
    """A step's reduced loss (`SelfDistillationModule.compute_loss`): `loss` the scalar to backpropagate (the
    *sum* of the terms; the gradients are normalized over the optimizer step), `value` the normalized loss for
    logging, `per_token` / `mask` `[R, C]`, `count` the local normalizer, `signal` `[R, C]` bool (the tokens that
    can carry a gradient)."""

    loss: torch.Tensor
    value: torch.Tensor
    per_token: torch.Tensor
    mask: torch.Tensor
    count: float
    signal: torch.Tensor


__all__ = ["LossTerms", "StepBatch", "TeacherInputs", "LossOutput"]
