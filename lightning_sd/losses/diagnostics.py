"""What a clipped divergence leaves out: the share of the teacher's probability mass on the entries the clip
bounds (`clipped_teacher_mass`). A high share means most of what the teacher prefers is not taught at full
strength; with `entry_clip_mode="value"` those entries are even pushed down (see docs/losses.md, Clipping).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from .divergence import DivergenceOptions, per_token_divergence, takes_divergence_options
from .support import compute_dtype, entry_terms, full_support_logprobs, prepare_logits, token_logprobs, \
    topk_support_logprobs

__all__ = ["clipped_teacher_mass", "gradient_clipped_mass"]


@torch.no_grad()
def gradient_clipped_mass(log_s: Tensor, log_t: Tensor, beta: float, entry_clip: float) -> Tensor:
    """`[...]` teacher mass on the entries whose full-vocabulary KL gradient on the student logit exceeds
    `entry_clip` in magnitude, from the (temperature-scaled) log-probs `[..., V]` of both models, in closed
    form: forward KL (`beta=0`) `S - T`, reverse KL (`beta=1`) `S ((log S - log T) - KL(S||T))`."""
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0.0:
        grad = p_s - p_t
    elif beta == 1.0:
        grad = p_s * ((log_s - log_t) - (p_s * (log_s - log_t)).sum(-1, keepdim=True))
    else:
        raise ValueError(f"gradient_clipped_mass has a closed form for beta 0 or 1, got {beta}")
    return (p_t * (grad.abs() > entry_clip)).sum(-1)


@takes_divergence_options
@torch.no_grad()
def clipped_teacher_mass(
    student_logits: Tensor, teacher_logits: Tensor, *, tokens: Optional[Tensor] = None, **options: Any
) -> Tensor:
    """Per token (`[B, T]` from logits `[B, T, V]`), the teacher's probability mass at `temperature` on the
    entries that `entry_clip` bounds; 0 everywhere without a clip. Same options as `per_token_divergence`
    (the fields of `DivergenceOptions`), checked the same way.

    - `entry_clip_mode="value"`: entries whose divergence term exceeds `entry_clip` (on the loss's support:
      the top-k entries and the tail bucket for `support="topk"`, the sampled token for `"sampled"`).
    - `entry_clip_mode="gradient"`: vocabulary entries whose gradient on the student's (temperature-scaled)
      logit exceeds `entry_clip` in magnitude.
    """
    opts = DivergenceOptions(**options)
    opts.validate(student_logits.shape[-1])
    beta, support, temperature, entry_clip = opts.beta, opts.support, opts.temperature, opts.entry_clip
    dtype = compute_dtype(student_logits, teacher_logits)
    if entry_clip is None:
        return torch.zeros(student_logits.shape[:-1], dtype=dtype, device=student_logits.device)
    s = prepare_logits(student_logits.detach(), dtype, temperature)
    t = prepare_logits(teacher_logits.detach(), dtype, temperature)
    if opts.entry_clip_mode == "gradient" and support == "full" and float(beta) in (0.0, 1.0):
        return gradient_clipped_mass(full_support_logprobs(s), full_support_logprobs(t), float(beta), entry_clip)
    if opts.entry_clip_mode == "gradient":
        unclipped = replace(opts, temperature=1.0, entry_clip=None)  # s and t are scaled already
        with torch.enable_grad():
            s_var = s.clone().requires_grad_(True)
            value = per_token_divergence(s_var, t, tokens=tokens, **unclipped.as_kwargs())
            (grad,) = torch.autograd.grad(value.sum(), s_var)
        return (full_support_logprobs(t).exp() * (grad.abs() > entry_clip)).sum(-1)
    if support == "sampled":
        log_s_y, log_t_y = token_logprobs(s, tokens.long()), token_logprobs(t, tokens.long())
        return log_t_y.exp() * ((log_s_y - log_t_y) > entry_clip)
    if support == "full":
        log_s, log_t = full_support_logprobs(s), full_support_logprobs(t)
    else:
        index = torch.topk(s if opts.topk_from == "student" else t, int(opts.top_k), dim=-1, sorted=False).indices
        log_s, log_t = topk_support_logprobs(s, index, opts.tail), topk_support_logprobs(t, index, opts.tail)
    return (log_t.exp() * (entry_terms(log_s, log_t, float(beta)) > entry_clip)).sum(-1)
