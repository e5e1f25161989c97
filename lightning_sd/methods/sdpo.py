"""RL-feedback (SDPO, Huebotter et al. 2026): the teacher context for one rollout of a group.

The teacher sees the prompt, then a *successful sibling* rollout of the same prompt (never the rollout's
own text, reasoning blocks stripped), then the verifier's feedback on the rollout, then an instruction to
solve the original question. The rollout's own attempt is not shown. A rollout with neither a successful
sibling nor feedback has no privileged signal: its builder returns None and the row is masked out.
"""

from __future__ import annotations

import re

from lightning_sd.contexts import RowView

SUCCESS_REWARD = 1.0  # a rollout counts as successful when its reward is at least this

SDPO_SOLUTION = "\n\nCorrect solution:\n\n{solution}"
SDPO_FEEDBACK = "\n\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"
SDPO_INSTRUCTION = "\n\nCorrectly solve the original question."

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>.*\Z", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"\A.*?</think>", re.DOTALL | re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Remove `<think>...</think>` blocks, an unclosed `<think>...` tail and a `...</think>` head (a
    completion sampled after a prompt that already opened the block)."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_CLOSE.sub("", text)
    text = _THINK_OPEN.sub("", text)
    return text.strip()


def successful_sibling(row: RowView, success_reward: float = SUCCESS_REWARD) -> str | None:
    """The first sibling (in group order) whose reward reaches `success_reward`, or None.

    `row.siblings` never contains the row itself (`build_teacher_inputs` excludes its own index), so a
    rollout's own success is never used as its solution."""
    for text, reward in zip(row.siblings, row.sibling_rewards):
        if reward is not None and reward >= success_reward and text.strip():
            return text
    return None


def sdpo_context(record: dict, row: RowView, *, feedback: bool = True, strip: bool = True,
                 success_reward: float = SUCCESS_REWARD) -> str | None:
    """The SDPO teacher message for one rollout, or None when it has neither a successful sibling nor
    feedback (`feedback=False` ignores the verifier's feedback: scalar-reward runs)."""
    solution = successful_sibling(row, success_reward)
    if solution is not None and strip:
        solution = strip_reasoning(solution) or None
    note = row.feedback.strip() if (feedback and row.feedback) else ""
    if solution is None and not note:
        return None
    text = record["prompt"]
    if solution is not None:
        text += SDPO_SOLUTION.format(solution=solution)
    if note:
        text += SDPO_FEEDBACK.format(feedback=note)
    return text + SDPO_INSTRUCTION


__all__ = ["SUCCESS_REWARD", "SDPO_SOLUTION", "SDPO_FEEDBACK", "SDPO_INSTRUCTION", "strip_reasoning",
           "successful_sibling", "sdpo_context"]
