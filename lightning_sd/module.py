"""`SelfDistillationModule`: the LightningModule that ties student, teacher policy, teacher context and
objective together. Read `training_step` top to bottom: rollouts (put in the batch by the
`OnPolicyGeneration` callback) -> teacher inputs -> teacher scores (no grad) -> student scores -> the method's
terms (`self.method`, a `lightning_sd.methods.Method`) -> reduce -> step. The batch's fields: `batch.StepBatch`.

Shapes: R rollout rows (B prompts x n samples), P / P' student / teacher prompt lengths (left-padded),
C completion length (right-padded), V vocabulary, H hidden size.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_sd.batch import LossOutput, StepBatch, TeacherInputs, as_step_batch
from lightning_sd.contexts import ContextBuilder, RowView
from lightning_sd.data.prompts import encode_prompts, ensure_pad_token, format_prompt, record_system
from lightning_sd.distributed import (all_ranks, ends_optimizer_step, engine_owns_gradients, global_sum,
                                      shards_parameters)
from lightning_sd.evaluation import generate_and_verify
from lightning_sd.forward import completion_hidden, completion_logits
from lightning_sd.losses import completion_mask_skip_first, contrastive_target_logits
from lightning_sd.methods import (Method, Step, generate_analyses, is_dataset_rollout, on_policy_batch,
                                  reference_rollout)
from lightning_sd.objectives import LossConfig
from lightning_sd.sampling import Rollout, SamplingConfig
from lightning_sd.scoring import Scorer
from lightning_sd.step_in_backward import OptimizerInBackward, check_step_in_backward
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


# step diagnostics (`SelfDistillationModule.step_diagnostics`), logged as train/<key>
DIAGNOSTICS = ("no_signal_rows", "teacher_advantage", "teacher_advantage_std", "clipped_teacher_mass")
# averaged over the run into metrics.json (`diagnostics_summary`)
SUMMARIZED = ("truncated", "masked_rows", "reward", "completion_len", "gen_tokens_per_s",
              "train_tokens_per_s") + DIAGNOSTICS
PROGRESS_BAR = ("loss", "divergence", "reward", "truncated", "teacher_advantage")


@dataclass
class OptimizerConfig:
    """The `optimizer` group (`configure_optimizers`); the defaults are conf/optimizer/adamw.yaml's."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: a fused update kernel where torch has one and no strategy shards params
    in_backward: bool = False  # true: each parameter stepped inside backward, its gradient freed (OptimizerInBackward)


