"""Small helpers shared by the callbacks and `train.py`: the run folder, where a run ran (machine, commit), atomic
text files, the W&B run behind a Lightning logger (rank 0 only), config/eval logging, a reader for offline W&B run
files, and the per-step training history of a run folder's CSV log."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger

from lightning_sd.files import atomic_write_text


def machine() -> dict:
    """Where a run ran, for its record: platform, processor (and, on Linux, the CPU's model name and its vector
    features that change kernels: `cpu_model`, `cpu_features`), CPU count, torch version and threads, GPU name,
    and the load average (1, 5, 15 min) at the time of the call."""
    import platform

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **cpu_model(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg": os.getloadavg()}


def git_commit(where: str | os.PathLike) -> str | None:
    """The commit checked out in the git work tree that holds `where`, with "+dirty" when tracked files have
    uncommitted changes (a record's code is then not exactly that commit); None outside a git work tree."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5).stdout.strip()

        commit = git("rev-parse", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> dict:
    """`{"cpu_model": "AMD EPYC ...", "cpu_features": ["avx2", ...]}` from /proc/cpuinfo; {} where it is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"cpu_model": name, "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def run_folder(trainer, pl_module=None) -> str:
    """Where a run's files go: the module's `run_dir` (set by `train.py`), else the trainer's root dir."""
    folder = getattr(pl_module, "run_dir", None) if pl_module is not None else None
    return folder or trainer.default_root_dir


class RunFolderCSVLogger(CSVLogger):
    """Lightning's CSV logger writing `<run folder>/metrics.csv`, which warns that files "will be deleted" only
    when a `metrics.csv` is there to be replaced (Lightning warns whenever the folder is not empty, and a run
    folder never is; `build_logger` renames the file of an earlier part first)."""

    @property
    def experiment(self):
        if self._experiment is None and not os.path.isfile(os.path.join(self.log_dir, "metrics.csv")):
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                return super().experiment
        return super().experiment


def _loggers(trainer) -> list:
    return list(getattr(trainer, "loggers", None) or [])


def wandb_logger(trainer):
    """The trainer's `WandbLogger`, or None."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in _loggers(trainer) if isinstance(lg, WandbLogger)), None)


def wandb_run(trainer):
    """The live `wandb` run of the trainer's W&B logger on rank 0, else None (W&B runs exist on rank 0 only)."""
    logger = wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return None
    return logger.experiment


def log_config(logger, config: dict) -> None:
    """The resolved config as the run's hyperparameters (nested dicts kept; W&B shows them as `loss.beta`...)."""
    if logger:
        logger.log_hyperparams(config)


def log_eval(logger, tag: str, result: dict, step: int | None = None) -> dict[str, float]:
    """Evaluation numbers as metrics `eval/<tag>/<name>` (e.g. `eval/after/student_accuracy`; a nested dict's as
    `eval/<tag>/<name>/<key>`, at any depth, e.g. `eval/after/sampled/student_accuracy` or
    `eval/after/probes/known_facts/student_accuracy`) and, with a W&B logger, the evaluation samples as a table
    `eval/<tag>/samples`. Returns the metrics logged."""

    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flat = flatten(result)
    metrics = {f"eval/{tag}/{k}": float(v) for k, v in flat.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    if not logger or not metrics:
        return metrics
    logger.log_metrics(metrics, step=step)
    logger.save()  # the CSV logger buffers rows; after `fit` nothing else would flush them
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        run = logger.experiment
        for k, v in metrics.items():
            run.summary[k] = v
        samples = result.get("samples") or []
        if samples:
            columns = sorted({k for s in samples for k in s})
            logger.log_table(f"eval/{tag}/samples", columns=columns,
                             data=[[_cell(s.get(c)) for c in columns] for s in samples], step=step)
    return metrics


def _cell(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=str)


def wandb_run_id(run_dir: str | os.PathLike, create: bool = True) -> str | None:
    """The W&B run id of a run folder, kept in `<run_dir>/wandb_run_id` so that `ckpt_path=last` continues the
    same W&B run. A folder without one takes `$WANDB_RUN_ID` (set by `wandb agent` for a sweep trial: the
    trial must log to the run the sweep expects), else a new id; it is stored when `create`."""
    path = Path(run_dir) / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        import secrets

        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], a valid W&B run id
    atomic_write_text(path, run_id + "\n")
    return run_id


# ------------------------------------------------------------------------------- offline W&B run files

_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (no ':W&B' header)")
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left - 7
            continue
        data = raw[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE:
            pending += data
        elif kind == _LAST:
            yield pending + data
            pending = b""


def read_offline_run(run_dir: str | os.PathLike) -> dict:
    """Read an offline W&B run folder (`wandb/offline-run-*`) without syncing it: `{"config": {...},
    "history": [{key: value, ...} per logged step], "summary": {...}, "files": [paths under files/]}`."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file; is this a wandb/offline-run-* folder?")
    config: dict = {}
    history: list[dict] = []
    summary: dict = {}

    def key_of(item) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for data in _wandb_records(files[0]):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # config and summary set right at the start travel inside the run record
            for item in record.run.config.update:
                config[key_of(item)] = json.loads(item.value_json)
            for item in record.run.summary.update:
                summary[key_of(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[key_of(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({key_of(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[key_of(item)] = json.loads(item.value_json)
    listed = sorted(str(p.relative_to(run_dir / "files")) for p in (run_dir / "files").rglob("*") if p.is_file()) \
        if (run_dir / "files").is_dir() else []
    return {"config": config, "history": history, "summary": summary, "files": listed}


def finish_logger(logger) -> None:
    """Close a W&B run (flushes offline files); other loggers need nothing."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        import wandb

        logger.experiment.finish()
        wandb.teardown()  # stops the W&B service process, which flushes the run files (offline runs too)


def train_history(run_dir: str) -> list[dict]:
    """The per-step training metrics the CSV logger wrote (`<run_dir>/metrics*.csv`, resumed parts included):
    one dict per optimizer step with the `train/*` values logged at it (reward, masked_rows, loss, ...)."""
    by_step: dict[int, dict] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "metrics*.csv"))):
        with open(path) as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                vals = {k[len("train/"):]: float(v) for k, v in row.items() if k.startswith("train/") and v not in ("", None)}
                if vals:
                    by_step.setdefault(int(row["step"]), {"step": int(row["step"])}).update(vals)
    return [by_step[k] for k in sorted(by_step)]


__all__ = ["RunFolderCSVLogger", "finish_logger", "log_config", "log_eval", "read_offline_run", "run_folder",
           "train_history", "wandb_logger", "wandb_run", "wandb_run_id"]
