"""`SelfDistillationModule`: the LightningModule that ties student, teacher policy, method and loss together. Read
`training_step` top to bottom: the rollout (sampled by the `OnPolicyGeneration` callback, or the dataset's
reference completions) -> the teacher's prompts (the method's `TeacherPrompts`) and scores (no grad) -> the
student's scores -> the method's terms, reduced (`Scorer`) -> the loss, counted for the optimizer step
(`StepNormalizer`) and logged (`StepMetrics`). The batch's fields: `batch.StepBatch`.

Shapes: R rollout rows (B prompts x n samples), P / P' student / teacher prompt lengths (left-padded),
C completion length (right-padded), V vocabulary, H hidden size.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from torch import nn

from lightning_sd.batch import LossOutput, StepBatch, TeacherInputs, as_step_batch
from lightning_sd.contexts import ContextBuilder
from lightning_sd.data.prompts import TRUNCATION, PromptEncoder
from lightning_sd.distributed import all_ranks, ends_optimizer_step, engine_owns_gradients
from lightning_sd.evaluation import generate_and_verify
from lightning_sd.forward import completion_hidden, completion_logits
from lightning_sd.methods import (Method, TeacherPrompts, generate_analyses, is_dataset_rollout,
                                  reference_rollout)
from lightning_sd.objectives import LossConfig
from lightning_sd.optim import OptimizerConfig, SchedulerConfig, build_optimizer, clip_without_scaler, fused_choice
from lightning_sd.sampling import Rollout, SamplingConfig
from lightning_sd.scoring import Scorer
from lightning_sd.step_in_backward import check_trainer_for_step_in_backward
from lightning_sd.step_metrics import StepMetrics
from lightning_sd.step_normalizer import StepNormalizer
from lightning_sd.teachers import TeacherPolicy, build_teacher


def quiet_intended_lightning_notes() -> None:
    """Hide two notes Lightning prints about what this module does on purpose. Run at import and again by each
    module made (a caller may have reset the warning filters since, as pytest does around each test).
    - The teacher's frozen copy (and a sampling-only network) stay in eval mode for the whole run, by design: no
      dropout in the teacher's scores. Lightning warns about any module in eval mode when training starts.
    - The module turns every data loader's batch into a `StepBatch` (`on_before_batch_transfer`); Lightning notes
      that this hook wins over a data module's, which is what is meant (the package's data module defines none)."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but")


quiet_intended_lightning_notes()


