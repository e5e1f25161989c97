"""`RunCheckpoint`: Lightning's `ModelCheckpoint` for a run folder that may be moved, copied or mounted
elsewhere between a preemption and the resume.

Lightning keeps the absolute `dirpath` and `last_model_path` in the checkpoint; resumed from another folder it
drops them and, finding `last.ckpt` already there, writes `last-v1.ckpt`, `last-v2.ckpt`... while `last.ckpt`
stays at the old step. Here the checkpoint folder is always the one given now: `last.ckpt` in it is rewritten
in place (no version counter), and paths saved in a checkpoint are never read back.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint(dirpath=<run folder>/checkpoints, save_last=True, save_top_k=0)` whose `last.ckpt` is
    always the newest state, wherever the run folder is now."""

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        kwargs = {"save_last": True, "save_top_k": 0, **kwargs}
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, enable_version_counter=False,
                         **kwargs)

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


__all__ = ["RunCheckpoint"]
