"""The objective: which divergence, on which tokens, reduced how. `LossConfig` holds what every method shares and
the method's own options (`Method.Options`); the Hydra `loss` group lists both as flat keys, and
`LossConfig.from_dict` sorts them out. `distillation_terms` turns student and teacher completion logits into
per-token losses and the mask they count on.

Sign convention (see docs/concepts.md): `beta=0` is the forward KL(T||S), `beta=1` the reverse KL(S||T).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_sd.losses import (
    DivergenceOptions,
    apply_importance_weight,
    per_token_divergence,
)
from lightning_sd.losses.support import compute_dtype
from lightning_sd.methods.base import (
    METHODS,
    Method,
    MethodOptions,
    distillation_names,
    method_class,
    method_options,
    option_defaults,
)

LOSS_NAMES = tuple(METHODS)  # the built-in methods (`lightning_sd.methods`)
# losses whose whole signal is a teacher's divergence on the completion (their options: `DistillOptions`)
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


def _typed(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` checked against the types of `schema`'s fields (an int for a float is converted): a ValueError
    naming the key `loss.<key>` when one does not fit."""
    try:
        checked = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        raise ValueError(f"loss.{key}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
    return {k: checked[k] for k in values}


@dataclass
class LossConfig:
    """The objective every method shares: which divergence, on which tokens, reduced how; and the method.

    - `name`: the method, a name in `lightning_sd.methods.METHODS` or the dotted path of a user's own `Method`
      subclass (`package.module.Class`; a config may write it as `_target_`).
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
    - `chunk_size`: when set, the memory-bounded path computes the loss from hidden states chunk by chunk.
    - `nonfinite` / `nonfinite_limit`: what a step with a non-finite loss does (`skip` it, or `stop`), and after
      how many skipped steps the run stops.
    - `options`: the method's own keys (`Method.Options`: the teacher context `template`, `lmbda`, `grpo_mix`,
      ...); None: the method's defaults. In a config they are flat keys of `loss` (`loss.lmbda=0.5`), and
      `from_dict` sorts them out.

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
    chunk_size: int | None = None
    nonfinite: str = "skip"
    nonfinite_limit: int | None = 10
    options: MethodOptions | None = None

    def __new__(cls, *args, **kwargs):  # before the dataclass's __init__ rejects the key as unexpected
        check_renamed_keys(kwargs, TypeError)
        flat = sorted(set(kwargs) & set(option_defaults()))
        if flat:
            raise TypeError(f"{flat} are the method's own options: LossConfig.from_dict({{'name': ..., "
                            f"'{flat[0]}': ...}}), or LossConfig(name=..., options=<the method's Options>(...))")
        return super().__new__(cls)

    def __post_init__(self) -> None:  # validated once, when made (`dataclasses.replace` makes a new one)
        if self.options is None:
            self.options = method_class(self.name).Options()
        self.validate()

    def method(self) -> Method:
        """The method object these options select (`loss.name`, or `loss._target_`), made once per name."""
        made = self.__dict__.get("_method")
        if made is None or made[0] != self.name or made[1].options is not self.options:
            made = self.__dict__["_method"] = (self.name, method_class(self.name)(self, self.options))
        return made[1]

    @property
    def needs_teacher(self) -> bool:
        """Whether the method runs a teacher (False for `sft`, `grpo`, `rl_feedback` with `grpo_mix=1`)."""
        return self.method().needs_teacher

    def validate(self) -> None:
        """Reject impossible values and combinations with a message naming the option."""
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
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1 or null, got {self.chunk_size}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"loss.nonfinite={self.nonfinite!r} must be 'skip' or 'stop'")
        if self.nonfinite_limit is not None and self.nonfinite_limit < 1:
            raise ValueError(f"loss.nonfinite_limit must be >= 1 or null (never stop), got {self.nonfinite_limit}")
        cls = method_class(self.name)
        if not isinstance(self.options, cls.Options):
            raise ValueError(f"loss={self.name} takes {cls.Options.__name__}, got {type(self.options).__name__}")
        self.method().validate()

    @classmethod
    def keys(cls) -> list[str]:
        """The config keys of this dataclass (`options` is not one: its keys are flat keys of `loss`)."""
        return [f.name for f in fields(cls) if f.name != "options"]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LossConfig":
        """The validated objective of a flat `loss` config (every key of the loss group: its own and each method's
        options; a key of another method than `name`'s must keep its default). Each value is checked against its
        field's type; a ValueError names the key."""
        values = dict(values or {})
        if "_target_" in values:  # a user's own method class (Hydra's spelling)
            values["name"] = values.pop("_target_")
        check_renamed_keys(values)
        own = cls.keys()
        method = method_class(values.get("name", cls.name))
        valid = set(own) | {f.name for f in fields(method.Options)} | set(option_defaults())
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"{', '.join('loss.' + k for k in unknown)}: unknown key. Valid keys of `loss`: "
                             f"{', '.join(sorted(valid))}")
        options = method_options(method, {k: v for k, v in values.items() if k not in own})
        common = {k: v for k, v in values.items() if k in own}
        return cls(**_typed(cls, common), options=type(options)(**_typed(type(options), asdict(options))))

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
