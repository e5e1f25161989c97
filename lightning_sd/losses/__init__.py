"""Divergence library: per-token divergences, reductions and a memory-bounded chunked path.

Pure tensor functions (no Lightning). Convention: ``beta = 0`` forward KL(T||S),
``beta = 1`` reverse KL(S||T), in between the generalized JSD; the teacher T never
receives gradient. See ``docs/losses.md``.
"""

from .chunked import DEFAULT_CHUNK_SIZE, chunked_divergence
from .contrastive import contrastive_target_logits
from .diagnostics import clipped_teacher_mass
from .divergence import (
    ENTRY_CLIP_MODES,
    DivergenceOptions,
    EntryClipMode,
    Support,
    TopkFrom,
    entry_terms,
    per_token_divergence,
)
from .fused import fused_full_kl
from .reduction import ReduceMode, apply_importance_weight, completion_mask_skip_first, importance_weight, reduce_loss
from .support import MASKED_LOGIT

__all__ = [
    "per_token_divergence",
    "DivergenceOptions",
    "chunked_divergence",
    "clipped_teacher_mass",
    "contrastive_target_logits",
    "fused_full_kl",
    "completion_mask_skip_first",
    "reduce_loss",
    "importance_weight",
    "apply_importance_weight",
    "entry_terms",
    "MASKED_LOGIT",
    "DEFAULT_CHUNK_SIZE",
    "Support",
    "TopkFrom",
    "EntryClipMode",
    "ENTRY_CLIP_MODES",
    "ReduceMode",
]
