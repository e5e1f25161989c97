"""`RunCheckpoint`: Lightning's `ModelCheckpoint` for a run folder that may be moved, copied or mounted
elsewhere between a preemption and the resume.

Lightning keeps the absolute `dirpath` and `last_model_path` in the checkpoint; resumed from another folder it
drops them and, finding `last.ckpt` already there, writes `last-v1.ckpt`, `last-v2.ckpt`... while `last.ckpt`
stays at the old step. Here the checkpoint folder is always the one given now: `last.ckpt` in it is rewritten
in place (no version counter), and paths saved in a checkpoint are never read back.

It also turns SIGTERM (what schedulers send before a kill) and SIGINT (Ctrl-C) into a clean stop: the step in
progress finishes, `last.ckpt` is written (atomically, with `AtomicCheckpointIO`), and `Interrupted` is raised,
a `SystemExit` with the conventional status 128 + signal number (143 for SIGTERM, 130 for SIGINT); `train.py`
then writes `metrics.json` marked `interrupted` and prints how to resume. A second signal abandons the step in
progress at once: the previous `last.ckpt` stays.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sd.distributed import ends_optimizer_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """Training stopped by a signal. `code` (the exit status) is 128 + `signum`; `checkpoint` is the file that
    holds step `step` (None when the step in progress was abandoned before anything was saved)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, abandoned: bool = False) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint, self.abandoned = int(signum), step, checkpoint, abandoned

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def record(self) -> dict:
        return {"signal": self.signal_name, "exit_status": self.code, "step": self.step,
                "checkpoint": self.checkpoint, "abandoned_step": self.abandoned}


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint(dirpath=<run folder>/checkpoints, save_last=True, save_top_k=0)` whose `last.ckpt` is
    always the newest state, wherever the run folder is now."""

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        kwargs = {"save_last": True, "save_top_k": 0, **kwargs}
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, enable_version_counter=False,
                         **kwargs)
        self._stop_signal: int | None = None
        self._handlers: dict[int, Any] = {}
        self._trainer = None

    # ------------------------------------------------------------------ stop on SIGTERM / SIGINT

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._stop_signal, self._trainer = None, trainer
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in STOP_SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        if self._stop_signal is not None:  # a second signal: abandon the step in progress now
            print(f"[signal] second {signal.Signals(signum).name}: abandoning step {step + 1}; the checkpoint on "
                  "disk stays as it was", flush=True)
            raise Interrupted(signum, step=self._last_global_step_saved, checkpoint=self._last_file(),
                              abandoned=True)
        self._stop_signal = signum
        print(f"[signal] {signal.Signals(signum).name} received: finishing step {step + 1}, then saving last.ckpt "
              "and stopping (send it again to stop at once without saving)", flush=True)
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):  # processes this one started (DDP ranks) stop too
            launcher.kill(signum)

    def _last_file(self) -> str | None:
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION) if self.dirpath else None
        return path if path and os.path.isfile(path) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the periodic save
        if not ends_optimizer_step(trainer):  # stop at an optimizer step, never inside one
            return
        if not trainer.strategy.reduce_boolean_decision(self._stop_signal is not None, all=False):
            return  # (every rank stops at the same step when any rank was signalled)
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        signum = self._stop_signal or signal.SIGTERM
        raise Interrupted(signum, step=trainer.global_step, checkpoint=self._last_file())

    def _restore_handlers(self) -> None:
        """Put back the handlers found at the start (before Lightning's own teardown restores its originals)."""
        for signum, handler in self._handlers.items():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signum, handler)
        self._handlers, self._trainer = {}, None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        # file names relative to the checkpoint folder: nothing in a checkpoint names the folder it was written in
        state = super().state_dict()
        for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key):
                state[key] = os.path.basename(state[key])
        state["best_k_models"] = {os.path.basename(k): v for k, v in (state.get("best_k_models") or {}).items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this folder's paths: `last.ckpt` here is the file to rewrite, whatever folder wrote the state."""
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION) \
            if self.dirpath else ""


__all__ = ["Interrupted", "RunCheckpoint"]
