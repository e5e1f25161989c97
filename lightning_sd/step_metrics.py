"""`StepMetrics`: what each training step reports, and what happens to a step whose loss is not finite.

Every micro-batch logs `train/<key>` (loss, divergence, completion length, share of rollouts cut, reward, speeds and
the step diagnostics of `Scorer.diagnostics`); the run means of `SUMMARIZED` go to `metrics.json`
(`summary`). A non-finite loss skips the step (`loss.nonfinite=skip`, stopping after `loss.nonfinite_limit` in a
row) or stops the run with the batch saved (`stop`). The counts survive a checkpoint (`state` / `load`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_sd.batch import LossOutput, StepBatch

# step diagnostics (`Scorer.diagnostics`), logged as train/<key>
DIAGNOSTICS = ("no_signal_rows", "teacher_advantage", "teacher_advantage_std", "clipped_teacher_mass",
               "importance_weight")
# averaged over the run into metrics.json (`StepMetrics.summary`)
SUMMARIZED = ("truncated", "masked_rows", "reward", "completion_len", "gen_tokens_per_s",
              "train_tokens_per_s") + DIAGNOSTICS
PROGRESS_BAR = ("loss", "divergence", "reward", "truncated", "teacher_advantage")
LOGGED = ("loss", "divergence", "completion_len", "truncated", "reward", "gen_tokens_per_s", "train_tokens_per_s",
          "masked_rows", "on_policy", "rollout_copy_bytes") + DIAGNOSTICS


class StepMetrics(nn.Module):
    """The step's logged values and run means, and the counts of skipped steps (`empty_steps`: no signal;
    `nonfinite_steps`). A submodule of the LightningModule, which it logs through."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({k: torchmetrics.MeanMetric() for k in LOGGED})
        self.totals: dict[str, list[float]] = {}  # key -> [sum over steps, steps]: the run means
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0  # micro-batches skipped as non-finite since the last finite one
        self.empty_steps = 0  # optimizer steps skipped because no token of any micro-batch on any rank had signal
        self.warned_truncation = False

    def _log(self, module, key: str, value: Any, batch_size: int) -> None:
        value = value.detach().float().cpu() if torch.is_tensor(value) else float(value)
        self.means[key](value)
        if key in SUMMARIZED:
            total = self.totals.setdefault(key, [0.0, 0])
            total[0] += float(value)
            total[1] += 1
        module.log(f"train/{key}", self.means[key], on_step=True, on_epoch=False, prog_bar=key in PROGRESS_BAR,
                   batch_size=batch_size)

    def log_step(self, module, batch: StepBatch, out: LossOutput, row_mask: torch.Tensor, *, dataset: bool,
                 mixes_dataset: bool) -> None:
        """Log one finite micro-batch: `row_mask` `[R]` the rows with a teacher context; `dataset`: the batch
        trained on dataset completions, not samples; `mixes_dataset`: some batches do (`loss.lmbda < 1`), so the
        share of on-policy batches is logged."""
        self.nonfinite_in_a_row = 0
        rollout = batch.rollout
        valid = out.mask
        lengths = rollout.completion_mask.sum(-1).float()
        truncated = float(rollout.truncated.float().mean())
        divergence = (out.per_token.detach() * valid).sum() / valid.sum().clamp(min=1)
        values = {"loss": out.value, "divergence": divergence, "completion_len": lengths.mean(),
                  "masked_rows": (~row_mask).float().mean(), **batch.diagnostics}
        if not dataset:  # a demonstration is never cut: counting it would dilute the share of rollouts cut
            values["truncated"] = truncated
        rewards = [r for r in batch.rewards or [] if r is not None]
        if rewards:
            values["reward"] = sum(rewards) / len(rewards)
        if batch.gen_seconds:
            values["gen_tokens_per_s"] = lengths.sum() / batch.gen_seconds
        if rollout.extras.get("rollout_copy_bytes"):  # generation.dtype: the rollout's cast copy of the weights
            values["rollout_copy_bytes"] = float(rollout.extras["rollout_copy_bytes"])
        if mixes_dataset:
            values["on_policy"] = float(not dataset)
        if truncated > 0.5 and not dataset and not self.warned_truncation:
            self.warned_truncation = True
            rank_zero_warn(f"{truncated:.0%} of this step's rollouts reached generation.max_new_tokens without a stop "
                           "token: the teacher's signal on the answer is missing. Raise generation.max_new_tokens or "
                           "ask for shorter answers (train/truncated shows the share every step)")
        for key, value in values.items():
            self._log(module, key, value, rollout.completion_ids.size(0))

    def log_batch_end(self, module, tokens: float | None, seconds: float) -> None:
        """After the micro-batch: the training speed (`tokens` trained in `seconds`) and the empty-step count."""
        if tokens is not None and seconds > 0:
            self._log(module, "train_tokens_per_s", tokens / seconds, 1)
        module.log("train/empty_steps", float(self.empty_steps), on_step=True, on_epoch=False, batch_size=1)

    def nonfinite(self, module, batch: StepBatch, out: LossOutput, *, mode: str, limit: int | None,
                  run_dir: str | None) -> None:
        """A micro-batch whose loss is not finite on some rank (every rank calls this, so none hangs): skipped
        with a warning (`mode="skip"`; after `limit` in a row the run stops), or the run stops with the batch saved
        in the run folder (`mode="stop"`). Returns None, which makes Lightning skip backward and the update."""
        self.nonfinite_steps += 1
        module.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, batch_size=1)
        step = module.global_step
        bad = (~torch.isfinite(out.per_token) & out.mask.bool()).any(-1).nonzero().flatten().tolist()
        ids = sorted({str(batch.records[int(batch.rollout.prompt_index[r])].get("id")) for r in bad})
        where = (f"non-finite loss at step {step} (non-finite per-token terms in rollout rows "
                 f"{bad or 'none: the sum overflowed'}, record ids {ids})")
        if mode == "stop":
            trainer = module._trainer
            rank = trainer.global_rank if trainer is not None and trainer.world_size > 1 else None
            name = f"nonfinite_batch_step{step}" + (f"_rank{rank}" if rank is not None else "") + ".pt"
            path = os.path.join(run_dir or ".", name)
            torch.save({"records": batch.records, "rollout": batch.rollout, "per_token": out.per_token,
                        "mask": out.mask, "completion_text": batch.completion_text,
                        "prompt_text": batch.prompt_text, "step": step, "bad_rows": bad}, path)
            raise FloatingPointError(f"{where}; the batch is saved in {path} (inspect it with torch.load(path, "
                                     "weights_only=False); set loss.nonfinite=skip to skip such steps instead)")
        self.nonfinite_in_a_row += 1
        if limit and self.nonfinite_in_a_row >= limit:
            first = step - self.nonfinite_in_a_row + 1
            raise FloatingPointError(
                f"{where}: {self.nonfinite_in_a_row} steps in a row (from step {first}) had a non-finite loss and "
                f"were skipped; stopping (loss.nonfinite_limit={limit}). The run has diverged or its data breaks "
                f"it: {os.path.join(run_dir or '<run folder>', 'checkpoints', 'last.ckpt')} keeps the last "
                "good state; resume from it (ckpt_path=last) with a lower optimizer.lr, or after fixing the data "
                "named above, or set loss.nonfinite_limit=null to keep skipping")
        warnings.warn(f"{where}: step skipped (no backward, no optimizer step); {self.nonfinite_steps} skipped so far "
                      "(loss.nonfinite=skip; set loss.nonfinite=stop to stop and save the batch)", stacklevel=3)

    def summary(self) -> dict[str, float]:
        """Run means of the step diagnostics (`SUMMARIZED`, one value per micro-batch on this rank), plus the
        counts of skipped steps: `empty_steps` (no signal) and `nonfinite_steps`."""
        means = {k: total[0] / total[1] for k, total in sorted(self.totals.items()) if total[1]}
        return {**means, "empty_steps": self.empty_steps, "nonfinite_steps": self.nonfinite_steps}

    def state(self) -> dict:
        """What a checkpoint keeps (`load` restores it)."""
        return {"nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "empty_steps": self.empty_steps, "warned_truncation": self.warned_truncation,
                "diagnostic_totals": {k: list(v) for k, v in self.totals.items()}}

    def load(self, state: dict) -> None:
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.empty_steps = state.get("empty_steps", 0)
        self.warned_truncation = state.get("warned_truncation", False)
        self.totals = {k: list(v) for k, v in state.get("diagnostic_totals", {}).items()}


__all__ = ["DIAGNOSTICS", "LOGGED", "PROGRESS_BAR", "SUMMARIZED", "StepMetrics"]
