"""Self-critique with "reason first" (OPSD's explicit variant): before scoring, the teacher *generates* an
analysis of the reference solution; that text then joins its context.

Per training batch: one greedy analysis per prompt (not per rollout) from the teacher's own weights
(`teacher.sampling_network`), at most `loss.reason_max_new_tokens` tokens; the rollout rows of a prompt
share it. The analysis is privileged context only: it is never trained on.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_sd.contexts import ContextBuilder, RowView
from lightning_sd.rollout import decode_completions, rollout_on, sampling_mode, stop_ids
from lightning_sd.sampling import SamplingConfig, sample

ANALYSIS_PROMPT = (
    "{prompt}\n\nA reference solution to this problem:\n<reference>\n{solution}\n</reference>\n\n"
    "Before solving the problem yourself, analyze the reference solution: what are its key steps, and why "
    "does each of them work? Write only the analysis."
)
ANALYSIS_SECTION = "\n\nYour own analysis of the reference solution:\n<analysis>\n{analysis}\n</analysis>"


def with_analysis(builder: ContextBuilder) -> ContextBuilder:
    """Wrap a builder so that a row's `extra["analysis"]` (when present) is appended to its context."""

    def build(record: dict, row: RowView) -> str | None:
        text = builder(record, row)
        analysis = row.extra.get("analysis")
        if text is None or not analysis:
            return text
        return text + ANALYSIS_SECTION.format(analysis=analysis.strip())

    return build


@torch.no_grad()
def generate_analyses(module: Any, records: list[dict], max_new_tokens: int) -> list[str]:
    """One greedy analysis per record, sampled from the teacher's weights under the trainer's precision
    (and in lock-step across ranks when a trainer is attached)."""
    for i, rec in enumerate(records):
        if rec.get("solution") is None:
            raise ValueError(f"loss.reason_first needs a reference 'solution' in every record; record "
                             f"{rec.get('id', i)!r} has none")
    enc = module.prompts.encode([ANALYSIS_PROMPT.format(prompt=r["prompt"], solution=r["solution"]) for r in records],
                                records, warn=False)
    ids, mask = enc.ids.to(module.device), enc.mask.to(module.device)
    config = SamplingConfig(n=1, max_new_tokens=max_new_tokens, do_sample=False)
    trainer = getattr(module, "_trainer", None)
    with module.teacher.sampling_network(module.student) as net:
        if trainer is not None:
            rollout = rollout_on(trainer, module, net, ids, mask, config, seed=0)
        else:
            with sampling_mode(net):
                rollout = sample(net, ids, mask, config, pad_token_id=module.pad_token_id,
                                 stop_token_ids=stop_ids(module.tokenizer))
    return decode_completions(module.tokenizer, rollout)


__all__ = ["ANALYSIS_PROMPT", "ANALYSIS_SECTION", "with_analysis", "generate_analyses"]
