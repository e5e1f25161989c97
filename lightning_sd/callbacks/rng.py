"""`RngState`: the random generators' states travel with the checkpoint, so a resumed run draws the same
random numbers (dropout masks, anything seeded from the global generators) as an uninterrupted one.

Lightning's checkpoint holds weights, optimizer, scheduler and loop counters but not the Python, NumPy,
torch CPU and CUDA generator states. This callback saves them (every rank's, gathered, when the process
group is up) and puts them back at the next `on_train_batch_start`, in the uninterrupted run as well as in
the resumed one. Doing it in both is what makes the replay exact: between a checkpoint and the next batch
Lightning may draw from the global generators (a new epoch's DataLoader iterator draws its worker seed,
validation creates its own), and a resumed run crosses that stretch differently (it restarts mid-epoch
with a fresh iterator, or at an epoch end without one). Rewinding to the checkpoint's state at the next
batch start makes both runs continue from the same state. Put it first in the callback list, before
`OnPolicyGeneration`.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback


def collect_rng_states() -> dict[str, Any]:
    """This process's generator states, as plain Python values and CPU tensors (safe for `weights_only`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `collect_rng_states`."""
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds {len(cuda)} CUDA generator states but {torch.cuda.device_count()} "
                          "devices are visible; CUDA generators are not restored", stacklevel=2)


def _as_tuple(state):
    """`random.setstate` wants tuples; a checkpoint round trip may hand back lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


class RngState(Callback):
    """Save every rank's generator states in checkpoints; at the first training batch after a checkpoint
    (saved or loaded) set them back to the checkpoint's (see the module doc)."""

    def __init__(self) -> None:
        self._pending: dict | None = None  # this rank's states to apply at the next on_train_batch_start
        self._loaded: dict | None = None  # a checkpoint's states for every rank, until the rank is known

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        self._pending, self._loaded = states, None
        dist = _dist()
        if dist is None or dist.get_world_size() == 1:
            return {"world_size": 1, "states": [states]}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)  # dump_checkpoint runs on every rank
        return {"world_size": len(gathered), "states": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded, self._pending = state_dict, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._loaded is not None:
            states, rank = self._loaded["states"], trainer.global_rank
            if len(states) != trainer.world_size:
                warnings.warn(f"the checkpoint's random states come from {len(states)} rank(s), this run has "
                              f"{trainer.world_size}; rank {rank} continues with rank {rank % len(states)}'s state, "
                              "so random draws will not replay exactly", stacklevel=2)
            self._pending, self._loaded = states[rank % len(states)], None
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._pending = self._loaded = None


__all__ = ["RngState", "collect_rng_states", "set_rng_states"]
