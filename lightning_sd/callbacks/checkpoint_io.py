"""`AtomicCheckpointIO`: checkpoints that are either the old file or the new one, never half of one.

Lightning's default writer stages the bytes in the *system* temp folder and then moves them into place:
when that folder is on another filesystem (local `/tmp`, checkpoints on NFS/Lustre, the usual cluster
layout) the move is a copy, and a job killed during the copy leaves a truncated `last.ckpt`; nothing is
fsynced, and a killed job leaves its staged bytes in `/tmp`. Here the checkpoint is streamed to a temp file
*in the target folder*, flushed and fsynced, then `os.replace`d over the target (atomic on POSIX), and the
folder is fsynced so the rename itself survives a crash. Temp files of dead writers are removed on the next
save.

Every checkpoint also carries an integrity record (`checkpoint["integrity"]`: a SHA-256 of its payload, every
tensor's bytes and every other value, computed before writing and saved in the same file, so the two cannot
disagree), and a state with non-finite weights or optimizer moments is never written. `load_checkpoint` (and
`verify_checkpoint`, which `train.py` runs before resuming) recompute the digest and refuse a file whose bytes
changed after it was written, one holding non-finite values, and one that is not a checkpoint of this project,
each with a message naming the file and what to do. When `last.ckpt` is rewritten, the one it replaces is kept
as `previous.ckpt`: the fallback a resume uses when `last.ckpt` fails verification.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sd.files import TMP_TAG, temp_path

INTEGRITY_KEY = "integrity"
FORMAT = 1
LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, not ours, damaged, or holding non-finite values."""


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


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_previous: str | None = None) -> Path:
    """`torch.save(obj, path)` that leaves either the previous file or the complete new one. With
    `keep_previous` (a file name in the same folder) the file being replaced is renamed to it first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    written = False
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        written = True
        if keep_previous and path.is_file():
            os.replace(path, path.with_name(keep_previous))  # a crash right here leaves previous.ckpt alone,
        os.replace(tmp, path)                                  # which a resume then takes
    except BaseException:  # an exception (a second signal, say) between the two renames: the new file goes in
        if written and tmp.is_file() and not path.exists():
            os.replace(tmp, path)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _feed(h, obj: Any) -> None:
    """Hash `obj` by value: tensors and arrays by dtype, shape and bytes, containers element by element."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse or t.device.type == "meta":
            h.update(f"<{t.layout} {t.dtype} {tuple(t.shape)}>".encode())
            return
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode() + b":")
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"(" if isinstance(obj, tuple) else b"[")
        for v in obj:
            _feed(h, v)
        h.update(b")")
    elif isinstance(obj, (str, bytes, int, float, bool, type(None))):
        h.update(repr(obj).encode())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # numpy arrays and scalars (random states)
        h.update(f"A{obj.dtype}{getattr(obj, 'shape', ())}".encode() + obj.tobytes())
    elif is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, asdict(obj))
    elif isinstance(obj, (set, frozenset)):
        h.update(repr(sorted(map(repr, obj))).encode())
    else:  # an object without a stable value (its repr may hold a memory address): its type only
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())


