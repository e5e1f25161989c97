"""The teacher context of a run: `build_context` turns the loss options (`loss.template`, `loss.feedback`,
`loss.strip_reasoning`, `loss.reason_first`) into the builder the module calls for every rollout row,
composing a format string of `lightning_sd.contexts`, the RL-feedback context of `sdpo` and the teacher's
analysis of `reason_first`.
"""

from __future__ import annotations

from lightning_sd.contexts import ContextBuilder, RowView, check_template, template_context
from lightning_sd.methods.reason_first import with_analysis
from lightning_sd.methods.sdpo import sdpo_context


def build_context(template: str, *, feedback: bool = True, strip_reasoning: bool = True,
                  reason_first: bool = False) -> ContextBuilder:
    """The teacher-context builder for the loss options: `template` (a name or a format string);
    `feedback` / `strip_reasoning` configure `sdpo`; `reason_first` appends the teacher's generated
    analysis (`RowView.extra["analysis"]`, see `lightning_sd.methods.reason_first`)."""
    check_template(template)
    if template == "sdpo":
        def builder(record: dict, row: RowView) -> str | None:
            return sdpo_context(record, row, feedback=feedback, strip=strip_reasoning)
    else:
        builder = template_context(template)
    if reason_first:
        builder = with_analysis(builder)
    return builder


__all__ = ["build_context"]
