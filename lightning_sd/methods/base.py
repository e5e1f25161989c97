"""A method as one object: `Method` declares what a training step needs (student samples or the dataset's
reference completions, a teacher forward, verifier rewards), owns its teacher-context builder, and turns a
`Step` (the typed record of one micro-batch's scores) into per-token `Terms`. Each method declares its own keys
under `loss.` (`Options`, a dataclass: the teacher context for all, `lmbda` for the distillation methods, ...), with
their defaults; `LossConfig` holds only what every method shares (the divergence, the tokens, the reduction). The
module runs the same step for every method and never asks for its name; `METHODS` maps `loss.name` to the class,
and a dotted path
(`loss.name=package.module.Class`, or `_target_: package.module.Class` in a loss YAML) names a user's own class
(`method_for`).

Shapes: R rollout rows, C completion length.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from typing import Any, Callable, ClassVar

import torch

from lightning_sd.contexts import ContextBuilder, check_template, context_kind
from lightning_sd.data.prompts import PromptEncoder
from lightning_sd.methods.teacher_context import TeacherPrompts, build_context
from lightning_sd.sampling import Rollout


@dataclass
class Terms:
    """What a method's `terms` returns: `per_token` `[R, C]` loss terms (summed over `mask`, then normalized by
    `loss.reduction`), `mask` `[R, C]` the tokens they count on, and `signal` `[R, C]` bool, the tokens whose
    term can carry a gradient (None: all of `mask`; a GRPO row with zero advantage is in `mask`, not here)."""

    per_token: torch.Tensor
    mask: torch.Tensor
    signal: torch.Tensor | None = None


@dataclass
class Step:
    """One micro-batch as a method's `terms` sees it.

    - `rollout`: the completions trained on (`completion_ids` `[R, C]`, ...), sampled or the dataset's.
    - `records`: the B prompt records; rows of record i are `rollout.prompt_index == i` (R = B x group size).
    - `rewards`: `[R]` verifier rewards (None: no verifier ran; an entry is None where it failed).
    - `mask`: `[R, C]` the completion tokens that may train, `loss.skip_first` already applied.
    - `row_mask`: `[R]` bool, rows whose teacher context exists (all True when no teacher runs).
    - `logprobs()`: `[R, C]` student log-probs of the completion tokens at `loss.temperature` (with grad).
    - `distillation(mask)`: `[R, C]` per-token divergence from the teacher's scores (`loss.beta`, `support`,
      ...), multiplied by the importance weights.
    - `importance_weights`: `[R, C]` detached weights against the sampler's distribution, or None
      (`loss.is_clip` null, or dataset completions); computed once per step.
    """

    rollout: Rollout
    records: list[dict]
    rewards: list[float | None] | None
    mask: torch.Tensor
    row_mask: torch.Tensor
    logprobs: Callable[[], torch.Tensor]
    distillation: Callable[[torch.Tensor], torch.Tensor]
    _weights: Callable[[], torch.Tensor | None] = field(repr=False, default=lambda: None)

    @cached_property
    def importance_weights(self) -> torch.Tensor | None:
        return self._weights()

    @property
    def group_size(self) -> int:
        """Rollouts per prompt (`generation.n`)."""
        return self.rollout.completion_ids.size(0) // len(self.records)

    def teacher_mask(self) -> torch.Tensor:
        """`mask` restricted to the rows with a teacher context."""
        return self.mask * self.row_mask[:, None].to(self.mask.dtype)


@dataclass
class MethodOptions:
    """The keys under `loss.` that every method with a teacher context reads (a method's `Options` subclasses this
    to add its own).

    - `template`: the teacher context, a name in `lightning_sd.contexts.TEMPLATES` or a format string.
    - `feedback` / `strip_reasoning`: the `sdpo` context shows the verifier's feedback / strips the sibling
      solution's reasoning.
    """

    template: str = "self_critique_v3"
    feedback: bool = True
    strip_reasoning: bool = True

    def validate(self) -> None:
        """Reject an impossible value with a message naming the key."""
        check_template(self.template)


class Method:
    """Base class of the methods. A subclass sets the class attributes that say what it needs, its `Options`,
    and implements `terms`; `context`, `validate` and `check` have defaults.

    - `name`: the `loss.name` it registers under (`register`).
    - `Options`: the dataclass of its own keys under `loss.` (`MethodOptions` or a subclass); `self.options`.
    - `samples`: trains on the student's samples (False: on the dataset's reference completions, no rollout).
    - `teacher`: runs a teacher forward on the teacher context (`needs_teacher` may depend on the options).
    - `rewards`: learns from verifier rewards (the data needs a verifier).
    - `distills`: its signal is a teacher's divergence on the completion (the distillation methods).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    samples: ClassVar[bool] = True
    teacher: ClassVar[bool] = True
    rewards: ClassVar[bool] = False
    distills: ClassVar[bool] = True

    def __init__(self, loss: Any, options: MethodOptions | None = None) -> None:
        self.loss = loss  # the `LossConfig`: divergence, tokens, reduction
        self.options = options if options is not None else self.Options()

    @property
    def needs_teacher(self) -> bool:
        return self.teacher

    @property
    def uses_rewards(self) -> bool:
        """Rewards are needed for the loss itself or for the RL-feedback teacher context (`loss.template=sdpo`)."""
        return self.rewards or context_kind(self.options.template) == "rl_feedback"

    @property
    def mixes_dataset(self) -> bool:
        """Whether some batches train on the dataset's completions instead of samples (`loss.lmbda < 1`)."""
        return False

    @property
    def analysis_tokens(self) -> int | None:
        """With `loss.reason_first`, the most tokens of the teacher's analysis of each reference solution; else
        None (no analysis)."""
        return None

    def contrastive_teacher(self) -> Any:
        """The wrapper that moves the teacher's scores against a placebo context (`loss.contrast`), or None."""
        return None

    def samples_batch(self, seed: int, global_step: int, batch_idx: int) -> bool:
        """Whether this batch trains on fresh student samples (asked by `OnPolicyGeneration` through the module):
        `samples` by default; the distillation methods mix in dataset batches with `loss.lmbda < 1`."""
        return self.samples

    def teacher_prompts(self, prompts: PromptEncoder) -> TeacherPrompts:
        """The builder of the teacher's prompt tensors: this method's `context()` encoded by `prompts`."""
        return TeacherPrompts(self.context(), prompts)

    def context(self) -> ContextBuilder:
        """The teacher-context builder `(record, RowView) -> str | None` (None: the row has no privileged
        signal and is masked out); default: `loss.template` with the options."""
        o = self.options
        return build_context(o.template, feedback=o.feedback, strip_reasoning=o.strip_reasoning,
                             reason_first=self.analysis_tokens is not None)

    def validate(self) -> None:
        """Reject options this method cannot use (called once by `LossConfig.validate`)."""
        self.options.validate()

    def check(self, teacher: Any, generation: Any, data: Any) -> None:
        """What the method needs from the other config groups, at start-up: a ValueError naming the options when
        it cannot work (a warning when it would run but learn nothing)."""
        o = self.options
        verifier = getattr(data, "verifier", None)
        if self.uses_rewards and (verifier == "none" or (not data.task and verifier is None)):
            raise ValueError(f"loss={self.loss.name} (template {o.template!r}) learns from verifier rewards: pick a "
                             "task with a verifier (data=arithmetic|facts|json_format, or data.task=...) or set "
                             "data.verifier (math, normalized, ...; docs/configuration.md)")
        if context_kind(o.template) == "rl_feedback" and generation.n < 2 and not o.feedback:
            raise ValueError("the sdpo teacher context needs a successful sibling rollout (generation.n >= 2) or "
                             f"verifier feedback (loss.feedback=true); got generation.n={generation.n}, "
                             "loss.feedback=false")

    def terms(self, step: Step) -> Terms:
        raise NotImplementedError(f"{type(self).__name__}.terms")


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `loss.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name` to register under")
    METHODS[cls.name] = cls
    return cls


