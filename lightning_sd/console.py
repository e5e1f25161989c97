"""What `train.py` prints: framework log lines once each, a short header, a progress bar while an evaluation
generates, and a closing summary table. The full config is written to `<run folder>/.hydra/config.yaml`."""

from __future__ import annotations

import logging
import math
import os
import resource
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FRAMEWORK_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
TIPS = ("💡 Tip:",)  # Lightning's advertisements for other products; nothing about this run


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(TIPS)


def tidy_framework_logging() -> None:
    """Lightning's log lines once each: Lightning adds its own console handlers at import, and the root logger
    (set up by Hydra: the console and `<run folder>/train.log`) prints them again. Drop Lightning's handlers,
    let its records reach the root's handlers, and leave out its product tips."""
    for name in FRAMEWORK_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTips) for f in handler.filters):
            handler.addFilter(_NoTips())


def quiet_framework_warnings() -> None:
    """Silence a warning of Lightning's own code that no user can act on: Lightning's pytree helper uses a torch
    API that newer torch deprecates (`isinstance(treespec, LeafSpec)`); the fix belongs to Lightning."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def header_lines(cfg: Any, run_dir: str) -> list[str]:
    """A few lines that say what the run is: model, method, teacher, data, steps, output folder."""
    m, d, loss, t, tr = cfg.model, cfg.data, cfg.loss, cfg.teacher, cfg.trainer
    model = m.name if m.name != "hf" else f"hf {m.name_or_path}"
    from lightning_sd.teachers import teacher_class

    policy = teacher_class(t.kind)
    teacher = policy.describe(t.get(policy.option) if policy.option else None)
    source = (d.get("path") or d.train_file or d.task or "?")
    verifier = d.get("verifier")
    data = f"{source}" + (f", verifier {verifier if isinstance(verifier, str) else 'custom'}" if verifier else "")
    return [f"model    {model}",
            f"method   {loss.name} (loss.beta={loss.beta}, template {loss.template})",
            f"teacher  {teacher}",
            f"data     {data} (batch {d.batch_size} x {cfg.generation.n} samples)",
            f"steps    {tr.max_steps} on {tr.accelerator}",
            f"output   {run_dir}  (full config: .hydra/config.yaml; print it with verbose=true)"]


@contextmanager
def eval_progress(label: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A progress bar over evaluation prompts (`total`, student and teacher passes together) showing tokens per
    second; yields `advance(prompts, tokens)`. A no-op when `enabled` is false, nothing is evaluated, or the
    output is not a terminal (a log file would only get an empty line where the bar was)."""
    from rich.console import Console

    if not enabled or total <= 0 or not Console().is_terminal:
        yield lambda prompts, tokens: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start, done = time.perf_counter(), {"tokens": 0}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
               TimeElapsedColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(label, total=total, rate="")

        def advance(prompts: int, tokens: int) -> None:
            done["tokens"] += tokens
            rate = done["tokens"] / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=prompts, rate=f"{rate:.0f} tok/s")

        yield advance


def peak_memory_gib() -> tuple[float, str]:
    """The run's peak memory in GiB and what it measures: CUDA memory allocated when a GPU was used, else the
    process's peak resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RAM"  # ru_maxrss is in KiB on Linux


def _acc(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary_rows(metrics: dict, run_dir: str) -> list[tuple[str, str]]:
    """The closing summary as (label, value) rows, from the run's `metrics.json` content."""
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    rows = []
    if before or after:
        rows.append(("student accuracy", f"{_acc(before.get('student_accuracy'))} -> "
                                         f"{_acc(after.get('student_accuracy'))}"))
        rows.append(("teacher-with-context", f"{_acc(before.get('teacher_accuracy'))} -> "
                                             f"{_acc(after.get('teacher_accuracy'))}"))
        rows.append(("gap (teacher - student)", f"{_acc(before.get('gap'))} -> {_acc(after.get('gap'))}"))
        if before.get("sampled") or after.get("sampled"):
            rows.append(("student sampled accuracy", f"{_acc((before.get('sampled') or {}).get('student_accuracy'))} "
                                                     f"-> {_acc((after.get('sampled') or {}).get('student_accuracy'))}"))
        for label in dict.fromkeys([*(before.get("probes") or {}), *(after.get("probes") or {})]):
            was, now = ((e.get("probes") or {}).get(label, {}).get("student_accuracy") for e in (before, after))
            rows.append((f"{label} (probe, never trained)", f"{_acc(was)} -> {_acc(now)}"))
        failures = sum(int(e.get("verifier_failures") or 0) for e in (before, after))
        if failures:
            rows.append(("verifier failures", f"{failures} (warnings above name the rows)"))
    # the run means of the speeds (train_diagnostics); the last step's values only where no mean was recorded
    train = {**(metrics.get("train_metrics") or {}),
             **{f"train/{k}": v for k, v in (metrics.get("train_diagnostics") or {}).items()}}
    rows.append(("steps", str(metrics.get("global_step", "?"))))
    rows.append(("time", f"{metrics.get('train_seconds', 0):.0f} s training, {metrics.get('total_seconds', 0):.0f} s "
                         "in all"))
    speeds = [f"{train[k]:.0f} {label}" for k, label in (("train/gen_tokens_per_s", "generated"),
                                                        ("train/train_tokens_per_s", "trained"))
              if k in train and math.isfinite(train[k])]
    if speeds:
        rows.append(("tokens/s", ", ".join(speeds)))
    peak, kind = metrics.get("peak_memory_gib", (None, ""))
    if peak is not None:
        rows.append(("peak memory", f"{peak:.2f} GiB ({kind})"))
    rows.append(("run folder", run_dir))
    views = os.path.join(run_dir, "token_views")
    if os.path.isdir(views):
        rows.append(("token views", views))
    if metrics.get("model_folder"):
        rows.append(("model", metrics["model_folder"]))
    rows.append(("metrics", os.path.join(run_dir, "metrics.json")))
    return rows


def summary_table(metrics: dict, run_dir: str) -> str:
    """The closing summary as aligned text, one row per line."""
    rows = summary_rows(metrics, run_dir)
    width = max(len(label) for label, _ in rows)
    return "\n".join(["── summary " + "─" * 50] + [f"{label:<{width}}  {value}" for label, value in rows])


__all__ = ["eval_progress", "header_lines", "peak_memory_gib", "quiet_framework_warnings", "summary_rows",
           "summary_table", "tidy_framework_logging"]
