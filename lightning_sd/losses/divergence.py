"""Per-token divergences between a student S and a stop-gradient teacher T.

Direction convention (one ``beta`` for every divergence, the GKD/TRL convention):

- ``beta = 0``: forward KL, ``KL(T||S) = sum_v T (log T - log S)``; this is what
  ``F.kl_div(input=log S, target=log T, log_target=True)`` computes.
- ``beta = 1``: reverse KL, ``KL(S||T) = sum_v S (log S - log T)``.
- ``0 < beta < 1``: generalized JSD ``beta KL(T||M) + (1 - beta) KL(S||M)`` with
  ``M = beta T + (1 - beta) S`` (it tends to 0, not to a KL, at the endpoints).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, TypeVar

import torch
from torch import Tensor

from .fused import fused_full_kl
from .support import (
    compute_dtype,
    entry_terms,
    full_support_logprobs,
    prepare_logits,
    token_logprobs,
    topk_support_logprobs,
)

__all__ = [
    "Support",
    "TopkFrom",
    "EntryClipMode",
    "ENTRY_CLIP_MODES",
    "DivergenceOptions",
    "per_token_divergence",
    "entry_terms",
]

Support = Literal["full", "topk", "sampled"]
TopkFrom = Literal["student", "teacher"]
EntryClipMode = Literal["value", "gradient"]

_SUPPORTS = ("full", "topk", "sampled")
_TOPK_FROM = ("student", "teacher")
#: ``"value"``: clamp each entry's term from above (OPSD). ``"gradient"``: keep the value, clamp each entry
#: of the gradient w.r.t. the scaled student logits to ``[-c, c]`` (never reverses an entry's direction).
ENTRY_CLIP_MODES = ("value", "gradient")

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DivergenceOptions:
    """The keyword options shared by :func:`per_token_divergence`, :func:`chunked_divergence` and
    :func:`clipped_teacher_mass` (each takes them as ``**options``; this class is their one definition).

    Attributes:
        beta: the divergence. 0 forward KL(T||S), 1 reverse KL(S||T), in between the generalized
            JSD(beta) ``beta KL(T||M) + (1 - beta) KL(S||M)``, ``M = beta T + (1 - beta) S``.
        support: ``"full"`` vocabulary, ``"topk"`` entries, or ``"sampled"`` token only (reverse KL,
            ``beta=1``, needs the functions' ``tokens``).
        top_k: support size for ``"topk"`` (``1 <= top_k <= V``).
        topk_from: whose logits pick the top-k ids, ``"student"`` or ``"teacher"``.
        tail: top-k only. True adds one bucket with the leftover mass of each distribution; False
            renormalizes inside the support.
        temperature: both logits are divided by it first.
        entry_clip: per-entry clip ``c`` (None = off); what it clips is set by ``entry_clip_mode``.
        entry_clip_mode: ``"gradient"`` (default): the value is the unclipped divergence and, per token,
            its gradient w.r.t. the temperature-scaled student logits is clamped entrywise to ``[-c, c]``,
            so no entry's gradient changes sign. ``"value"``: every (token, entry) term is clamped from
            above at ``c`` before the vocabulary sum (OPSD v3); negative terms are kept, so the clipped KL
            can be < 0, and a clipped entry's logit is pushed by the remaining terms only (for forward KL,
            down, however much the teacher prefers it).

    Building one checks only the names (an unknown one is a ``TypeError`` naming it); :meth:`validate`
    checks the values against a vocabulary size.
    """

    beta: float = 0.0
    support: Support = "full"
    top_k: Optional[int] = None
    topk_from: TopkFrom = "student"
    tail: bool = True
    temperature: float = 1.0
    entry_clip: Optional[float] = None
    entry_clip_mode: EntryClipMode = "gradient"

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` with a clear message for any invalid option."""
        beta, support, top_k = self.beta, self.support, self.top_k
        if not _is_real(beta) or not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"beta must be a number in [0, 1] (0 = forward KL(T||S), 1 = reverse KL(S||T)), got {beta!r}"
            )
        if support not in _SUPPORTS:
            raise ValueError(f"unknown support {support!r}; expected one of {_SUPPORTS}")
        if support == "sampled" and beta != 1.0:
            raise ValueError(
                f"support='sampled' estimates the reverse KL only and needs beta=1.0, got beta={beta!r}; "
                "use support='full' or 'topk' for forward KL or JSD"
            )
        if support == "topk":
            if top_k is None:
                raise ValueError("support='topk' needs top_k (an int in [1, vocab_size]), got top_k=None")
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= vocab_size:
                raise ValueError(f"top_k must be an int in [1, vocab_size={vocab_size}], got {top_k!r}")
            if self.topk_from not in _TOPK_FROM:
                raise ValueError(f"topk_from must be one of {_TOPK_FROM}, got {self.topk_from!r}")
        if not _is_real(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.entry_clip is not None and (not _is_real(self.entry_clip) or self.entry_clip <= 0):
            raise ValueError(f"entry_clip must be None or a finite number > 0, got {self.entry_clip!r}")
        if not isinstance(self.entry_clip_mode, str) or self.entry_clip_mode not in ENTRY_CLIP_MODES:
            raise ValueError(f"entry_clip_mode must be one of {ENTRY_CLIP_MODES}, got {self.entry_clip_mode!r}")

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments, ``f(**options.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def takes_divergence_options(fn: _Fn) -> _Fn:
    """Show :class:`DivergenceOptions`' fields (types, defaults) as keyword-only parameters in the signature of
    ``fn`` (which takes them as ``**options``), so ``help()`` and ``inspect.signature`` list them."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(DivergenceOptions)
    ]
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return fn


def _sampled(s: Tensor, t: Tensor, tokens: Tensor, entry_clip: Optional[float]) -> Tensor:
    log_s_y = token_logprobs(s, tokens)
    log_t_y = token_logprobs(t, tokens)
    advantage = (log_s_y - log_t_y).detach()
    if entry_clip is not None:
        advantage = advantage.clamp(max=entry_clip)
    surrogate = advantage * log_s_y
    # value == advantage exactly; gradient == d(advantage.detach() * log S(y)).
    return surrogate - surrogate.detach() + advantage


def _composed(
    s: Tensor, t: Tensor, opts: DivergenceOptions, tokens: Optional[Tensor], value_clip: Optional[float]
) -> Tensor:
    """Per-token divergence from prepared (scaled, clamped) logits; ``value_clip`` clamps each entry term.

    ``opts.temperature`` and ``opts.entry_clip`` are not read here (the logits are already scaled)."""
    if opts.support == "sampled":
        return _sampled(s, t, tokens, value_clip)
    if opts.support == "full":
        log_s, log_t = full_support_logprobs(s), full_support_logprobs(t)
    else:
        source = s if opts.topk_from == "student" else t
        index = torch.topk(source.detach(), int(opts.top_k), dim=-1, sorted=False).indices
        log_s = topk_support_logprobs(s, index, opts.tail)
        log_t = topk_support_logprobs(t, index, opts.tail)

    terms = entry_terms(log_s, log_t, float(opts.beta))
    if value_clip is not None:
        terms = terms.clamp(max=value_clip)
    return terms.sum(dim=-1)


def _gradient_clipped(s: Tensor, t: Tensor, opts: DivergenceOptions, tokens: Optional[Tensor], clip: float) -> Tensor:
    """The unclipped divergence, backpropagating its gradient w.r.t. ``s`` clamped entrywise to ``[-clip, clip]``.

    ``s`` are the prepared student logits (they carry the graph back to the caller's logits). The gradient
    ``g`` of each token's divergence is taken on a detached copy, clamped, and attached through the
    surrogate ``(s * g).sum(-1)``, whose value is cancelled exactly; ``g`` is a constant for autograd, so
    the result is differentiable to first order only.
    """
    if not (torch.is_grad_enabled() and s.requires_grad):
        return _composed(s, t, opts, tokens, value_clip=None)
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        value = _composed(leaf, t, opts, tokens, value_clip=None)
        (g,) = torch.autograd.grad(value.sum(), leaf)
    g = g.clamp(min=-clip, max=clip)
    surrogate = (s * g).sum(dim=-1)
    # (surrogate - surrogate.detach()) is exactly 0, so the value is bit-identical to the unclipped one
    return value.detach() + (surrogate - surrogate.detach())


@takes_divergence_options
def per_token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, *, tokens: Optional[Tensor] = None, **options: Any
) -> Tensor:
    """Divergence between student and teacher next-token distributions, per token.

    Args:
        student_logits: ``[B, T, V]`` (or ``[N, V]``, any leading dims), any float dtype.
        teacher_logits: same shape; detached inside (the teacher never gets gradient).
        tokens: ``[B, T]`` long, the sampled ids; required for ``support="sampled"``.
        **options: the fields of :class:`DivergenceOptions` (``beta``: 0 forward KL(T||S), 1 reverse
            KL(S||T), in between generalized JSD(beta); ``support``, ``top_k``, ``topk_from``, ``tail``,
            ``temperature``, ``entry_clip``, ``entry_clip_mode``), with its defaults.

    Returns:
        ``[B, T]`` (``[N]``): float32, or float64 if an input is float64.

    ``"sampled"`` (reverse KL only, ``beta=1``) returns ``log S(y) - log T(y)`` with the gradient of
    ``(log S(y) - log T(y)).detach() * log S(y)``; with ``entry_clip`` in ``"value"`` mode both the value
    and the advantage are clamped from above, in ``"gradient"`` mode that gradient is clamped entrywise.

    ``-inf`` logits are masked entries: they are treated as the finite logit
    :data:`MASKED_LOGIT` (-1e5, after temperature), so value and gradient stay finite.
    Where one model masks an entry that the other gives mass p (an infinite KL), the
    entry costs about ``p * 1e5`` nats instead of ``inf``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)} (student and teacher must score the same tokens "
            "with the same vocabulary)"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    opts = DivergenceOptions(**options)
    opts.validate(student_logits.shape[-1])
    beta, support, temperature, entry_clip = opts.beta, opts.support, opts.temperature, opts.entry_clip
    if support == "sampled":
        if tokens is None:
            raise ValueError("support='sampled' needs tokens (the sampled ids, long, shape logits.shape[:-1])")
        if tokens.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"tokens shape {tuple(tokens.shape)} != logits shape without vocab {tuple(student_logits.shape[:-1])}"
            )
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")

    clip_gradient = entry_clip is not None and opts.entry_clip_mode == "gradient"
    if support == "full" and float(beta) in (0.0, 1.0) and (entry_clip is None or clip_gradient):
        # same value and gradient, without the [.., V] temporaries of the composed path (fused.py)
        return fused_full_kl(
            student_logits, teacher_logits, float(beta), temperature, grad_clip=entry_clip if clip_gradient else None
        )

    dtype = compute_dtype(student_logits, teacher_logits)
    s = prepare_logits(student_logits, dtype, temperature)
    t = prepare_logits(teacher_logits.detach(), dtype, temperature)
    tokens = tokens.long() if support == "sampled" else None
    if clip_gradient:
        return _gradient_clipped(s, t, opts, tokens, float(entry_clip))
    return _composed(s, t, opts, tokens, value_clip=entry_clip)