@dataclass
class SchedulerConfig:
    """The `scheduler` group: a warmup, then constant, linear or cosine decay to `min_lr_ratio`."""

    name: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


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
        optimizer: dict of `OptimizerConfig` keys `{name: adamw|sgd, lr, weight_decay, betas, eps, fused,
            in_backward}` (`in_backward`: see `OptimizerInBackward`);
            scheduler: dict of `SchedulerConfig` keys `{name: constant|linear|cosine, warmup_steps, min_lr_ratio}`;
            a key left out takes the schema's default.
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
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        max_prompt_length: int | None = None,
        truncation: str = "left",
        system_prompt: str | None = None,
        eval_sampling: SamplingConfig | None = None,
        run_dir: str | None = None,
    ) -> None:
        super().__init__()
        quiet_intended_lightning_notes()
        self.student = student
        self.tokenizer = tokenizer
        self.pad_token_id = ensure_pad_token(tokenizer)
        self.loss_cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_dict(loss)
        self.loss_cfg.validate()
        self.teacher = teacher if isinstance(teacher, TeacherPolicy) else build_teacher(
            teacher, student, **(teacher_kwargs or {}))
        if self.loss_cfg.chunk_size and self.teacher.kind == "trust_region":
            raise ValueError("loss.chunk_size (memory-bounded loss) does not support teacher=trust_region: its "
                             "teacher logits are an interpolation; set loss.chunk_size=null")
        self.method = method if method is not None else self.loss_cfg.method()
        self.context = context or self.method.context()
        self.scorer = Scorer(self.loss_cfg, student_weight=lambda: self._output_weight(self.student),
                             teacher_weight=self.teacher_output_weight)
        self.task = task
        self.optimizer_cfg = {**asdict(OptimizerConfig()), **(optimizer or {})}
        self.scheduler_cfg = {**asdict(SchedulerConfig()), **(scheduler or {})}
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.system_prompt = system_prompt
        self.eval_sampling = eval_sampling or SamplingConfig(do_sample=False)
        self.run_dir = run_dir
        self.strict_loading = False  # a frozen teacher is not saved; it is rebuilt from the initial model
        metric_names = ("loss", "divergence", "completion_len", "truncated", "reward", "gen_tokens_per_s",
                        "train_tokens_per_s", "masked_rows", "on_policy", "rollout_copy_bytes") + DIAGNOSTICS
        self.train_metrics = nn.ModuleDict({k: torchmetrics.MeanMetric() for k in metric_names})
        self.val_accuracy = torchmetrics.MeanMetric()
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0  # micro-batches skipped as non-finite since the last finite one
        self.empty_steps = 0  # optimizer steps skipped because no token of any micro-batch on any rank had signal
        self.diagnostic_totals: dict[str, list[float]] = {}  # key -> [sum over steps, steps]: run means
        self._norm_count = 0.0  # valid tokens (or sequences) accumulated for the current optimizer step
        self._signal_count = 0.0  # loss-bearing tokens accumulated for the current optimizer step
        self._counted_batches = 0  # micro-batches of the current optimizer step that reached the loss
        self._step_was_empty = False
        self._warned_truncation = False
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
        """Whether this batch trains on fresh student samples (asked by `OnPolicyGeneration`). With
        `loss.lmbda < 1` a batch uses dataset completions instead, decided from `(seed, global_step,
        batch_idx)` only, so every rank decides the same."""
        return self.needs_rollouts and on_policy_batch(self.loss_cfg.lmbda, seed, global_step, batch_idx)

    def dataset_rollout(self, batch: StepBatch) -> Rollout:
        """The batch's reference solutions as a `Rollout` (SFT, and on-policy KD's dataset batches)."""
        rollout = reference_rollout(batch.records, batch.prompt_ids, batch.prompt_mask, self.tokenizer,
                                    pad_token_id=self.pad_token_id)
        batch.completion_text = [r["solution"] for r in batch.records]
        return rollout

    # ------------------------------------------------------------------ hooks users override
    def build_teacher_inputs(self, batch: StepBatch, placebo: bool = False) -> TeacherInputs:
        """Teacher prompts for each rollout row: `{"prompt_ids": [R, P'], "prompt_mask": [R, P'],
        "row_mask": [R] (0 = no privileged signal, row masked out), "texts": list[str]}`.

        `placebo=True` (the contrastive teacher, `loss.contrast`): the same template around the *next* record's
        fields in the batch, with this record's own `prompt` (and `instruction`)."""
        rollout: Rollout = batch.rollout
        records = batch.records
        if placebo:
            records = [{**records[(i + 1) % len(records)], **{k: rec[k] for k in ("prompt", "instruction") if k in rec}}
                       for i, rec in enumerate(records)]
        n = rollout.prompt_ids.size(0) // len(records)
        texts: list[str] = []
        row_mask = []
        completions = batch.completion_text or [""] * rollout.prompt_ids.size(0)
        rewards = batch.rewards
        feedback = batch.feedback
        analyses = (generate_analyses(self, records, self.loss_cfg.reason_max_new_tokens)
                    if self.loss_cfg.reason_first else None)
        if analyses is not None:
            batch.analyses = analyses
        for r in range(rollout.prompt_ids.size(0)):
            i = int(rollout.prompt_index[r])
            group = range(i * n, (i + 1) * n)
            view = RowView(
                completion=completions[r],
                reward=None if rewards is None else rewards[r],
                feedback=None if feedback is None else feedback[r],
                siblings=[completions[j] for j in group if j != r],
                sibling_rewards=[None if rewards is None else rewards[j] for j in group if j != r],
                extra={} if analyses is None else {"analysis": analyses[i]},
            )
            text = self.context(records[i], view)
            row_mask.append(text is not None)
            texts.append(text if text is not None else records[i]["prompt"])
        formatted = [format_prompt(self.tokenizer, t, system=record_system(records[int(rollout.prompt_index[r])],
                                                                           self.system_prompt))
                     for r, t in enumerate(texts)]
        enc = encode_prompts(self.tokenizer, formatted, max_length=self.max_prompt_length,
                             truncation=self.truncation, pad_token_id=self.pad_token_id)
        device = rollout.completion_ids.device
        return {"prompt_ids": enc.ids.to(device), "prompt_mask": enc.mask.to(device),
                "row_mask": torch.tensor(row_mask, dtype=torch.bool, device=device), "texts": texts}

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
        run = self._run(teacher_inputs["prompt_ids"], teacher_inputs["prompt_mask"], batch.rollout)
        return self.teacher.score(self.student, run)

    def _output_weight(self, network: nn.Module) -> torch.Tensor:
        return network.get_output_embeddings().weight

    def teacher_output_weight(self) -> torch.Tensor:
        """The teacher's output embedding `[V, H]`, detached (for logits from teacher hidden states)."""
        with self.teacher.sampling_network(self.student) as network:
            return self._output_weight(network).detach()

    def compute_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, batch: StepBatch,
                     teacher_inputs: TeacherInputs) -> LossOutput:
        """Returns `{"loss": scalar to backpropagate, "value": normalized loss for logging, "per_token": [R, C],
        "mask": [R, C], "count": local normalizer, "signal": [R, C] bool}`.

        `loss` is the *sum* of the per-token (or per-sequence) terms; `on_before_optimizer_step` divides the
        gradients by the global count of the optimizer step (all micro-batches, all ranks), so the update
        does not depend on how the batch was split. `signal` marks the tokens whose term can carry a gradient
        (a GRPO row with zero advantage counts in `mask` but not here); an optimizer step whose global count of
        signal tokens is zero is skipped."""
        rollout: Rollout = batch.rollout
        scorer = self.scorer
        step = Step(rollout=rollout, records=batch.records, rewards=batch.rewards,
                    mask=self.trainable_mask(rollout), row_mask=teacher_inputs["row_mask"],
                    logprobs=lambda: scorer.student_logprobs(student_out, rollout),
                    distillation=lambda mask: scorer.distillation(student_out, teacher_out, rollout, mask,
                                                                  step.importance_weights),
                    _weights=lambda: self.importance_weights(student_out, rollout))
        terms = self.method.terms(step)
        return scorer.reduce(terms.per_token, terms.mask, signal=terms.signal)

    def trainable_mask(self, rollout: Rollout) -> torch.Tensor:
        """`[R, C]` the completion tokens that may train: `completion_mask` without the first `loss.skip_first`
        tokens of each row (the one place `skip_first` is applied)."""
        mask, skip = rollout.completion_mask, self.loss_cfg.skip_first
        return completion_mask_skip_first(mask, skip) if skip else mask

    def importance_weights(self, student_out: torch.Tensor, rollout: Rollout) -> torch.Tensor | None:
        """`[R, C]` detached importance weights against the sampler, or None (`Scorer.importance_weights`)."""
        return self.scorer.importance_weights(student_out, rollout)

    def _token_diagnostics(self, student_out: torch.Tensor, teacher_out: torch.Tensor, tokens: torch.Tensor,
                           rows: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scorer.token_diagnostics(student_out, teacher_out, tokens, rows)

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: StepBatch, batch_idx: int):
        if batch.rollout is None:
            if self.needs_rollouts and batch.on_policy is not False:
                raise RuntimeError(
                    "batch has no 'rollout': add lightning_sd.OnPolicyGeneration(...) to the Trainer's callbacks "
                    "(it samples completions from the student before each training step)")
            batch.rollout = self.dataset_rollout(batch)  # SFT, or a dataset batch of on-policy KD (lmbda)
        self._t_train_start = time.perf_counter()
        placebo_out = None
        if self.needs_teacher:
            teacher_inputs = self.build_teacher_inputs(batch)
            teacher_out = self.teacher_forward(batch, teacher_inputs)
            if self.loss_cfg.contrast is not None:  # the same template around another record's context
                placebo_inputs = self.build_teacher_inputs(batch, placebo=True)
                placebo_out = self.teacher_forward(batch, placebo_inputs)
                teacher_inputs["row_mask"] = teacher_inputs["row_mask"] & placebo_inputs["row_mask"]
        else:  # sft, grpo, rl_feedback with grpo_mix=1: no teacher forward
            rows = batch.rollout.completion_ids.size(0)
            teacher_inputs = {"row_mask": torch.ones(rows, dtype=torch.bool, device=batch.rollout.completion_ids.device)}
            teacher_out = None
        student_out = self.student_forward(batch)
        if placebo_out is not None:
            teacher_out = contrastive_target_logits(student_out, teacher_out, placebo_out, self.loss_cfg.contrast)
            del placebo_out
        out = self.compute_loss(student_out, teacher_out, batch, teacher_inputs)
        batch.loss_terms = {"per_token": out["per_token"].detach(), "mask": out["mask"]}
        batch.diagnostics = self.step_diagnostics(student_out, teacher_out, batch, out, teacher_inputs)
        keep_topk = self.teacher_topk_requested()
        if keep_topk and teacher_out is not None:
            from lightning_sd.token_heatmap import teacher_topk

            batch.loss_terms["teacher_topk"] = teacher_topk(self, teacher_out, keep_topk)
        if not all_ranks(self._trainer, bool(torch.isfinite(out["loss"]))):  # skip on every rank or none (no hang)
            return self._nonfinite(batch, out)
        self.nonfinite_in_a_row = 0
        if self.loss_cfg.reduction != "sum":
            self._norm_count += out["count"]
        self._signal_count += float(out["signal"].sum())
        self._counted_batches += 1
        self._log_step(batch, out, teacher_inputs)
        if self._trainer is not None and engine_owns_gradients(self._trainer.strategy) and self.loss_cfg.reduction != "sum":
            # DeepSpeed keeps gradients inside its engine: normalize the loss by this micro-batch's global count
            # (the engine then averages over ranks); exact for accumulate_grad_batches=1, see docs/scaling.md
            self._norm_count = 0.0
            return out["loss"] * self._trainer.world_size / max(global_sum(self._trainer, out["count"]), 1.0)
        if self._in_backward():
            return self._loss_for_step_in_backward(out)
        return out["loss"]

    def _loss_for_step_in_backward(self, out: LossOutput) -> torch.Tensor | None:
        """With `optimizer.in_backward` the weights change during backward, before `on_before_optimizer_step`
        could scale the gradients: the loss is normalized here instead (one device, one micro-batch a step, so this
        batch's count is the step's total), and a batch without signal runs no backward at all (no update, as for
        any empty step)."""
        if float(out["signal"].sum()) <= 0:
            return None
        if self.loss_cfg.reduction == "sum" or float(out["count"]) <= 0:
            return out["loss"]
        return out["loss"] / out["count"]

    def teacher_topk_requested(self) -> int:
        """How many of the teacher's top alternatives per token this step keeps in `batch.loss_terms`: the
        most any callback asks for (a callback's `wants_teacher_topk()`, e.g. `TokenView` on the steps it
        renders); 0 without a trainer."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return max((int(cb.wants_teacher_topk()) for cb in callbacks if hasattr(cb, "wants_teacher_topk")),
                   default=0)

    def _nonfinite(self, batch: StepBatch, out: LossOutput):
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, batch_size=1)
        bad = (~torch.isfinite(out["per_token"]) & out["mask"].bool()).any(-1).nonzero().flatten().tolist()
        ids = sorted({str(batch.records[int(batch.rollout.prompt_index[r])].get("id")) for r in bad})
        where = (f"non-finite loss at step {self.global_step} (non-finite per-token terms in rollout rows "
                 f"{bad or 'none: the sum overflowed'}, record ids {ids})")
        if self.loss_cfg.nonfinite == "stop":
            rank = self._trainer.global_rank if self._trainer is not None and self._trainer.world_size > 1 else None
            name = f"nonfinite_batch_step{self.global_step}" + (f"_rank{rank}" if rank is not None else "") + ".pt"
            path = os.path.join(self.run_dir or ".", name)
            torch.save({"records": batch.records, "rollout": batch.rollout, "per_token": out["per_token"],
                        "mask": out["mask"], "completion_text": batch.completion_text,
                        "prompt_text": batch.prompt_text, "step": self.global_step, "bad_rows": bad}, path)
            raise FloatingPointError(f"{where}; the batch is saved in {path} (inspect it with torch.load(path, "
                                     "weights_only=False); set loss.nonfinite=skip to skip such steps instead)")
        self.nonfinite_in_a_row += 1
        limit = self.loss_cfg.nonfinite_limit
        if limit and self.nonfinite_in_a_row >= limit:
            first = self.global_step - self.nonfinite_in_a_row + 1
            raise FloatingPointError(
                f"{where}: {self.nonfinite_in_a_row} steps in a row (from step {first}) had a non-finite loss and "
                f"were skipped; stopping (loss.nonfinite_limit={limit}). The run has diverged or its data breaks "
                f"it: {os.path.join(self.run_dir or '<run folder>', 'checkpoints', 'last.ckpt')} keeps the last "
                "good state; resume from it (ckpt_path=last) with a lower optimizer.lr, or after fixing the data "
                "named above, or set loss.nonfinite_limit=null to keep skipping")
        import warnings

        warnings.warn(f"{where}: step skipped (no backward, no optimizer step); {self.nonfinite_steps} skipped so far "
                      "(loss.nonfinite=skip; set loss.nonfinite=stop to stop and save the batch)", stacklevel=2)
        return None  # Lightning skips backward and the optimizer step for this batch

    @torch.no_grad()
    def step_diagnostics(self, student_out: torch.Tensor, teacher_out: torch.Tensor | None, batch: StepBatch, out: LossOutput,
                         teacher_inputs: TeacherInputs) -> dict[str, float]:
        """What this step teaches, as plain floats (logged as `train/<key>`, averaged into `metrics.json`):

        - `no_signal_rows`: share of rollout rows with no loss-bearing token (masked: no context, no successful
          sibling; GRPO: zero advantage; every token skipped).
        - `teacher_advantage`, `teacher_advantage_std`: mean and spread over the trained positions of
          `log T(y_t) - log S(y_t)` at `loss.temperature`, the teacher's per-token advantage of the sampled text
          (> 0: the teacher likes the student's own tokens better than the student does).
        - `clipped_teacher_mass` (with `loss.entry_clip`): the share of the teacher's probability mass on entries
          the clip bounds, averaged over the trained positions of the step's first 4 rollout rows (a sample:
          computing it for every row costs about as much as the loss itself).
        Teacher-free methods (SFT, GRPO) report `no_signal_rows` only."""
        rollout: Rollout = batch.rollout
        values = {"no_signal_rows": float((~out["signal"].any(-1)).float().mean())}
        if teacher_out is None:
            return values
        mask = self.trainable_mask(rollout)
        keep = (mask * teacher_inputs["row_mask"][:, None].to(mask.dtype)).bool()
        if not keep.any():
            return values
        advantage, clipped = self._token_diagnostics(student_out, teacher_out, rollout.completion_ids)
        advantage = advantage[keep]
        values["teacher_advantage"] = float(advantage.mean())
        values["teacher_advantage_std"] = float(advantage.std(unbiased=False))
        if clipped is not None and keep[: clipped.size(0)].any():
            values["clipped_teacher_mass"] = float(clipped[keep[: clipped.size(0)]].mean())
        return values

    def _log_step(self, batch: StepBatch, out: LossOutput, teacher_inputs: TeacherInputs) -> None:
        rollout: Rollout = batch.rollout
        m = self.train_metrics
        valid = out["mask"]
        div = (out["per_token"].detach() * valid).sum() / valid.sum().clamp(min=1)
        lengths = rollout.completion_mask.sum(-1).float()
        truncated = float(rollout.truncated.float().mean())
        values = {"loss": out["value"], "divergence": div, "completion_len": lengths.mean(), "truncated": truncated,
                  "masked_rows": (~teacher_inputs["row_mask"]).float().mean(), **batch.diagnostics}
        if batch.rewards is not None:
            rewards = [r for r in batch.rewards if r is not None]
            if rewards:
                values["reward"] = torch.tensor(sum(rewards) / len(rewards))
        if batch.gen_seconds:
            values["gen_tokens_per_s"] = lengths.sum() / batch.gen_seconds
        if rollout.extras.get("rollout_copy_bytes"):  # generation.dtype: the rollout's cast copy of the weights
            values["rollout_copy_bytes"] = float(rollout.extras["rollout_copy_bytes"])
        if self.loss_cfg.lmbda < 1.0:
            values["on_policy"] = float(not is_dataset_rollout(rollout))
        if truncated > 0.5 and not is_dataset_rollout(rollout) and not self._warned_truncation:
            self._warned_truncation = True
            rank_zero_warn(f"{truncated:.0%} of this step's rollouts reached generation.max_new_tokens without a stop "
                           "token: the teacher's signal on the answer is missing. Raise generation.max_new_tokens or "
                           "ask for shorter answers (train/truncated shows the share every step)")
        for k, v in values.items():
            v = v.detach().float().cpu() if torch.is_tensor(v) else float(v)
            m[k](v)
            if k in SUMMARIZED:
                total = self.diagnostic_totals.setdefault(k, [0.0, 0])
                total[0] += float(v)
                total[1] += 1
            self.log(f"train/{k}", m[k], on_step=True, on_epoch=False, prog_bar=k in PROGRESS_BAR,
                     batch_size=rollout.completion_ids.size(0))

    def diagnostics_summary(self) -> dict[str, float]:
        """Run means of the step diagnostics (`SUMMARIZED`, one value per micro-batch on this rank), plus the
        counts of skipped steps: `empty_steps` (no signal) and `nonfinite_steps`."""
        summary = {k: total[0] / total[1] for k, total in sorted(self.diagnostic_totals.items()) if total[1]}
        return {**summary, "empty_steps": self.empty_steps, "nonfinite_steps": self.nonfinite_steps}

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
        if batch.rollout is not None and self._t_train_start:
            seconds = time.perf_counter() - self._t_train_start
            tokens = float(batch.rollout.completion_mask.sum())
            rate = tokens / max(seconds, 1e-9)
            self.train_metrics["train_tokens_per_s"](rate)
            total = self.diagnostic_totals.setdefault("train_tokens_per_s", [0.0, 0])
            total[0], total[1] = total[0] + rate, total[1] + 1
            self.log("train/train_tokens_per_s", self.train_metrics["train_tokens_per_s"], on_step=True,
                     on_epoch=False, batch_size=1)
        self.log("train/empty_steps", float(self.empty_steps), on_step=True, on_epoch=False, batch_size=1)

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
        if self._step_was_empty:  # nothing was learned (the teacher does not follow either): counted
            self.empty_steps += 1
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
        if self._step_was_empty:
            return
        super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Exact global normalization, and no update without signal.

        Gradients of the summed terms are divided by the total count of the optimizer step over all
        micro-batches and ranks (Lightning divided each micro-batch loss by the accumulation factor and DDP/FSDP
        average over ranks; both are undone here). Under FSDP the gradients are this rank's shards
        (`use_orig_params=True`), scaled in place.

        When no micro-batch on any rank had a loss-bearing token (every row masked, no successful sibling, equal
        rewards in every group) the gradients are dropped (`None`): the optimizer then leaves the weights and
        its state untouched (AdamW would otherwise keep moving on its momentum), the scheduler does not advance,
        the teacher does not follow, and `train/empty_steps` counts the step. Under DeepSpeed the engine owns the
        gradients and the step: the loss was normalized in `training_step` instead, and empty steps are not
        skipped."""
        if engine_owns_gradients(self.trainer.strategy):
            return
        counts = torch.tensor([self._norm_count, self._signal_count, self._counted_batches], dtype=torch.float64,
                              device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        total, signal, counted = (float(c) for c in counts.cpu())
        self._norm_count = self._signal_count = self._counted_batches = 0
        # a step whose micro-batches were all skipped as non-finite has no gradients either; it is counted there
        self._step_was_empty = signal <= 0 and counted > 0
        if self._step_was_empty:
            for p in self.student.parameters():
                p.grad = None
            return
        if self.loss_cfg.reduction == "sum" or total <= 0 or self._in_backward():  # in backward: done in the loss
            return
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)

    def _gradient_scaler(self):
        """The trainer's loss scaler (fp16 mixed precision), or None (bf16 mixed precision, fp32, no trainer)."""
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        return getattr(plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under mixed precision without a loss scaler (bf16): there Lightning
        refuses to clip for a fused optimizer, a rule meant for the scaler that fp16 has and bf16 has not, so the
        gradients are clipped here directly (by norm or by value, as `trainer.gradient_clip_algorithm` says)."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self.trainer.precision_plugin
        if gradient_clip_val and type(plugin) is MixedPrecision and self._gradient_scaler() is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fused_optimizer(self, params: list[torch.Tensor]) -> bool | None:
        """`optimizer.fused`: true/false as given; null (auto) fuses the update into one kernel per parameter when
        every parameter is a plain floating tensor on CPU or CUDA and no strategy shards parameters or owns the
        optimizer (FSDP, DeepSpeed), and not when fp16's loss scaler must be undone before clipping. The for-loop
        AdamW that torch picks on CPU otherwise keeps per-parameter temporaries and is much slower (measurements:
        docs/performance.md)."""
        fused = self.optimizer_cfg.get("fused")
        if fused is not None:
            return bool(fused)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and (shards_parameters(strategy) or engine_owns_gradients(strategy)):
            return None
        if self._gradient_scaler() is not None and self._trainer.gradient_clip_val:
            return None
        plain = all(type(p) is nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                    for p in params)
        return True if plain and params else None

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        o = self.optimizer_cfg
        fused = self._fused_optimizer(params)
        if o["name"] == "adamw":
            def make(group: list[nn.Parameter]) -> torch.optim.Optimizer:
                return torch.optim.AdamW(group, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o["betas"]),
                                         eps=o["eps"], fused=fused)
        elif o["name"] == "sgd":
            def make(group: list[nn.Parameter]) -> torch.optim.Optimizer:
                return torch.optim.SGD(group, lr=o["lr"], weight_decay=o["weight_decay"], fused=fused)
        else:
            raise ValueError(f"optimizer.name={o['name']!r} is not one of 'adamw', 'sgd'")
        if o.get("in_backward"):
            self._check_step_in_backward()
            optimizer = OptimizerInBackward(params, make)
        else:
            optimizer = make(params)
        s = self.scheduler_cfg
        total = max(int(self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1), 1)
        warmup = int(s.get("warmup_steps") or 0)
        floor = float(s.get("min_lr_ratio") or 0.0)

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if s["name"] == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if s["name"] == "linear":
                return floor + (1 - floor) * (1 - progress)
            if s["name"] == "cosine":
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
            raise ValueError(f"scheduler.name={s['name']!r} is not one of 'constant', 'linear', 'cosine'")

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_step_in_backward(self) -> None:
        """`optimizer.in_backward` against the trainer this module runs under (the same rules train.py checks
        in the config at start-up, for a module used in one's own Lightning code)."""
        trainer = self._trainer
        if trainer is None:
            return
        strategy = type(trainer.strategy).__name__
        check_step_in_backward(
            gradient_clip_val=trainer.gradient_clip_val, accumulate_grad_batches=trainer.accumulate_grad_batches,
            processes=trainer.world_size, precision=str(trainer.precision),
            strategy=None if strategy in ("SingleDeviceStrategy", "SingleDeviceXLAStrategy") else strategy)

    def _in_backward(self) -> bool:
        return bool(self.optimizer_cfg.get("in_backward"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the teacher followed the last optimizer step in `optimizer_step`, before any checkpoint of that step
        if not self.teacher.persistent:  # frozen/external copies are rebuilt at start-up, not saved
            for key in [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]:
                del checkpoint["state_dict"][key]
        checkpoint["lightning_sd"] = {"nonfinite_steps": self.nonfinite_steps,
                                      "nonfinite_in_a_row": self.nonfinite_in_a_row,
                                      "empty_steps": self.empty_steps, "warned_truncation": self._warned_truncation,
                                      "diagnostic_totals": {k: list(v) for k, v in self.diagnostic_totals.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lightning_sd", {})
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.empty_steps = state.get("empty_steps", 0)
        self._warned_truncation = state.get("warned_truncation", False)
        self.diagnostic_totals = {k: list(v) for k, v in state.get("diagnostic_totals", {}).items()}

    def validation_step(self, batch: StepBatch, batch_idx: int):
        result = generate_and_verify(self, batch, self.eval_sampling)
        if result["correct"]:
            self.val_accuracy(torch.tensor(result["correct"], dtype=torch.float32))
            self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=len(result["correct"]))
