"""Callbacks and plugins: the rollout callback (`OnPolicyGeneration`, samples from the current student before each
step), and for reliable, inspectable runs: atomic checkpoints (`AtomicCheckpointIO`), random
states in checkpoints (`RngState`), per-token HTML views (`TokenView`), sample tables (`SampleTable`), a
progress bar over optimizer steps (`TrainingProgressBar`), verifier-failure counts (`FailureCounters`),
learning curves (`PeriodicEvaluation`) and the continual-learning accuracy matrix (`ContinualEvaluation`).

`build_callbacks(...)` turns the `callbacks` config group (plus `logger.log_samples_every`) into them."""

from __future__ import annotations

from lightning_sd.callbacks.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from lightning_sd.callbacks.continual import ContinualEvaluation, continual_metrics
from lightning_sd.callbacks.counters import FailureCounters
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.callbacks.periodic_eval import PeriodicEvaluation
from lightning_sd.callbacks.progress import TrainingProgressBar
from lightning_sd.callbacks.rng import RngState
from lightning_sd.callbacks.run_checkpoint import RunCheckpoint
from lightning_sd.callbacks.samples import SampleTable
from lightning_sd.callbacks.token_view import TokenView


def build_callbacks(c, log_samples_every: int | None = None,
                    enable_progress_bar: bool = True) -> tuple[list, list, list]:
    """From a `CallbacksConfig` `c`: `(first, last, plugins)`. `first` must precede `OnPolicyGeneration` in
    the Trainer's callback list (`RngState` restores the generators before anything draws), `last` follows
    it; `plugins` go to `Trainer(plugins=...)`."""
    first = [RngState()] if c.rng_state else []
    last: list = [FailureCounters()]
    if c.token_view_every:
        last.append(TokenView(every_n_steps=c.token_view_every, rows=c.token_view_rows, topk=c.token_view_topk))
    if log_samples_every:
        last.append(SampleTable(every_n_steps=log_samples_every, rows=c.sample_rows))
    if enable_progress_bar and c.progress_bar == "rich":
        last.append(TrainingProgressBar())
    elif enable_progress_bar and c.progress_bar == "tqdm":
        from lightning.pytorch.callbacks import TQDMProgressBar

        last.append(TQDMProgressBar())
    plugins = [AtomicCheckpointIO(keep_previous=c.keep_previous_checkpoint)] if c.atomic_checkpoints else []
    return first, last, plugins


__all__ = ["AtomicCheckpointIO", "ContinualEvaluation", "FailureCounters", "OnPolicyGeneration", "PeriodicEvaluation",
           "RngState",
           "RunCheckpoint", "SampleTable", "TokenView", "TrainingProgressBar", "atomic_torch_save", "build_callbacks",
           "continual_metrics"]
