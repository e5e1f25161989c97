"""`TrainingProgressBar`: one rich progress bar over the optimizer steps of the whole run (not per epoch),
showing loss, divergence, reward and generation / training throughput in tokens per second."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar

SHOWN = (  # (logged metric, label, format)
    ("train/loss", "loss", ".4f"),
    ("train/divergence", "div", ".4f"),
    ("train/reward", "reward", ".2f"),
    ("train/truncated", "cut", ".0%"),  # share of rollouts that hit generation.max_new_tokens
    ("train/teacher_advantage", "adv", "+.3f"),  # mean log T(y) - log S(y) of the sampled tokens
    ("train/gen_tokens_per_s", "gen tok/s", ".0f"),
    ("train/train_tokens_per_s", "train tok/s", ".0f"),
    ("val/accuracy", "val acc", ".3f"),
    ("train/empty_steps", "skipped (no signal)", ".0f"),  # shown once something was skipped or failed
    ("train/nonfinite_steps", "skipped (non-finite)", ".0f"),
    ("train/verifier_failures", "verifier failures", ".0f"),
)


class TrainingProgressBar(RichProgressBar):
    """`RichProgressBar` whose train bar counts optimizer steps up to `trainer.max_steps` across epochs (and
    across a resume), labelled `step`, with the metrics of `SHOWN`."""

    @property
    def total_train_batches(self):
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"step · epoch {current_epoch}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is not None:  # one bar for the whole run
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        logged = trainer.callback_metrics
        out = {}
        for key, label, fmt in SHOWN:
            if key in logged:
                value = float(logged[key])
                if key in ("train/empty_steps", "train/nonfinite_steps", "train/verifier_failures") and value == 0:
                    continue
                out[label] = format(value, fmt) if math.isfinite(value) else str(value)
        return out


__all__ = ["TrainingProgressBar", "SHOWN"]
