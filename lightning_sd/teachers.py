"""Teacher weight policies: which weights score the student's completions.

| kind          | network                                   | state saved in checkpoints |
|---------------|-------------------------------------------|----------------------------|
| live          | the student itself, under no-grad          | none                       |
| frozen        | the initial weights (LoRA: adapters off)   | none (rebuilt from the initial model) |
| ema           | `teacher <- (1 - rate) * teacher + rate * student`, once per optimizer step | yes |
| trust_region  | logits `lerp(frozen_logits, live_logits, mix)` (SDPO) | none |
| external      | another model (on-policy KD); same vocabulary required | none |

A policy is an `nn.Module` so that Lightning moves, shards and checkpoints its copy with the rest of the
module; its copies never require grad and are never in the optimizer. The teacher always scores under
`torch.no_grad()`: it is a stop-gradient target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

EMA_MAX_RATE = 0.5  # teacher.rate above this is almost surely a decay typed as a rate


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _frozen_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    twin.eval()
    return twin


class TeacherPolicy(nn.Module):
    """Base class. `score(student, run)` returns `run(network)` computed with the teacher's weights, where
    `run(network) -> Tensor` computes completion logits `[R, C, V]` for the teacher's inputs.

    `persistent` says whether the policy's weights are training state that checkpoints must keep; `option` the
    `teacher` key this kind reads (`rate`, `mix`, `model`; None: none); `scores_hidden_states` whether its scores
    can be final hidden states (the memory-bounded loss, `loss.chunk_size`), not only logits.
    """

    kind: str = "base"
    persistent: bool = False
    option: str | None = None
    scores_hidden_states: bool = True

    @classmethod
    def check_option(cls, value) -> None:
        """Raise a ValueError naming the `teacher` key when `value` (of `option`) cannot work for this kind."""

    @classmethod
    def build(cls, student: nn.Module, value) -> TeacherPolicy:
        """The policy for `student`, with `value` of its `option`."""
        return cls(student)

    @classmethod
    def describe(cls, value) -> str:
        """The kind in a word or two for the run's header, e.g. `ema (rate 0.01)`."""
        return cls.kind if cls.option is None else f"{cls.kind} ({cls.option} {value})"

    def score(self, student: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def sampling_network(self, student: nn.Module):
        """Context manager yielding the network to *sample* from as the teacher (used by evaluation)."""
        return _yield(student)

    def after_optimizer_step(self, student: nn.Module) -> None:
        """Called once after every optimizer step (never per micro-batch)."""


@contextmanager
def _yield(model: nn.Module) -> Iterator[nn.Module]:
    yield model


@contextmanager
def _adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The PEFT model with its adapters disabled (PEFT's `disable_adapter()` yields None, not the model)."""
    with model.disable_adapter():
        yield model


class LiveTeacher(TeacherPolicy):
    """The student's current weights, no grad."""

    kind = "live"

    @classmethod
    def build(cls, student: nn.Module, value) -> LiveTeacher:
        return cls()

    def score(self, student, run):
        with torch.no_grad():
            return run(student)


class FrozenTeacher(TeacherPolicy):
    """The initial weights. With a PEFT/LoRA student no copy is made: the teacher is the same network with
    its adapters disabled."""

    kind = "frozen"

    def __init__(self, student: nn.Module):
        super().__init__()
        self.uses_adapters = _is_peft(student)
        self.model = None if self.uses_adapters else _frozen_copy(student)

    def network(self, student: nn.Module):
        if self.uses_adapters:
            return _adapters_off(student)
        return _yield(self.model)

    def score(self, student, run):
        with torch.no_grad(), self.network(student) as net:
            return run(net)

    def sampling_network(self, student):
        return self.network(student)

    def train(self, mode: bool = True):  # the copy stays in eval mode
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self


class EmaTeacher(FrozenTeacher):
    """Exponential moving average of the student, updated after each optimizer step with `rate`
    (`teacher = (1 - rate) * teacher + rate * student`). Saved in checkpoints."""

    kind = "ema"
    persistent = True
    option = "rate"

    @classmethod
    def check_option(cls, value) -> None:
        if not (value and 0 < value <= 1):
            raise ValueError(f"teacher=ema needs teacher.rate in (0, 1], got {value}")
        if value > EMA_MAX_RATE:
            raise ValueError(f"teacher.rate={value} is the weight of the student in each update (teacher = (1 - rate) "
                             f"* teacher + rate * student), not the decay: {value} makes the teacher almost the live "
                             f"student. For an EMA with decay d set teacher.rate=1-d (decay 0.99: teacher.rate=0.01); "
                             f"for the student itself use teacher=live. Rates above {EMA_MAX_RATE} are refused")

    @classmethod
    def build(cls, student: nn.Module, value) -> EmaTeacher:
        if value is None:
            raise ValueError("teacher=ema needs teacher.rate (e.g. 0.01 for SDFT, 0.05 for SDPO)")
        return cls(student, value)

    def __init__(self, student: nn.Module, rate: float):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"teacher.rate must be in (0, 1] for an EMA teacher, got {rate}")
        super().__init__(student)
        self.rate = rate
        self.adapter = None
        if self.uses_adapters:  # LoRA: a second adapter on the same base weights, no copy (lightning_sd.lora)
            from lightning_sd.lora import add_ema_adapter

            self.adapter = add_ema_adapter(student)

    def network(self, student: nn.Module):
        if self.adapter is not None:
            from lightning_sd.lora import adapter_active

            return adapter_active(student, self.adapter)
        return super().network(student)

    @torch.no_grad()
    def after_optimizer_step(self, student: nn.Module) -> None:
        """One EMA step on whatever each rank holds (full tensors, FSDP shards, ZeRO-3 partitions)."""
        from lightning_sd.distributed import ema_update_

        if self.adapter is not None:
            from lightning_sd.lora import ema_adapter_update_

            ema_adapter_update_(student, self.rate, target=self.adapter)
            return
        ema_update_(self.model.parameters(), student.parameters(), self.rate)
        for t_buf, s_buf in zip(self.model.buffers(), student.buffers()):
            if t_buf.is_floating_point() and t_buf.shape == s_buf.shape:
                t_buf.copy_(s_buf)


class TrustRegionTeacher(FrozenTeacher):
    """SDPO's trust-region teacher: logits `frozen + mix * (live - frozen)`."""

    kind = "trust_region"
    option = "mix"
    scores_hidden_states = False  # its logits are an interpolation

    @classmethod
    def check_option(cls, value) -> None:
        if value is None or not 0 <= value <= 1:
            raise ValueError(f"teacher=trust_region needs teacher.mix in [0, 1], got {value}")

    @classmethod
    def build(cls, student: nn.Module, value) -> TrustRegionTeacher:
        if value is None:
            raise ValueError("teacher=trust_region needs teacher.mix in [0, 1]")
        return cls(student, value)

    def __init__(self, student: nn.Module, mix: float):
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"teacher.mix must be in [0, 1] for a trust-region teacher, got {mix}")
        super().__init__(student)
        self.mix = mix

    def score(self, student, run):
        with torch.no_grad():
            with self.network(student) as net:
                frozen = run(net)
            live = run(student)
            dtype = torch.promote_types(torch.promote_types(frozen.dtype, live.dtype), torch.float32)
            return torch.lerp(frozen.to(dtype), live.to(dtype), self.mix)

    def sampling_network(self, student):
        return _yield(student)