def distillation_names() -> tuple[str, ...]:
    return tuple(name for name, cls in METHODS.items() if cls.distills)


def method_class(name: str) -> type[Method]:
    """The class of `loss.name`: a registered name, or the dotted path `package.module.Class` of a `Method`
    subclass."""
    if name in METHODS:
        return METHODS[name]
    if "." not in name:
        raise ValueError(f"loss.name={name!r} is not one of {tuple(METHODS)} (or the dotted path of your own "
                         "Method subclass, package.module.Class)")
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"loss.name={name!r} does not name an importable class: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"loss.name={name!r} is not a subclass of lightning_sd.methods.Method")
    return cls


def method_for(loss: Any) -> Method:
    """The method object of a `LossConfig` (with its options)."""
    return loss.method()


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def option_defaults() -> dict[str, Any]:
    """Every registered method's own keys under `loss.` with their defaults: the loss group's config lists them all
    (a key keeps one default, wherever several methods share it)."""
    out: dict[str, Any] = {}
    for cls in METHODS.values():
        for f in fields(cls.Options):
            value = _default(f)
            if f.name in out and out[f.name] != value:
                raise RuntimeError(f"loss.{f.name} has two defaults ({out[f.name]!r}, {value!r}): declare it once")
            out[f.name] = value
    return out


def methods_declaring(key: str) -> tuple[str, ...]:
    """The registered methods whose `Options` declare `loss.<key>`."""
    return tuple(name for name, cls in METHODS.items() if key in {f.name for f in fields(cls.Options)})


def method_options(cls: type[Method], values: dict[str, Any]) -> MethodOptions:
    """The `Options` of method `cls` from a flat dict of `loss.` keys that are not `LossConfig`'s own: its keys
    set, any other registered method's key allowed only at its default (every loss option lists them all).
    Raises a ValueError naming the key."""
    own = {f.name for f in fields(cls.Options)}
    defaults = option_defaults()
    label = cls.name or f"{cls.__module__}.{cls.__qualname__}"
    for key in sorted(set(values) - own):
        if key not in defaults:
            raise ValueError(f"unknown loss option {key!r}")
        if values[key] != defaults[key]:
            raise ValueError(f"loss.{key}={values[key]!r} is an option of loss={'|'.join(methods_declaring(key))}, "
                             f"not of loss={label}: drop it (or set loss.{key}={defaults[key]!r}, its default)")
    return cls.Options(**{k: v for k, v in values.items() if k in own})


__all__ = ["Terms", "Step", "MethodOptions", "Method", "METHODS", "register", "distillation_names", "method_class",
           "method_for", "option_defaults", "methods_declaring", "method_options"]
