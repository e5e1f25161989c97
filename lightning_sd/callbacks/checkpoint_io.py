"""`AtomicCheckpointIO`: checkpoints that are either the old file or the new one, never half of one.

Lightning's default writer stages the bytes in the *system* temp folder and then moves them into place:
when that folder is on another filesystem (local `/tmp`, checkpoints on NFS/Lustre, the usual cluster
layout) the move is a copy, and a job killed during the copy leaves a truncated `last.ckpt`; nothing is
fsynced, and a killed job leaves its staged bytes in `/tmp`. Here the checkpoint is streamed to a temp file
*in the target folder*, flushed and fsynced, then `os.replace`d over the target (atomic on POSIX), and the
folder is fsynced so the rename itself survives a crash. Temp files of dead writers are removed on the next
save.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_TAG = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_path(path: str | os.PathLike) -> Path:
    """Where `path` is staged while it is written: `.<name>.tmp-<pid>` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that killed writers left next to `path` (their process is gone); returns them."""
    path = Path(path)
    removed = []
    for name in glob.glob(glob.escape(str(path.with_name(f".{path.name}{TMP_TAG}"))) + "*"):
        pid = name.rsplit(TMP_TAG, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            Path(name).unlink(missing_ok=True)
            removed.append(Path(name))
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` that leaves either the previous file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _is_local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` plugin: `Trainer(plugins=[AtomicCheckpointIO()])`. Remote URLs (`s3://...`)
    fall back to Lightning's writer (object stores replace whole objects anyway)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = str(path)[len("file://"):] if str(path).startswith("file://") else path
        atomic_torch_save(checkpoint, local)


__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "remove_stale_temps", "temp_path"]
