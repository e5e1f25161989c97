"""The objective: which divergence, on which tokens, reduced how. `LossConfig` carries every key of the
Hydra `loss` group (each option sets them all, null where unused); `distillation_terms` turns student and
teacher completion logits into per-token losses and the mask they count on.

Sign convention (see docs/concepts.md): `beta=0` is the forward KL(T||S), `beta=1` the reverse KL(S||T).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import torch

from lightning_sd.contexts import check_template, context_kind
from lightning_sd.losses import (
    DivergenceOptions,
    apply_importance_weight,
    per_token_divergence,
)
from lightning_sd.losses.support import compute_dtype
from lightning_sd.methods.base import METHODS, Method, distillation_names, method_class

LOSS_NAMES = tuple(METHODS)  # the built-in methods (`lightning_sd.methods`)
# losses whose whole signal is a teacher's divergence on the completion (they accept `lmbda`, `reason_first`)
DISTILLATION_NAMES = distillation_names()
SUPPORTS = ("full", "topk", "sampled")
REDUCTIONS = ("token_mean", "sequence_mean", "sum")


RENAMED_KEYS = {"lam": "grpo_mix"}  # a `loss` key of earlier versions -> its name now


def check_renamed_keys(keys: Iterable[str], error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the new key when `keys` holds a renamed `loss` key (`loss.lam`)."""
    for key in keys:
        if key in RENAMED_KEYS:
            raise error(f"loss.{key} was renamed loss.{RENAMED_KEYS[key]} (the share of GRPO in the loss: "
                        f"rl_feedback trains grpo_mix * GRPO + (1 - grpo_mix) * SDPO); write "
                        f"loss.{RENAMED_KEYS[key]}=...")


def with_current_names(values: Mapping[str, Any]) -> dict:
    """A `loss` config stored by an earlier version (a run's result file) with its renamed keys under their
    names now, e.g. for `LossConfig(**with_current_names(stored))`."""
    return {RENAMED_KEYS.get(key, key): value for key, value in values.items()}


