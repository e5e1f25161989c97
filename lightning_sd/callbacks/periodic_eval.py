"""`PeriodicEvaluation`: the student's held-out accuracy every `every_n_steps` optimizer steps, against the
number of rollouts and tokens generated for training so far (the learning curve at a given generation budget).

Each point is `{"step", "samples", "tokens", "train_seconds", "accuracy", "mean_completion_tokens", "n"}`, plus
`"probes": {label: accuracy}` when given a data module with probes; `train_seconds` is the wall time of training
so far, evaluations excluded. `points` survives a checkpoint-resume. Points are logged as `curve/accuracy`,
`curve/samples` and `curve/<probe label>`."""

from __future__ import annotations

import time
from typing import Any, Iterable

from lightning.pytorch import Callback

from lightning_sd.batch import StepBatch
from lightning_sd.distributed import StepWatch


class PeriodicEvaluation(Callback):
    """Args:
        every_n_steps: optimizer steps between evaluations (the step-0 point is taken at train start).
        batches: a callable returning the eval batches (e.g. `datamodule.val_dataloader`), called each time.
        sampling: evaluation `SamplingConfig` (default: the module's greedy `eval_sampling`).
        probes: a data module whose probes (`probe_labels`, `eval_dataloader`, `probe_task`) are evaluated at
            every point too (greedy), or None.
    """

    def __init__(self, every_n_steps: int, batches: Any, sampling: Any = None, probes: Any = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"PeriodicEvaluation: every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.batches = batches
        self.sampling = sampling
        self.probes = probes
        self.points: list[dict] = []
        self.train_seconds = 0.0  # wall time of training so far, evaluations excluded
        self._clock: float | None = None
        self.samples = 0  # rollouts generated for training so far (completions of dataset rows are not counted)
        self.tokens = 0
        self._steps = StepWatch()

    def _measure(self, trainer, pl_module) -> None:
        from lightning_sd.evaluation import evaluate, evaluate_probes

        if self._clock is not None:
            self.train_seconds += time.perf_counter() - self._clock
        loader: Iterable = self.batches() if callable(self.batches) else self.batches
        res = evaluate(pl_module, loader, self.sampling, with_teacher=False, keep_samples=0)
        point = {"step": int(trainer.global_step), "samples": self.samples, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "accuracy": res.student_accuracy,
                 "mean_completion_tokens": res.mean_completion_tokens, "n": res.n}
        if self.probes is not None:
            point["probes"] = {label: r["student_accuracy"]
                               for label, r in evaluate_probes(pl_module, self.probes, keep_samples=0).items()}
        self.points.append(point)
        if trainer.logger:
            trainer.logger.log_metrics({"curve/accuracy": point["accuracy"], "curve/samples": float(self.samples),
                                        **{f"curve/{k}": v for k, v in (point.get("probes") or {}).items()}},
                                       step=point["step"])
        self._clock = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.points:
            self._measure(trainer, pl_module)
        self._clock = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = batch.rollout if isinstance(batch, StepBatch) else None
        if rollout is not None and batch.on_policy:
            self.samples += int(rollout.completion_ids.size(0))
            self.tokens += int(rollout.completion_mask.sum())
        if not self._steps.moved(trainer):  # no optimizer step in this batch (gradient accumulation)
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            if not self.points or self.points[-1]["step"] != step:
                self._measure(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"points": self.points, "samples": self.samples, "tokens": self.tokens,
                "train_seconds": self.train_seconds, **self._steps.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = list(state_dict.get("points", []))
        self.samples = int(state_dict.get("samples", 0))
        self.tokens = int(state_dict.get("tokens", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self._steps.load(state_dict)


__all__ = ["PeriodicEvaluation"]
