"""Completion masks, loss reductions and importance weights.

The reductions take *global* counts so that, under gradient accumulation and data
parallelism, summing the losses of all micro-batches of one optimizer step gives exactly
the loss (and gradient) of the whole step computed at once.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor

__all__ = ["ReduceMode", "completion_mask_skip_first", "reduce_loss", "importance_weight"]

ReduceMode = Literal["token_mean", "sequence_mean", "sum"]
_MODES = ("token_mean", "sequence_mean", "sum")

Count = Union[int, float, Tensor]


def completion_mask_skip_first(mask: Tensor, n: int) -> Tensor:
    """Zero the first ``n`` valid tokens of every row of ``mask`` ``[B, T]``.

    Rows may have different lengths; a row with at most ``n`` valid tokens becomes all
    zero. Returns a new mask with the dtype and shape of ``mask``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if mask.dim() < 1:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if n == 0:
        return mask.clone()
    valid = mask != 0
    rank = torch.cumsum(valid.to(torch.int64), dim=-1)  # 1-based index among valid tokens
    keep = valid & (rank > n)
    return torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))


def _count(value: Optional[Count], default: Tensor, like: Tensor) -> Tensor:
    count = default if value is None else torch.as_tensor(value, device=like.device)
    return count.to(torch.promote_types(like.dtype, torch.float32)).clamp(min=1)


def reduce_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: ReduceMode,
    *,
    num_tokens: Optional[Count] = None,
    num_sequences: Optional[Count] = None,
) -> Tensor:
    """Reduce ``per_token`` ``[B, T]`` over the valid entries of ``mask`` ``[B, T]`` to a scalar.

    - ``"token_mean"``: ``sum(per_token * mask) / num_tokens``. Pass ``num_tokens`` = the
      GLOBAL number of valid tokens of the optimizer step (all micro-batches, all
      ranks); default ``mask.sum()`` (this micro-batch only).
    - ``"sequence_mean"``: mean over each row's valid tokens (rows without valid tokens
      give 0), summed over rows and divided by ``num_sequences`` = the GLOBAL number of
      sequences of the step (default ``B``).
    - ``"sum"``: ``sum(per_token * mask)``.

    Counts below 1 are treated as 1. Masked-out positions are excluded with
    ``torch.where``, so NaN/inf there never reaches the loss or the gradient.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown reduction mode {mode!r}; expected one of {_MODES}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    valid = mask != 0
    weight = mask.to(per_token.dtype)
    masked = torch.where(valid, per_token * weight, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "sum":
        return masked.sum()
    if mode == "token_mean":
        return masked.sum() / _count(num_tokens, weight.sum(), per_token)
    if per_token.dim() != 2:
        raise ValueError(f"sequence_mean needs per_token [B, T], got shape {tuple(per_token.shape)}")
    row_tokens = weight.sum(dim=-1).clamp(min=1)
    row_mean = masked.sum(dim=-1) / row_tokens
    default_sequences = torch.tensor(per_token.shape[0], device=per_token.device)
    return row_mean.sum() / _count(num_sequences, default_sequences, per_token)


def importance_weight(logp: Tensor, behaviour_logp: Tensor, clip: Optional[float] = 2.0) -> Tensor:
    """Detached token-level IS weight ``exp(clamp(logp - behaviour_logp, -20, 20))``.

    Clamped from above at ``clip`` (``None``: no upper clamp). Shapes broadcast, e.g.
    ``[B, T]`` log-probs of the sampled tokens under the trainer and the sampler.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or > 0, got {clip!r}")
    with torch.no_grad():
        log_ratio = (logp.detach() - behaviour_logp.detach()).clamp(-20.0, 20.0)
        weight = torch.exp(log_ratio)
        if clip is not None:
            weight = weight.clamp(max=clip)
    return weight


def apply_importance_weight(values: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``values`` times the detached IS weights ``weight`` (cast to ``values``' dtype and device): the one place
    the truncated importance-sampling correction enters a loss. ``None`` leaves ``values`` unchanged.

    Shapes broadcast: per-token terms ``[R, C]`` or ``[N]`` with weights of the same shape, or per-row
    coefficients ``[R, 1]`` (a GRPO advantage) with ``[R, C]`` weights, giving ``[R, C]``.
    """
    if weight is None:
        return values
    return values * weight.detach().to(device=values.device, dtype=values.dtype)