class ExternalTeacher(TeacherPolicy):
    """Another model (classic on-policy KD). Its tokenizer must match the student's exactly."""

    kind = "external"
    option = "model"

    @classmethod
    def check_option(cls, value) -> None:
        if not value:
            raise ValueError("teacher=external needs teacher.model (e.g. teacher.model.name=smollm2_135m, or "
                             "teacher.model.name=hf teacher.model.name_or_path=<folder>)")

    @classmethod
    def build(cls, student: nn.Module, value) -> ExternalTeacher:
        if value is None:
            raise ValueError("teacher=external needs teacher.model (a model config: name, name_or_path, ...)")
        return cls(value)

    @classmethod
    def describe(cls, value) -> str:
        value = value or {}
        return f"{cls.kind} ({value.get('name_or_path') or value.get('name')})"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    def score(self, student, run):
        with torch.no_grad():
            return run(self.model)

    def sampling_network(self, student):
        return _yield(self.model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_model, teacher_model, where: str) -> None:
    """Raise a clear error when teacher and student do not share one vocabulary (ids must mean the same)."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = [k for k in s_vocab if k in t_vocab and s_vocab[k] != t_vocab[k]][:5]
        raise ValueError(
            f"{where}: the teacher's tokenizer differs from the student's ({len(t_vocab)} vs {len(s_vocab)} tokens; "
            f"only in student: {only_s}, only in teacher: {only_t}, different ids: {moved}). Token-level "
            "distillation needs one shared vocabulary: pick a teacher from the same model family."
        )
    s_out = student_model.get_output_embeddings().weight.shape[0]
    t_out = teacher_model.get_output_embeddings().weight.shape[0]
    if s_out != t_out:
        raise ValueError(
            f"{where}: teacher output vocabulary has {t_out} rows but the student's has {s_out}; "
            "resize one model's embeddings so the logits line up."
        )


TEACHERS: dict[str, type[TeacherPolicy]] = {cls.kind: cls for cls in (LiveTeacher, FrozenTeacher, EmaTeacher,
                                                                         TrustRegionTeacher, ExternalTeacher)}
TEACHER_KINDS = tuple(TEACHERS)


def teacher_class(kind: str) -> type[TeacherPolicy]:
    """The policy class of `teacher.kind`."""
    if kind not in TEACHERS:
        raise ValueError(f"teacher.kind={kind!r} is not one of {TEACHER_KINDS}")
    return TEACHERS[kind]


def build_teacher(kind: str, student: nn.Module, *, rate: float | None = None, mix: float | None = None,
                  external_model: nn.Module | None = None) -> TeacherPolicy:
    """Make a teacher policy of `kind` (one of `TEACHER_KINDS`) for `student`; `rate`, `mix`, `external_model`:
    the option of the kinds that read one."""
    cls = teacher_class(kind)
    value = {"rate": rate, "mix": mix, "model": external_model}.get(cls.option)
    return cls.build(student, value)


__all__ = ["TeacherPolicy", "LiveTeacher", "FrozenTeacher", "EmaTeacher", "TrustRegionTeacher", "ExternalTeacher",
           "build_teacher", "check_same_vocabulary", "teacher_class", "EMA_MAX_RATE", "TEACHERS", "TEACHER_KINDS"]
