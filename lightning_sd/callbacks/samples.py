"""`SampleTable`: every N optimizer steps, a table of a few sampled completions with their prompt, reward
and mean per-token divergence: appended to `<run folder>/samples.jsonl` and, with a W&B logger, logged as
the table `samples` (columns: step, prompt, completion, reward, mean_divergence, tokens)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch import Callback

from lightning_sd.batch import StepBatch
from lightning_sd.logging_utils import run_folder, wandb_logger

COLUMNS = ["step", "record_id", "prompt", "completion", "reward", "mean_divergence", "tokens"]


def sample_rows(batch: StepBatch, step: int, limit: int) -> list[dict]:
    """One dict per rollout row (the first sample of each prompt first), at most `limit`."""
    rollout, terms = batch.rollout, batch.loss_terms
    per_token, mask = terms["per_token"].float(), terms["mask"].float()
    means = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    trained = (mask.sum(-1) > 0).tolist()
    rewards, texts = batch.rewards, batch.completion_text or []
    n = max(1, rollout.completion_ids.size(0) // max(1, len(batch.records)))
    order = sorted(range(rollout.completion_ids.size(0)), key=lambda r: (r % n, r))[:limit]
    rows = []
    for r in order:
        record = batch.records[int(rollout.prompt_index[r])]
        rows.append({"step": step, "record_id": str(record.get("id", "")), "prompt": str(record.get("prompt", "")),
                     "completion": texts[r] if r < len(texts) else "",
                     "reward": None if rewards is None else rewards[r],
                     "mean_divergence": means[r] if trained[r] else None,
                     "tokens": int(rollout.completion_mask[r].sum())})
    return rows


class SampleTable(Callback):
    """Args: `every_n_steps` (optimizer steps 0, N, 2N, ...), `rows` per table, `jsonl` (also append the rows
    to `<run folder>/samples.jsonl`)."""

    def __init__(self, every_n_steps: int = 10, rows: int = 8, jsonl: bool = True) -> None:
        if every_n_steps < 1 or rows < 1:
            raise ValueError(f"SampleTable needs every_n_steps >= 1 and rows >= 1 (got {every_n_steps}, {rows}): "
                             "see logger.log_samples_every / callbacks.sample_rows")
        self.every_n_steps, self.rows, self.jsonl = every_n_steps, rows, jsonl
        self._step: int | None = None
        self.logged = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first_micro_batch = batch_idx % max(1, trainer.accumulate_grad_batches) == 0
        due = first_micro_batch and trainer.global_step % self.every_n_steps == 0
        self._step = trainer.global_step if due else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, self._step = self._step, None
        if step is None or not trainer.is_global_zero or batch.loss_terms is None:
            return
        rows = sample_rows(batch, step, self.rows)
        if self.jsonl:
            path = Path(run_folder(trainer, pl_module)) / "samples.jsonl"
            os.makedirs(path.parent, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        logger = wandb_logger(trainer)
        if logger is not None:
            logger.log_table("samples", columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows], step=step)
        self.logged += 1


__all__ = ["SampleTable", "sample_rows", "COLUMNS"]