def payload_digest(checkpoint: dict) -> str:
    """SHA-256 of everything in `checkpoint` except its integrity record."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def nonfinite_values(checkpoint: dict) -> dict[str, int]:
    """`{name: count}` of non-finite entries in the weights (`state_dict`) and the optimizer state."""
    found: dict[str, int] = {}

    def check(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_sparse and t.device.type != "meta":
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                found[name] = bad

    for name, t in (checkpoint.get("state_dict") or {}).items():
        check(name, t)
    for i, opt in enumerate(checkpoint.get("optimizer_states") or []):
        for param, state in ((opt or {}).get("state") or {}).items():
            for key, t in (state or {}).items():
                check(f"optimizer_states[{i}].state[{param}].{key}", t)
    return found


def _describe(found: dict[str, int]) -> str:
    names = ", ".join(f"{n} in {k}" for k, n in list(found.items())[:4])
    return f"{sum(found.values())} non-finite values ({names}{', ...' if len(found) > 4 else ''})"


def seal(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """`checkpoint` with its integrity record; refuses (`CheckpointError`) a state holding non-finite values."""
    found = nonfinite_values(checkpoint)
    if found:
        name = Path(path).name
        raise CheckpointError(
            f"not writing {path}: the training state at step {checkpoint.get('global_step')} holds "
            f"{_describe(found)}; {name} keeps the last good state. The run diverged: lower optimizer.lr, keep "
            "trainer.gradient_clip_val, or check the data, then resume from that checkpoint")
    return {**checkpoint, INTEGRITY_KEY: {"format": FORMAT, "project": "lightning_sd",
                                          "sha256": payload_digest(checkpoint)}}


def check_checkpoint(checkpoint: Any, path: str | os.PathLike) -> dict:
    """Raise `CheckpointError` unless `checkpoint` (loaded from `path`) is one of this project's checkpoints whose
    integrity record matches its payload and whose weights and optimizer state are finite."""
    what = "give a run's checkpoints/last.ckpt (or previous.ckpt), or ckpt_path=last hydra.run.dir=<run folder>"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint of this project (a PyTorch file without a training "
                              f"state); {what}")
    record = checkpoint.get(INTEGRITY_KEY)
    if record is None:
        import warnings

        warnings.warn(f"{path}: a Lightning checkpoint without an integrity record (not written by this project's "
                      "checkpointing, or by an older version): its bytes cannot be verified", stacklevel=3)
    elif not isinstance(record, dict) or record.get("sha256") != payload_digest(checkpoint):
        raise CheckpointError(
            f"{path}: damaged: its contents no longer match the integrity record written with it (changed on disk "
            "or in a copy after it was saved). Resume from the previous checkpoint (previous.ckpt in the same folder; "
            "ckpt_path=last does so by itself), or copy the run folder again from its source")
    found = nonfinite_values(checkpoint)
    if found:
        raise CheckpointError(
            f"{path}: holds {_describe(found)} in its weights or optimizer state; resuming would only skip every "
            "step. Resume from an earlier checkpoint (previous.ckpt in the same folder), or start a new run")
    return checkpoint


# file -> (size, mtime) of the checkpoints this process has verified: a resume verifies its checkpoint before
# Lightning loads it, and the load then skips hashing the same unchanged file a second time
_verified: dict[str, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def verify_checkpoint(path: str | os.PathLike, *, reuse: bool = False) -> dict:
    """Load the checkpoint at `path` and `check_checkpoint` it; returns it. With `reuse`, a file this process
    has already verified and that is unchanged since (same size and modification time) is only loaded."""
    path = Path(path)
    key = str(path.resolve())
    if reuse and path.is_file() and _verified.get(key) == _stamp(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    if not zipfile.is_zipfile(path):  # every torch.save since PyTorch 1.6 is a zip archive
        raise CheckpointError(f"{path}: not a checkpoint of this project (not a PyTorch checkpoint file at all); give "
                              "a run's checkpoints/last.ckpt, or ckpt_path=last hydra.run.dir=<run folder>")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to read means the file is damaged
        raise CheckpointError(
            f"{path}: damaged: a PyTorch file that cannot be read ({type(err).__name__}: {str(err)[:200]}). Resume "
            "from the previous checkpoint (previous.ckpt in the same folder; ckpt_path=last does so by itself)"
        ) from None
    checkpoint = check_checkpoint(checkpoint, path)
    _verified[key] = _stamp(path)
    return checkpoint


def _is_local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` plugin: `Trainer(plugins=[AtomicCheckpointIO()])`. Remote URLs (`s3://...`)
    fall back to Lightning's writer (object stores replace whole objects anyway). `keep_previous=False`: the
    replaced `last.ckpt` is not kept as `previous.ckpt` (half the disk, no fallback for a damaged `last.ckpt`)."""

    def __init__(self, keep_previous: bool = True) -> None:
        super().__init__()
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint = seal(checkpoint, path)
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = str(path)[len("file://"):] if str(path).startswith("file://") else path
        keep = PREVIOUS if self.keep_previous and Path(local).name == LAST else None
        atomic_torch_save(checkpoint, local, keep_previous=keep)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if not _is_local(path):
            return check_checkpoint(super().load_checkpoint(path, map_location, weights_only), path)
        local_path = str(path)[len("file://"):] if str(path).startswith("file://") else path
        checkpoint = verify_checkpoint(local_path, reuse=True)
        if isinstance(map_location, (str, torch.device)) and str(map_location) != "cpu":  # else: kept on CPU
            from lightning.fabric.utilities.apply_func import move_data_to_device

            checkpoint = move_data_to_device(checkpoint, map_location)
        return checkpoint


__all__ = ["AtomicCheckpointIO", "CheckpointError", "atomic_torch_save", "check_checkpoint", "nonfinite_values",
           "payload_digest", "remove_stale_temps", "seal", "verify_checkpoint"]
