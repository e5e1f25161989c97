"""Per-token supports: which vocabulary entries a divergence is summed over.

Every function here turns logits ``[..., V]`` into log-probabilities over a support
``[..., K]`` (``K = V`` for the full vocabulary, ``k`` or ``k + 1`` for top-k). All
outputs are finite: masked logits (``-inf``) are first replaced by :data:`MASKED_LOGIT`,
whose probability ``exp(MASKED_LOGIT - logsumexp)`` underflows to exactly 0 in float32
and float64, so ``0 * log 0`` terms become ``0 * finite = 0`` with no NaN in value or
gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MASKED_LOGIT",
    "compute_dtype",
    "prepare_logits",
    "full_support_logprobs",
    "topk_support_logprobs",
    "token_logprobs",
]

#: Finite stand-in for a masked (``-inf``) logit, in temperature-scaled units. Its
#: probability is exactly 0, so it only matters where the divergence is mathematically
#: infinite (one model masks an entry the other gives mass to): such an entry then costs
#: about ``p * (1e5 + logsumexp)`` nats instead of ``inf``.
MASKED_LOGIT: float = -1.0e5


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def prepare_logits(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """Cast to ``dtype``, divide by ``temperature``, clamp from below at :data:`MASKED_LOGIT`.

    Shape is preserved. ``-inf`` (and ``finfo.min``-style masks) become
    :data:`MASKED_LOGIT` and receive a zero gradient; NaN is propagated, not hidden.
    """
    x = logits.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    return torch.clamp(x, min=MASKED_LOGIT)


def full_support_logprobs(logits: Tensor) -> Tensor:
    """``log_softmax`` over the whole vocabulary: ``[..., V] -> [..., V]``."""
    return torch.log_softmax(logits, dim=-1)


def topk_support_logprobs(logits: Tensor, index: Tensor, tail: bool) -> Tensor:
    """Log-probs on the support ``index`` (``[..., k]``, long).

    ``tail=False``: renormalized inside the support, ``[..., k]``.
    ``tail=True``: log-probs of the full distribution on the support plus one last bucket
    holding the leftover mass ``1 - sum(support probs)``, ``[..., k + 1]``. The bucket is
    ``logsumexp(logits outside the support) - logsumexp(all logits)``: no cancellation,
    accurate even when the support holds almost all of the mass; an empty complement
    (``k = V``) gives a bucket at about :data:`MASKED_LOGIT`, i.e. probability 0.
    """
    support = logits.gather(-1, index)
    if not tail:
        return torch.log_softmax(support, dim=-1)
    lse_all = torch.logsumexp(logits, dim=-1, keepdim=True)
    outside = logits.scatter(-1, index, MASKED_LOGIT)
    lse_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
    return torch.cat([support - lse_all, lse_tail - lse_all], dim=-1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[..., tokens]``: ``[..., V], [...] -> [...]``."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entry_terms(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Per-entry divergence terms ``[..., K]`` from finite log-probs ``[..., K]``.

    Summing over the last dim gives forward KL(T||S) (beta=0), reverse KL(S||T) (beta=1)
    or the generalized JSD; the JSD entry is
    ``beta T (log T - log M) + (1 - beta) S (log S - log M)``. Inputs must be finite
    (entries with zero probability at a large negative finite log-prob), so
    ``0 * log 0`` evaluates as ``0 * finite = 0``.
    """
    if beta == 0.0:
        return torch.exp(log_t) * (log_t - log_s)
    if beta == 1.0:
        return torch.exp(log_s) * (log_s - log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * torch.exp(log_t) * (log_t - log_m) + (1.0 - beta) * torch.exp(log_s) * (log_s - log_m)
