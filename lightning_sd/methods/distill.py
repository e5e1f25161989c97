"""`loss=distill`: the plain self-distillation method. The teacher (the student's own weights, or a copy) sees a
privileged context built from `loss.template`; the student is trained toward the teacher's distribution on the
student's own completion, token by token. The other distillation methods (`self_critique`, `continual`,
`on_policy_kd`) share these terms and differ in their options (`conf/loss/*.yaml`).

`loss.lmbda < 1` trains some batches on the dataset's reference completions instead of samples, scored by the same
divergence (GKD's mixing). The choice for a batch depends only on `(seed, global_step, batch_idx)`, never on the
rank, so every rank of a data-parallel run takes the same branch (a rank that samples while another does not would
hang the collectives of the decode loop)."""

from __future__ import annotations

from dataclasses import dataclass
from lightning_sd.contexts import context_kind
from lightning_sd.methods.base import Method, MethodOptions, Step, Terms, register
from lightning_sd.methods.contrast import ContrastiveTeacher
from lightning_sd.rollout import derive_seed

_SALT = 0x6B64  # separates this stream from the sampling seeds derived from the same integers


def on_policy_batch(lmbda: float, seed: int, global_step: int, batch_idx: int) -> bool:
    """True when this batch should use student samples: a uniform draw from the hash of
    `(seed, global_step, batch_idx)` is below `lmbda` (`lmbda=1` always, `lmbda=0` never)."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    u = derive_seed(seed, global_step, batch_idx, _SALT) / float(1 << 63)
    return u < lmbda


def distillation(step: Step) -> Terms:
    """The teacher's per-token divergence on the rows that have a teacher context."""
    mask = step.teacher_mask()
    return Terms(step.distillation(mask), mask)


@dataclass
class DistillOptions(MethodOptions):
    """The distillation methods' own keys under `loss.`, beside the teacher context.

    - `lmbda`: the share of batches trained on the student's samples; the rest train on the dataset's
      completions, scored by the same teacher (GKD's mixing; 1: every batch on samples).
    - `contrast`: alpha of the contrastive teacher (the target is the student moved by alpha times the difference
      between the teacher with the real context and with a placebo, another record's, in the same template; null:
      the plain teacher; `methods.contrast`).
    - `reason_first` / `reason_max_new_tokens`: the teacher first writes its analysis of the reference solution,
      at most that many tokens (`methods.reason_first`).
    """

    lmbda: float = 1.0
    contrast: float | None = None
    reason_first: bool = False
    reason_max_new_tokens: int = 128

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"loss.lmbda must be in [0, 1], got {self.lmbda}")
        if self.reason_max_new_tokens < 1:
            raise ValueError(f"loss.reason_max_new_tokens must be >= 1, got {self.reason_max_new_tokens}")
        if self.contrast is not None and not self.contrast > 0:
            raise ValueError(f"loss.contrast must be > 0 (the step toward the teacher's context) or null, got "
                             f"{self.contrast}")
        if self.contrast is not None and context_kind(self.template) != "format":
            raise ValueError("loss.contrast needs a format-string teacher template (a placebo is the same "
                             "template around another record's fields), not loss.template=sdpo")


@register
class Distill(Method):
    name = "distill"
    Options = DistillOptions
    options: DistillOptions

    def validate(self) -> None:
        super().validate()
        if self.options.contrast is not None and self.loss.chunk_size is not None:
            raise ValueError("loss.contrast combines the student's and both teachers' logits: it does not work "
                             "with the memory-bounded loss; set loss.chunk_size=null")

    @property
    def mixes_dataset(self) -> bool:
        return self.options.lmbda < 1.0

    @property
    def analysis_tokens(self) -> int | None:
        return self.options.reason_max_new_tokens if self.options.reason_first else None

    def contrastive_teacher(self) -> ContrastiveTeacher | None:
        return None if self.options.contrast is None else ContrastiveTeacher(self.options.contrast)

    def samples_batch(self, seed: int, global_step: int, batch_idx: int) -> bool:
        return on_policy_batch(self.options.lmbda, seed, global_step, batch_idx)

    def terms(self, step: Step) -> Terms:
        return distillation(step)


__all__ = ["on_policy_batch", "distillation", "DistillOptions", "Distill"]