@dataclass
class LossConfig:
    """All knobs of the objective.

    - divergence: `beta` (0 forward KL(T||S), 1 reverse KL(S||T), else generalized JSD), `support`,
      `top_k`, `topk_from`, `tail`, `temperature` (divides both logits), `entry_clip` (per-entry clip `c`,
      null = off) and `entry_clip_mode`: `gradient` (default) keeps the unclipped divergence as the loss and
      clamps each entry of its gradient w.r.t. the scaled student logits to `[-c, c]`, so no entry is pushed
      against the teacher's direction; `value` clamps each entry's term from above before the sum, as the
      OPSD paper does (it can push the teacher's preferred entries down; see docs/losses.md).
    - tokens: `skip_first` completion tokens are not trained (SDFT: 3); `is_clip` caps the token-level
      importance weight between the trainer and the sampler (SDPO: 2; null = off).
    - `reduction`: `token_mean` / `sequence_mean` / `sum`, normalized by the *global* count of the optimizer
      step (all micro-batches, all ranks).
    - teacher context: `template` (a name in `lightning_sd.contexts.TEMPLATES` or a format string).
    - `chunk_size`: when set, the memory-bounded path computes the loss from hidden states chunk by chunk.
    - `name`: the method, a name in `lightning_sd.methods.METHODS` or the dotted path of a user's own `Method`
      subclass (`package.module.Class`; a config may write it as `_target_`).
    - method-specific keys (null/default where unused): `grpo_mix` (GRPO share of the loss: `rl_feedback` mixes
      `grpo_mix * GRPO + (1 - grpo_mix) * SDPO`, `grpo` is `grpo_mix=1`), `reason_first` /
      `reason_max_new_tokens` (the teacher first generates an analysis of the reference solution), `lmbda`
      (fraction of batches on student samples; the rest use dataset completions), `feedback` /
      `strip_reasoning` (the `sdpo` context), `contrast` (alpha of the contrastive teacher: the target is the
      student moved by alpha times the difference between the teacher with the real context and with a placebo
      context, another record's, in the same template; null = the plain teacher; see `losses.contrastive`).
      `lam` was renamed `grpo_mix` (`RENAMED_KEYS`): passing it is an error naming the new key.
    """

    name: str = "distill"
    beta: float = 0.0
    support: str = "full"
    top_k: int | None = None
    topk_from: str = "student"
    tail: bool = True
    temperature: float = 1.0
    entry_clip: float | None = None
    entry_clip_mode: str = "gradient"
    skip_first: int = 0
    reduction: str = "token_mean"
    is_clip: float | None = None
    template: str = "self_critique_v3"
    chunk_size: int | None = None
    grpo_mix: float = 0.0
    reason_first: bool = False
    reason_max_new_tokens: int = 128
    lmbda: float = 1.0
    contrast: float | None = None
    feedback: bool = True
    strip_reasoning: bool = True
    nonfinite: str = "skip"
    nonfinite_limit: int | None = 10

    def __new__(cls, *args, **kwargs):  # before the dataclass's __init__ rejects the key as unexpected
        check_renamed_keys(kwargs, TypeError)
        return super().__new__(cls)

    def method(self) -> Method:
        """The method object these options select (`loss.name`, or `loss._target_`), made once per name."""
        made = self.__dict__.get("_method")
        if made is None or made[0] != self.name:
            made = self.__dict__["_method"] = (self.name, method_class(self.name)(self))
        return made[1]

    @property
    def needs_teacher(self) -> bool:
        """Whether the method runs a teacher (False for `sft`, `grpo`, `rl_feedback` with `grpo_mix=1`)."""
        return self.method().needs_teacher

    def validate(self) -> None:
        """Reject impossible combinations with a message naming the option."""
        method = self.method()
        if self.support not in SUPPORTS:
            raise ValueError(f"loss.support={self.support!r} is not one of {SUPPORTS}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"loss.beta={self.beta} must be in [0, 1] (0 forward KL, 1 reverse KL)")
        if self.support == "sampled" and self.beta != 1.0:
            raise ValueError(
                f"loss.support=sampled estimates the reverse KL only: set loss.beta=1 (got loss.beta={self.beta}) "
                "or use loss.support=full|topk"
            )
        if self.support == "topk" and (self.top_k is None or self.top_k < 1):
            raise ValueError(f"loss.support=topk needs loss.top_k >= 1 (got {self.top_k})")
        if self.topk_from not in ("student", "teacher"):
            raise ValueError(f"loss.topk_from={self.topk_from!r} must be 'student' or 'teacher'")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"loss.reduction={self.reduction!r} is not one of {REDUCTIONS}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.skip_first < 0:
            raise ValueError(f"loss.skip_first must be >= 0, got {self.skip_first}")
        if self.entry_clip is not None and not self.entry_clip > 0:
            raise ValueError(f"loss.entry_clip must be > 0 or null, got {self.entry_clip}")
        if self.entry_clip_mode not in ("value", "gradient"):
            raise ValueError(f"loss.entry_clip_mode={self.entry_clip_mode!r} is not one of ('value', 'gradient') "
                             "(gradient: clamp each entry's gradient; value: clamp each entry's term, as OPSD)")
        if self.is_clip is not None and not self.is_clip > 0:
            raise ValueError(f"loss.is_clip must be > 0 or null, got {self.is_clip}")
        if not 0.0 <= self.grpo_mix <= 1.0:
            raise ValueError(f"loss.grpo_mix must be in [0, 1], got {self.grpo_mix}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"loss.lmbda must be in [0, 1], got {self.lmbda}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1 or null, got {self.chunk_size}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"loss.nonfinite={self.nonfinite!r} must be 'skip' or 'stop'")
        if self.nonfinite_limit is not None and self.nonfinite_limit < 1:
            raise ValueError(f"loss.nonfinite_limit must be >= 1 or null (never stop), got {self.nonfinite_limit}")
        check_template(self.template)
        if self.reason_max_new_tokens < 1:
            raise ValueError(f"loss.reason_max_new_tokens must be >= 1, got {self.reason_max_new_tokens}")
        method.validate()
        if self.contrast is not None:
            if not self.contrast > 0:
                raise ValueError(f"loss.contrast must be > 0 (the step toward the teacher's context) or null, got "
                                 f"{self.contrast}")
            if self.chunk_size is not None:
                raise ValueError("loss.contrast combines the student's and both teachers' logits: it does not work "
                                 "with the memory-bounded loss; set loss.chunk_size=null")
            if context_kind(self.template) != "format":
                raise ValueError("loss.contrast needs a format-string teacher template (a placebo is the same "
                                 "template around another record's fields), not loss.template=sdpo")

    @classmethod
    def from_dict(cls, values: dict | None) -> "LossConfig":
        values = dict(values or {})
        if "_target_" in values:  # a user's own method class (Hydra's spelling)
            values["name"] = values.pop("_target_")
        check_renamed_keys(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; valid keys: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def divergence_options(self) -> DivergenceOptions:
        """The divergence options of this config (its keys named like `DivergenceOptions`' fields)."""
        return DivergenceOptions(**{f.name: getattr(self, f.name) for f in fields(DivergenceOptions)})

    def divergence_kwargs(self) -> dict:
        """`divergence_options()` as keyword arguments for `per_token_divergence` and its siblings."""
        return self.divergence_options().as_kwargs()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`[R, C, V]` logits, `[R, C]` tokens -> `[R, C]` log-probs of those tokens (float32; float64 for float64
    logits)."""
    logp = (logits.to(compute_dtype(logits)) / temperature).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                               chunk_size: int, temperature: float = 1.0) -> torch.Tensor:
    """`[N, H]` final hidden states, `[V, H]` output embedding, `[N]` tokens -> `[N]` log-probs (float32; float64
    for float64 weights),
    building at most `chunk_size x V` logits at a time, in forward and (recomputed) in backward."""
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_logprobs(h @ w.T, t, temperature)

    out = [checkpoint(piece, hidden[i : i + chunk_size], weight, tokens[i : i + chunk_size], use_reentrant=False)
           for i in range(0, hidden.size(0), chunk_size)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=compute_dtype(hidden, weight))


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token distillation loss `[R, C]` and the mask `[R, C]` it counts on (`mask` as given: the module
    applies `loss.skip_first` to every method's mask before).

    `student_logits`, `teacher_logits`: `[R, C, V]`, aligned on the completion tokens `completion_ids` `[R, C]`
    (position t predicts token t). `is_weight` `[R, C]` (detached importance weights, see
    `SelfDistillationModule.importance_weights`) multiplies each token's divergence (`apply_importance_weight`).
    """
    per_token = per_token_divergence(student_logits, teacher_logits, tokens=completion_ids, **cfg.divergence_kwargs())
    return apply_importance_weight(per_token, is_weight), mask
