"""SFT, the off-policy baseline: cross-entropy on the record's reference completion.

`reference_rollout` turns each record's `solution` (worked solution / demonstration) into a `Rollout`,
exactly as if the student had sampled it: the completion is the solution's tokens followed by EOS,
right-padded, after the same left-padded chat-formatted prompt. The same student (and teacher) forward
code then scores it; on-policy KD uses it too for its dataset batches (`loss.lmbda < 1`).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_sd.methods.base import Method, Step, Terms, register
from lightning_sd.sampling import Rollout

DATASET = "dataset"  # `Rollout.extras["source"]` of completions that were not sampled


def reference_rollout(records: list[dict], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokenizer: Any, *,
                      pad_token_id: int, field: str = "solution", max_new_tokens: int | None = None) -> Rollout:
    """A `Rollout` with R = B rows whose completions are `record[field]` + EOS.

    `prompt_ids`/`prompt_mask`: `[B, P]` left-padded student prompts. `max_new_tokens` caps the completion
    (then it is `truncated`, without EOS). `logprobs` are zeros and `extras["source"] == "dataset"`: these
    tokens were not sampled, so importance weights do not apply."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: reference completions need one to end on")
    rows, truncated = [], []
    for i, rec in enumerate(records):
        text = rec.get(field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"record {rec.get('id', i)!r} has no {field!r}: loss=sft and dataset batches of "
                             f"loss=on_policy_kd (loss.lmbda < 1) train on the reference completion; add it to "
                             f"the data")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [int(eos)]
        cut = max_new_tokens is not None and len(ids) > max_new_tokens
        rows.append(ids[:max_new_tokens] if cut else ids)
        truncated.append(cut)
    width = max(len(r) for r in rows)
    device = prompt_ids.device
    completion = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(), completion_ids=completion.to(device),
                   completion_mask=mask.to(device), logprobs=torch.zeros(completion.shape, device=device),
                   truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
                   prompt_index=torch.arange(len(rows), device=device), extras={"source": DATASET})


def is_dataset_rollout(rollout: Rollout) -> bool:
    return rollout.extras.get("source") == DATASET


def nll_terms(logp: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy `[R, C]` from the student's log-probs of the reference tokens."""
    return -logp


@register
class Sft(Method):
    """`loss=sft`: cross-entropy on the dataset's reference completions; no rollout, no teacher."""

    name = "sft"
    samples = False
    teacher = False
    distills = False

    def terms(self, step: Step) -> Terms:
        return Terms(nll_terms(step.logprobs()), step.mask)


__all__ = ["DATASET", "reference_rollout", "is_dataset_rollout", "nll_terms", "Sft"]
