"""The teacher context of a run: `build_context` turns the loss options (`loss.template`, `loss.feedback`,
`loss.strip_reasoning`, `loss.reason_first`) into the builder called for every rollout row, composing a format
string of `lightning_sd.contexts`, the RL-feedback context of `sdpo` and the teacher's analysis of `reason_first`;
`TeacherPrompts` turns those texts into the teacher's prompt tensors (`batch.TeacherInputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_sd.batch import StepBatch, TeacherInputs
from lightning_sd.contexts import ContextBuilder, RowView, check_template, context_kind, template_context
from lightning_sd.data.prompts import PromptEncoder
from lightning_sd.methods.reason_first import with_analysis
from lightning_sd.methods.sdpo import sdpo_context


def build_context(template: str, *, feedback: bool = True, strip_reasoning: bool = True,
                  reason_first: bool = False) -> ContextBuilder:
    """The teacher-context builder for the loss options: `template` (a name or a format string);
    `feedback` / `strip_reasoning` configure `sdpo`; `reason_first` appends the teacher's generated
    analysis (`RowView.extra["analysis"]`, see `lightning_sd.methods.reason_first`)."""
    check_template(template)
    if context_kind(template) == "rl_feedback":
        def builder(record: dict, row: RowView) -> str | None:
            return sdpo_context(record, row, feedback=feedback, strip=strip_reasoning)
    else:
        builder = template_context(template)
    if reason_first:
        builder = with_analysis(builder)
    return builder


@dataclass
class TeacherPrompts:
    """The teacher's prompt for each rollout row: `context(record, RowView)`, the row's view holding its
    completion, reward, feedback and its siblings' (the other rollouts of its prompt); None means the row has no
    privileged signal: it gets the student's prompt and is left out of the loss (`row_mask`). The texts are
    chat-formatted and tokenized by the run's `PromptEncoder`, as the student's are."""

    context: ContextBuilder
    prompts: PromptEncoder

    @staticmethod
    def placebo_records(records: list[dict]) -> list[dict]:
        """Each record's placebo: the next record's fields in the batch, with this record's own `prompt` (and
        `instruction`)."""
        return [{**records[(i + 1) % len(records)], **{k: rec[k] for k in ("prompt", "instruction") if k in rec}}
                for i, rec in enumerate(records)]

    def __call__(self, batch: StepBatch, *, placebo: bool = False, analyses: list[str] | None = None) -> TeacherInputs:
        """`TeacherInputs` `[R, P']` for the batch's rollout. `placebo=True` (the contrastive teacher): the same
        context around the *next* record's fields in the batch, with this record's own `prompt` (and
        `instruction`). `analyses`: one per record (`loss.reason_first`), in `RowView.extra["analysis"]`."""
        rollout = batch.rollout
        records = self.placebo_records(batch.records) if placebo else batch.records
        rows = rollout.prompt_ids.size(0)
        n = rows // len(records)
        completions = batch.completion_text or [""] * rows
        rewards, feedback = batch.rewards, batch.feedback
        texts, row_mask, owners = [], [], []
        for r in range(rows):
            i = int(rollout.prompt_index[r])
            group = range(i * n, (i + 1) * n)
            view = RowView(completion=completions[r], reward=None if rewards is None else rewards[r],
                           feedback=None if feedback is None else feedback[r],
                           siblings=[completions[j] for j in group if j != r],
                           sibling_rewards=[None if rewards is None else rewards[j] for j in group if j != r],
                           extra={} if analyses is None else {"analysis": analyses[i]})
            text = self.context(records[i], view)
            row_mask.append(text is not None)
            texts.append(text if text is not None else records[i]["prompt"])
            owners.append(records[i])
        enc = self.prompts.encode(texts, owners)
        device = rollout.completion_ids.device
        return TeacherInputs(row_mask=torch.tensor(row_mask, dtype=torch.bool, device=device),
                             prompt_ids=enc.ids.to(device), prompt_mask=enc.mask.to(device), texts=texts)


__all__ = ["TeacherPrompts", "build_context"]