class SelfDistillationModule(LightningModule):
    """On-policy self-distillation of a causal LM.

    Args:
        student: any Hugging Face causal LM (optionally PEFT-wrapped); the only trained weights.
        tokenizer: its tokenizer (chat template applied to student and teacher prompts alike).
        teacher: a `TeacherPolicy` or a kind (`live`, `frozen`, `ema`, `trust_region`); `teacher_kwargs`
            go to `build_teacher` (e.g. `rate=0.01`).
        loss: a `LossConfig` or a dict of its keys; `loss.name` (or `loss._target_`) selects the method.
        method: a `Method` object to use instead of the one the loss options select.
        context: a teacher-context builder `(record, RowView) -> str | None`; default: the method's
            (`Method.context`, formatting `loss.template`).
        task: an object with `verify(record, completion) -> Verdict` used for rewards and evaluation.
        optimizer: an `OptimizerConfig`, or a dict of its keys `{name: adamw|sgd, lr, weight_decay, betas, eps,
            fused, in_backward}` (`in_backward`: see `OptimizerInBackward`); scheduler: a `SchedulerConfig`, or a
            dict of its keys `{name: constant|linear|cosine, warmup_steps, min_lr_ratio}`; a key left out takes the
            schema's default.
        max_prompt_length, truncation, system_prompt: how prompts become tokens (`data.prompts.PromptEncoder`).
        eval_sampling: sampling settings for `validation_step` (default greedy, `SamplingConfig`'s length).
    """

    def __init__(
        self,
        student: nn.Module,
        tokenizer: Any,
        *,
        teacher: TeacherPolicy | str = "frozen",
        teacher_kwargs: dict | None = None,
        loss: LossConfig | dict | None = None,
        method: Method | None = None,
        context: ContextBuilder | None = None,
        task: Any = None,
        optimizer: OptimizerConfig | dict | None = None,
        scheduler: SchedulerConfig | dict | None = None,
        max_prompt_length: int | None = None,
        truncation: str = TRUNCATION,
        system_prompt: str | None = None,
        eval_sampling: SamplingConfig | None = None,
        run_dir: str | None = None,
    ) -> None:
        super().__init__()
        quiet_intended_lightning_notes()
        self.student = student
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, system_prompt, max_prompt_length, truncation)
        self.loss_cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_dict(loss)  # validated when made
        self.teacher = teacher if isinstance(teacher, TeacherPolicy) else build_teacher(
            teacher, student, **(teacher_kwargs or {}))
        if self.loss_cfg.chunk_size and not self.teacher.scores_hidden_states:
            raise ValueError(f"loss.chunk_size (memory-bounded loss) does not support teacher={self.teacher.kind}: "
                             "its teacher logits are an interpolation; set loss.chunk_size=null")
        self.method = method if method is not None else self.loss_cfg.method()
        self.teacher_prompts = (TeacherPrompts(context, self.prompts) if context is not None
                                else self.method.teacher_prompts(self.prompts))
        self.contrast = self.method.contrastive_teacher()
        self.scorer = Scorer(self.loss_cfg, student_weight=lambda: self._output_weight(self.student),
                             teacher_weight=self.teacher_output_weight)
        self.task = task
        self.optimizer_cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**(optimizer or {}))
        self.scheduler_cfg = scheduler if isinstance(scheduler, SchedulerConfig) else SchedulerConfig(**(scheduler or {}))
        self.optimizer_cfg.validate()
        self.scheduler_cfg.validate()
        self.eval_sampling = eval_sampling or SamplingConfig(do_sample=False)
        self.run_dir = run_dir
        self.strict_loading = False  # a frozen teacher is not saved; it is rebuilt from the initial model
        self.step_metrics = StepMetrics()
        self.normalizer = StepNormalizer(self.loss_cfg.reduction)
        self.val_accuracy = torchmetrics.MeanMetric()
        self._t_train_start = 0.0

    # ------------------------------------------------------------------ what the method needs
    @property
    def needs_rollouts(self) -> bool:
        """False for a method that trains on the dataset's reference completions (`sft`): the generation
        callback skips sampling."""
        return self.method.samples

    @property
    def needs_teacher(self) -> bool:
        """False for a method without a teacher (`sft`, `grpo`, `rl_feedback` with `grpo_mix=1`): no teacher forward."""
        return self.method.needs_teacher

    def samples_batch(self, seed: int, global_step: int, batch_idx: int) -> bool:
        """Whether this batch trains on fresh student samples (asked by `OnPolicyGeneration`; the method decides,
        from `(seed, global_step, batch_idx)` only, so every rank decides the same)."""
        return self.method.samples_batch(seed, global_step, batch_idx)

    @property
    def pad_token_id(self) -> int:
        return self.prompts.pad_token_id

    @property
    def empty_steps(self) -> int:
        """Optimizer steps skipped because no micro-batch on any rank had a loss-bearing token."""
        return self.step_metrics.empty_steps

    @property
    def nonfinite_steps(self) -> int:
        """Micro-batches skipped because their loss was not finite."""
        return self.step_metrics.nonfinite_steps

    def diagnostics_summary(self) -> dict[str, float]:
        """Run means of the step diagnostics and the counts of skipped steps (`StepMetrics.summary`)."""
        return self.step_metrics.summary()

    # ------------------------------------------------------------------ hooks users override
    def dataset_rollout(self, batch: StepBatch) -> Rollout:
        """The batch's reference solutions as a `Rollout` (SFT, and the dataset batches of `loss.lmbda < 1`)."""
        rollout = reference_rollout(batch.records, batch.prompt_ids, batch.prompt_mask, self.tokenizer,
                                    pad_token_id=self.pad_token_id)
        batch.completion_text = [r["solution"] for r in batch.records]
        return rollout

    def build_teacher_inputs(self, batch: StepBatch, placebo: bool = False) -> TeacherInputs:
        """The teacher's prompt for each rollout row (`TeacherInputs`, `[R, P']`), by the method's
        `TeacherPrompts`; with `loss.reason_first` the teacher first writes its analysis of each reference solution.
        `placebo=True`: the contrastive teacher's placebo (another record's context)."""
        analyses, tokens = None, self.method.analysis_tokens
        if tokens is not None:
            analyses = generate_analyses(self, self.teacher_prompts.placebo_records(batch.records) if placebo
                                         else batch.records, tokens)
            if not placebo:
                batch.analyses = analyses
        return self.teacher_prompts(batch, placebo=placebo, analyses=analyses)

    def _run(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rollout: Rollout) -> Callable:
        fn = completion_hidden if self.loss_cfg.chunk_size else completion_logits
        return lambda net: fn(net, prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask)

    def student_forward(self, batch: StepBatch) -> torch.Tensor:
        """Student scores of the rollout tokens given the student prompt: logits `[R, C, V]`, or final hidden
        states `[R, C, H]` when `loss.chunk_size` is set."""
        rollout: Rollout = batch.rollout
        return self._run(rollout.prompt_ids, rollout.prompt_mask, rollout)(self.student)

    def teacher_forward(self, batch: StepBatch, teacher_inputs: TeacherInputs) -> torch.Tensor:
        """Teacher scores (no grad) of the same rollout tokens given the teacher prompt: `[R, C, V]` logits
        (or `[R, C, H]` hidden states with `loss.chunk_size`)."""
        run = self._run(teacher_inputs.prompt_ids, teacher_inputs.prompt_mask, batch.rollout)
        return self.teacher.score(self.student, run)

    def _output_weight(self, network: nn.Module) -> torch.Tensor:
        return network.get_output_embeddings().weight

    def teacher_output_weight(self) -> torch.Tensor:
        """The teacher's output embedding `[V, H]`, detached (for logits from teacher hidden states)."""
        with self.teacher.sampling_network(self.student) as network:
            return self._output_weight(network).detach()

    def compute_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor | None, batch: StepBatch,
                     teacher_inputs: TeacherInputs) -> LossOutput:
        """The method's per-token terms of this step, reduced (`Scorer.method_loss`). `loss` is the *sum* of the
        per-token (or per-sequence) terms: the gradients are divided by the optimizer step's global count of all
        micro-batches and ranks (`StepNormalizer`), so the update does not depend on how the batch was split."""
        step = self.scorer.step(student_out, teacher_out, batch.rollout, batch.records, batch.rewards,
                                teacher_inputs.row_mask)
        return self.scorer.method_loss(self.method, step)

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: StepBatch, batch_idx: int):
        if batch.rollout is None:
            if self.needs_rollouts and batch.on_policy is not False:
                raise RuntimeError(
                    "batch has no 'rollout': add lightning_sd.OnPolicyGeneration(...) to the Trainer's callbacks "
                    "(it samples completions from the student before each training step)")
            batch.rollout = self.dataset_rollout(batch)  # SFT, or a dataset batch of loss.lmbda < 1
        self._t_train_start = time.perf_counter()
        target = None
        if self.needs_teacher:
            with self.span("teacher_prompts"):
                teacher_inputs = self.build_teacher_inputs(batch)
            with self.span("teacher_forward"):
                teacher_out = self.teacher_forward(batch, teacher_inputs)
                if self.contrast is not None:
                    target = self.contrast.scores(batch, teacher_inputs, teacher_out, self.build_teacher_inputs,
                                                  self.teacher_forward)
        else:  # sft, grpo, rl_feedback with grpo_mix=1: no teacher forward
            teacher_inputs, teacher_out = TeacherInputs.without_teacher(batch.rollout), None
        with self.span("student_forward"):
            student_out = self.student_forward(batch)
        with self.span("loss"):
            if target is not None:
                teacher_out = target(student_out)
            out = self.compute_loss(student_out, teacher_out, batch, teacher_inputs)
        batch.loss_terms = {"per_token": out.per_token.detach(), "mask": out.mask}
        batch.diagnostics = self.scorer.diagnostics(student_out, teacher_out, batch.rollout, out,
                                                    teacher_inputs.row_mask)
        keep_topk = self.teacher_topk_requested()
        if keep_topk and teacher_out is not None:
            from lightning_sd.token_heatmap import teacher_topk

            batch.loss_terms["teacher_topk"] = teacher_topk(self, teacher_out, keep_topk)
        if not all_ranks(self._trainer, bool(torch.isfinite(out.loss))):  # skip on every rank or none (no hang)
            return self.step_metrics.nonfinite(self, batch, out, mode=self.loss_cfg.nonfinite,
                                               limit=self.loss_cfg.nonfinite_limit, run_dir=self.run_dir)
        self.step_metrics.log_step(self, batch, out, teacher_inputs.row_mask,
                                   dataset=is_dataset_rollout(batch.rollout), mixes_dataset=self.method.mixes_dataset)
        return self.normalizer.backward_loss(out, self._trainer, in_backward=self.optimizer_cfg.in_backward)

    def span(self, name: str) -> ContextManager:
        """A span of the Trainer's profiler named `[step]<name>` (`trainer.profiler`, `Trainer(profiler=...)`); nothing
        without a trainer. `training_step` opens teacher_prompts, teacher_forward, student_forward and loss; Lightning's
        own spans cover the rollout (`[Callback]OnPolicyGeneration.on_train_batch_start`), backward and the optimizer."""
        trainer = self._trainer
        return trainer.profiler.profile(f"[step]{name}") if trainer is not None else nullcontext()

    def teacher_topk_requested(self) -> int:
        """How many of the teacher's top alternatives per token this step keeps in `batch.loss_terms`: the
        most any callback asks for (a callback's `wants_teacher_topk()`, e.g. `TokenView` on the steps it
        renders); 0 without a trainer."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return max((int(cb.wants_teacher_topk()) for cb in callbacks if hasattr(cb, "wants_teacher_topk")),
                   default=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> StepBatch:
        """A data loader's batch as a `StepBatch` (a plain dict from a loader of one's own becomes one), before
        it moves to the device and the callbacks and the step see it."""
        return as_step_batch(batch)

    def on_train_start(self) -> None:
        """The student trains in train mode. Lightning keeps each submodule's mode as it finds it, and a model
        from `from_pretrained` is in eval mode: it would train without dropout and, since Hugging Face models
        checkpoint activations only in train mode, with gradient checkpointing silently off. Teacher copies
        stay in eval mode."""
        self.student.train()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        trained = batch.rollout is not None and self._t_train_start
        tokens = float(batch.rollout.completion_mask.sum()) if trained else None
        self.step_metrics.log_batch_end(self, tokens, time.perf_counter() - self._t_train_start if trained else 0.0)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients are dropped at once (`set_to_none`). Lightning itself zeroes them
        only inside the next step's closure, after that step's rollout and forward passes, so the previous
        step's gradients (one more copy of the trainable weights) would sit through the memory peak of the
        student forward and loss."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not engine_owns_gradients(self.trainer.strategy):
            optimizer.zero_grad(set_to_none=True)
        if not self._optimizer_stepped():
            return
        if self.normalizer.last_step_empty:  # nothing was learned (the teacher does not follow either): counted
            self.step_metrics.empty_steps += 1
        else:
            # the teacher follows the student here, the one place it does: before any callback's
            # on_train_batch_end (a checkpoint saved there holds the updated teacher) and the next rollout
            self.teacher.after_optimizer_step(self.student)

    def _optimizer_stepped(self) -> bool:
        """Whether this call of `optimizer_step` ended an optimizer step (False only for the micro-batches of a
        strategy that accumulates gradients itself, e.g. DeepSpeed, which calls the hook for every one)."""
        return not self.trainer.strategy.handles_gradient_accumulation or ends_optimizer_step(self.trainer)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """The schedule advances with the optimizer steps that happened: not on a step skipped for no signal."""
        if self.normalizer.last_step_empty:
            return
        super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Exact global normalization, and no update without signal (`StepNormalizer.finish`): gradients divided
        by the optimizer step's total count over micro-batches and ranks, or dropped when no micro-batch on any rank
        had a loss-bearing token (the optimizer then leaves the weights and its state alone, the scheduler does not
        advance, the teacher does not follow, `train/empty_steps` counts it). Under FSDP the gradients are this
        rank's shards (`use_orig_params=True`), scaled in place. Under DeepSpeed the engine owns the gradients and
        the step: the loss was normalized in `training_step` instead, and empty steps are not skipped."""
        if engine_owns_gradients(self.trainer.strategy):
            return
        self.normalizer.finish(list(self.student.parameters()), world_size=self.trainer.world_size,
                               accumulate=self.trainer.accumulate_grad_batches,
                               reduce=lambda counts: self.trainer.strategy.reduce(counts, reduce_op="sum"),
                               scale_gradients=not self.optimizer_cfg.in_backward)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under bf16 mixed precision, where Lightning refuses to clip for a fused
        optimizer (`optim.clip_without_scaler`)."""
        if not clip_without_scaler(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.optimizer_cfg.in_backward and self._trainer is not None:
            check_trainer_for_step_in_backward(self._trainer)
        total = int(self.trainer.max_steps) if self.trainer and self.trainer.max_steps > 0 else 1
        fused = fused_choice(self.optimizer_cfg, params, self._trainer)
        return build_optimizer(params, self.optimizer_cfg, self.scheduler_cfg, total, fused)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the teacher followed the last optimizer step in `optimizer_step`, before any checkpoint of that step
        if not self.teacher.persistent:  # frozen/external copies are rebuilt at start-up, not saved
            for key in [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]:
                del checkpoint["state_dict"][key]
        checkpoint["lightning_sd"] = self.step_metrics.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.step_metrics.load(checkpoint.get("lightning_sd", {}))

    def validation_step(self, batch: StepBatch, batch_idx: int):
        result = generate_and_verify(self, batch, self.eval_sampling)
        if result["correct"]:
            self.val_accuracy(torch.tensor(result["correct"], dtype=torch.float32))
            self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=len(result["correct"]))
