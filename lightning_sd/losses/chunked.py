"""Memory-bounded per-token divergence straight from hidden states and LM-head weights.

The logits of both models are built ``chunk_size`` tokens at a time, in forward and again
in backward (nothing of size ``[N, V]`` is ever saved), so the extra memory of the loss is
O(chunk_size * V) instead of O(N * V).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .divergence import DivergenceOptions, per_token_divergence, takes_divergence_options
from .support import compute_dtype

__all__ = ["chunked_divergence", "DEFAULT_CHUNK_SIZE"]

#: Tokens per chunk. At V = 49152 one float32 ``[chunk, V]`` tensor is 96 MiB.
DEFAULT_CHUNK_SIZE: int = 512


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(hidden, weight, bias)


class _ChunkedDivergence(torch.autograd.Function):
    """Forward: per-token divergence ``[N]``; backward: recompute each chunk's logits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Optional[Tensor],
        t_hidden: Tensor,
        t_weight: Tensor,
        t_bias: Optional[Tensor],
        tokens: Optional[Tensor],
        chunk_size: int,
        options: Dict[str, Any],
    ) -> Tensor:
        n = s_hidden.shape[0]
        out_dtype = compute_dtype(s_hidden, s_weight, t_hidden, t_weight)
        out = torch.empty(n, dtype=out_dtype, device=s_hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            s_logits = _logits(s_hidden[start:stop], s_weight, s_bias)
            t_logits = _logits(t_hidden[start:stop], t_weight, t_bias)
            tok = None if tokens is None else tokens[start:stop]
            out[start:stop] = per_token_divergence(s_logits, t_logits, tokens=tok, **options)
            del s_logits, t_logits
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens)
        ctx.chunk_size = chunk_size
        ctx.options = options
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = s_hidden.shape[0]
        acc = torch.promote_types(s_weight.dtype, torch.float32)
        grad_h = torch.empty_like(s_hidden) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if need_b else None
        if need_h or need_w or need_b:
            for start in range(0, n, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, n)
                h = s_hidden[start:stop]
                t_logits = _logits(t_hidden[start:stop], t_weight, t_bias)
                tok = None if tokens is None else tokens[start:stop]
                with torch.enable_grad():
                    s_logits = _logits(h, s_weight, s_bias).requires_grad_(True)
                    value = per_token_divergence(s_logits, t_logits, tokens=tok, **ctx.options)
                    (g,) = torch.autograd.grad(value, s_logits, grad_out[start:stop].to(value.dtype))
                del value, s_logits, t_logits
                if need_h:
                    grad_h[start:stop] = g @ s_weight
                if need_w:
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
                if need_b:
                    grad_b += g.sum(dim=0).to(acc)
                del g
        if grad_w is not None:
            grad_w = grad_w.to(s_weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(s_bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


@takes_divergence_options
def chunked_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    tokens: Optional[Tensor] = None,
    **options: Any,
) -> Tensor:
    """Per-token divergence from hidden states, without materializing ``[N, V]`` logits.

    Equals ``per_token_divergence(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, ...)`` in value and gradient
    (same ``beta`` direction: 0 forward KL(T||S), 1 reverse KL(S||T)).

    Args:
        student_hidden: ``[N, H]`` (or ``[..., H]``), final hidden states of the student.
        student_weight: ``[V, H]`` student LM head; ``student_bias``: ``[V]`` or None.
        teacher_hidden: ``[N, H']`` (or ``[..., H']``, same leading dims); detached.
        teacher_weight: ``[V, H']`` teacher LM head (same V); ``teacher_bias``: ``[V]`` or None.
        chunk_size: tokens per chunk; extra memory is O(chunk_size * V).
        tokens: ``[N]`` (same leading dims as the hidden states), for ``support="sampled"``.
        **options: the fields of :class:`DivergenceOptions`, as for :func:`per_token_divergence`.

    Returns:
        ``[N]`` (leading dims of ``student_hidden``), float32 or float64.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` only; the
    backward recomputes each chunk's logits from the saved inputs. With ``entry_clip`` in
    ``"gradient"`` mode the clamped gradient is the one w.r.t. each chunk's (scaled) logits,
    carried back through the LM head as in the unclipped case.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if student_hidden.dim() < 1 or teacher_hidden.dim() < 1:
        raise ValueError("student_hidden and teacher_hidden must be [N, H] tensors")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(
            f"weights must be [V, H]: student_weight {tuple(student_weight.shape)}, "
            f"teacher_weight {tuple(teacher_weight.shape)}"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student_weight {tuple(student_weight.shape)} has V={student_weight.shape[0]}, "
            f"teacher_weight {tuple(teacher_weight.shape)} has V={teacher_weight.shape[0]}"
        )
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and student_weight {tuple(student_weight.shape)} "
            "disagree on the hidden size"
        )
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight {tuple(teacher_weight.shape)} "
            "disagree on the hidden size"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must cover the same tokens (same leading dims)"
        )
    opts = DivergenceOptions(**options)
    vocab = student_weight.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and tuple(b.shape) != (vocab,):
            raise ValueError(f"{name} must have shape ({vocab},), got {tuple(b.shape)}")
    opts.validate(vocab)
    lead = student_hidden.shape[:-1]
    flat_tokens = None
    if opts.support == "sampled":
        if tokens is None:
            raise ValueError("support='sampled' needs tokens (the sampled ids, long, shape hidden.shape[:-1])")
        if tokens.shape != lead:
            raise ValueError(f"tokens shape {tuple(tokens.shape)} != hidden leading shape {tuple(lead)}")
        flat_tokens = tokens.reshape(-1)
    out = _ChunkedDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        flat_tokens,
        chunk_size,
        opts.as_kwargs(),
    )
    return out.reshape(lead)
