"""Teacher-context builders: the privileged prompt the teacher sees for each rollout.

A builder is a function `(record, rollout_view) -> str | None` returning the teacher's *user message* for
one rollout row (the chat template is applied afterwards, identically to the student's prompt), or `None`
when the row has no privileged signal (the row is then masked out of the loss).

`rollout_view` is a `RowView` giving the row's own completion text and reward and its siblings' (the other
rollouts of the same prompt), which RL-feedback contexts need.

`loss.template` names one of `TEMPLATE_NAMES` (the format strings of `TEMPLATES`, plus `sdpo`, the
conditional RL-feedback context of `lightning_sd.methods.sdpo`) or is itself a format string over the
record's fields. `lightning_sd.methods.build_context(...)` turns the loss options into the builder the module
uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

TEMPLATES: dict[str, str] = {
    # the student's own prompt: with a live teacher the loss is exactly zero (alignment check)
    "student_prompt": "{prompt}",
    # OPSD, first version: reference solution, then understand-and-derive instruction
    "self_critique_v1": (
        "{prompt}\n\nA reference solution to this problem:\n<reference>\n{solution}\n</reference>\n\n"
        "Read the reference solution and understand why it works. Then solve the problem yourself, step by step, "
        "and arrive at the same final answer."
    ),
    # OPSD v3: adds the explicit "do not copy, use your own words" instruction
    "self_critique_v3": (
        "{prompt}\n\nHere is a reference solution, for you only:\n=== Reference solution ===\n{solution}\n"
        "=== End of reference solution ===\n\nStudy it until you understand every step, but do not copy it. "
        "Now solve the problem on your own, reasoning step by step in your own words, and reach the same "
        "final answer."
    ),
    # OPSD's later wording: reference between markers, "do not copy or paraphrase", and the student's own
    # format instruction repeated last (records need an `instruction` field: the arithmetic task has one)
    "self_critique_format_last": (
        "{prompt}\n\nHere is a reference solution, for you only:\n=== Reference solution ===\n{solution}\n"
        "=== End of reference solution ===\n\nDo not copy or paraphrase it. Solve the problem yourself. "
        "{instruction}"
    ),
    # a short hint with the answer, for very small models
    "answer_hint": "{prompt}\n(For reference, the correct answer is {answer}. Answer in your own words.)",
    # the answer alone, with no request about wording: the teacher keeps the student's register, so its
    # disagreement with the student sits on the answer-bearing tokens
    "answer_note": "{prompt}\n(The correct answer is {answer}.)",
    # the worked solution as a plain note, then the student's own format instruction last (needs `instruction`)
    "solution_note": "{prompt}\n\nCorrect worked solution: {solution}\n\n{instruction}",
    # SDFT's demonstration template
    "demonstration": (
        "{prompt}\n\nThis is an example for a response to the question:\n{solution}\n\n"
        "Now answer with a response of your own, including the thinking process."
    ),
    # a plain demonstration without the "thinking process" request (the wording TRL's SDFT trainer uses)
    "demonstration_plain": "{prompt}\n\nExample response:\n{solution}",
}


@dataclass
class RowView:
    """What a context builder may know about one rollout row."""

    completion: str = ""
    reward: float | None = None
    feedback: str | None = None
    siblings: list[str] = field(default_factory=list)  # other rollouts' texts of the same prompt
    sibling_rewards: list[float | None] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


ContextBuilder = Callable[[dict, RowView], "str | None"]


def template_context(template: str) -> ContextBuilder:
    """A builder that formats `template` with the record's fields (`{prompt}`, `{solution}`, `{answer}`, ...).

    A template that names a field the record lacks raises a KeyError naming the field."""
    text = TEMPLATES.get(template, template)

    def build(record: dict, row: RowView) -> str | None:
        try:
            return text.format(**record)
        except KeyError as err:
            raise KeyError(
                f"teacher context template {template!r} needs field {err.args[0]!r}, missing from record "
                f"id={record.get('id', '?')!r}; add it to the data or pick another loss.template"
            ) from None

    return build


# builders that are not a single format string (sections appear only when their content exists), by the kind of
# context they make: an "rl_feedback" context is built from the verifier's rewards and feedback of the row and of
# its siblings (`lightning_sd.methods.sdpo`)
BUILDER_TEMPLATES: dict[str, str] = {"sdpo": "rl_feedback"}
TEMPLATE_NAMES = tuple(TEMPLATES) + tuple(BUILDER_TEMPLATES)


def context_kind(template: str) -> str:
    """What kind of teacher context `loss.template` makes: "format" (a format string over the record's fields,
    whether a name of `TEMPLATES` or written out) or a builder's kind (`BUILDER_TEMPLATES`: "rl_feedback")."""
    return BUILDER_TEMPLATES.get(template, "format")


def check_template(template: str) -> None:
    """Raise a ValueError naming `loss.template` unless it is a known name or a format string."""
    if template in TEMPLATE_NAMES:
        return
    if "{" not in template:
        raise ValueError(f"loss.template={template!r} is neither a template name {TEMPLATE_NAMES} nor a format "
                         "string over the record's fields (e.g. '{prompt} Hint: {answer}')")


__all__ = ["TEMPLATES", "TEMPLATE_NAMES", "BUILDER_TEMPLATES", "RowView", "ContextBuilder", "template_context",
           "check_template", "context_kind"]
