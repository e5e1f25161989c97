"""The training batch, in one place: `StepBatch` is a dataclass whose fields say who writes each and its shape.
The data module's collator creates it with the prompt fields, the rollout callback (`OnPolicyGeneration`) adds
the rollout and the verifier's verdicts, the module what the step computed (`loss_terms`, `diagnostics`) for the
callbacks that show it. `TeacherInputs` and `LossOutput` type the two other records of a step: the teacher's
prompts and the reduced loss.

Shapes: B prompts, R = B x n rollout rows (rows of one prompt adjacent), P prompt length (left-padded), C
completion length (right-padded), k the teacher alternatives kept per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict

import torch

from lightning_sd.sampling import Rollout


class LossTerms(TypedDict, total=False):
    """What the step trained on, per token (written by the module, read by `TokenView` and `SampleLogger`):
    `per_token` `[R, C]` the loss terms (detached), `mask` `[R, C]` the tokens they count on, and, on the steps a
    callback asks for it (`wants_teacher_topk`), `teacher_topk`: `{"ids": [R, C, k], "probs": [R, C, k]}`."""

    per_token: torch.Tensor
    mask: torch.Tensor
    teacher_topk: dict[str, torch.Tensor]


@dataclass
class StepBatch:
    """One training micro-batch (also an evaluation batch: the collator's fields only). A field is None until
    its writer has run; callbacks read it with attribute access (`batch.rollout`).

    From the collator (`PromptCollator`):
    - `records`: the B raw records, privileged fields included.
    - `prompt_ids` / `prompt_mask`: `[B, P]` the chat-formatted prompts, left-padded (mask 1 on prompt tokens).
    - `prompt_text`: the B chat-formatted prompts.

    From the rollout callback (`OnPolicyGeneration`):
    - `on_policy`: True when it sampled this batch; False when the batch trains on the dataset's completions (SFT,
      or on-policy KD's dataset batches with `loss.lmbda < 1`); None when no rollout callback saw the batch.
    - `rollout`: the R rows (`Rollout`: `prompt_ids` / `prompt_mask` `[R, P]`, `completion_ids` /
      `completion_mask` / `logprobs` `[R, C]`); the module builds it from the records' solutions when none was
      sampled.
    - `completion_text`: the R decoded completions (the reference solutions on a dataset batch).
    - `gen_seconds`: the sampling time.
    - with a verifier: `rewards` (R floats, None where the verifier failed), `feedback` (R str or None) and
      `verifier_failures` (count in this batch).

    From the module's training step:
    - `loss_terms` (`LossTerms`): what the step trained on, per token.
    - `diagnostics`: the step's diagnostics, plain floats by name (`SelfDistillationModule.step_diagnostics`).
    - `analyses`: with `loss.reason_first`, the teacher's B generated analyses of the reference solutions.

    Lightning moves it to the device as it moves any dataclass: the tensors (the rollout's included) move, lists,
    strings and numbers stay as they are."""

    records: list[dict]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_text: list[str] = field(default_factory=list)
    on_policy: bool | None = None
    rollout: Rollout | None = None
    completion_text: list[str] | None = None
    gen_seconds: float | None = None
    rewards: list[float | None] | None = None
    feedback: list[str | None] | None = None
    verifier_failures: int | None = None
    loss_terms: LossTerms | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    analyses: list[str] | None = None


COLLATOR_FIELDS = ("records", "prompt_ids", "prompt_mask")  # what every batch needs from its data loader


def as_step_batch(batch: StepBatch | Mapping[str, Any]) -> StepBatch:
    """`batch` itself when it is a `StepBatch`; a mapping (the batch of a data loader of one's own: at least
    `records`, `prompt_ids` `[B, P]`, `prompt_mask` `[B, P]`, any other key a `StepBatch` field) as one.
    Raises ValueError naming the keys that are missing or not fields."""
    if isinstance(batch, StepBatch):
        return batch
    names = [f.name for f in fields(StepBatch)]
    missing = [k for k in COLLATOR_FIELDS if k not in batch]
    unknown = sorted(set(batch) - set(names))
    if missing or unknown:
        raise ValueError(f"a batch needs the keys {list(COLLATOR_FIELDS)} and no others than the fields of "
                         f"lightning_sd.batch.StepBatch {names}: missing {missing}, unknown {unknown} (per-record "
                         "data belongs in the records)")
    return StepBatch(**batch)


@dataclass
class TeacherInputs:
    """The teacher's prompts for each rollout row (the method's `TeacherPrompts`): `prompt_ids` / `prompt_mask`
    `[R, P']` (left-padded), `row_mask` `[R]` bool (False: no privileged context, the row is left out of the loss),
    `texts` (the R teacher messages). Without a teacher forward (`without_teacher`) only `row_mask`, all True."""

    row_mask: torch.Tensor
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)

    @classmethod
    def without_teacher(cls, rollout: Rollout) -> TeacherInputs:
        rows = rollout.completion_ids.size(0)
        return cls(row_mask=torch.ones(rows, dtype=torch.bool, device=rollout.completion_ids.device))


@dataclass
class LossOutput:
    """A step's reduced loss (`Scorer.reduce`): `loss` the scalar to backpropagate (the *sum* of the terms; the
    gradients are normalized over the optimizer step), `value` the normalized loss for logging, `per_token` /
    `mask` `[R, C]`, `count` the local normalizer, `signal` `[R, C]` bool (the tokens that can carry a gradient)."""

    loss: torch.Tensor
    value: torch.Tensor
    per_token: torch.Tensor
    mask: torch.Tensor
    count: float
    signal: torch.Tensor


__all__ = ["LossTerms", "StepBatch", "as_step_batch", "TeacherInputs", "LossOutput"]
