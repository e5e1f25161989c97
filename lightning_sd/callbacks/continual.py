"""Continual-learning evaluation: after each task of a sequence, every task seen so far is evaluated.

`R[i][j]` is the (greedy) accuracy on task j after training on task i (j <= i; later tasks are not
measured). From the last row T:

- average accuracy  = mean_j R[T][j]
- backward transfer = mean_{j<T} (R[T][j] - R[j][j])          (negative: earlier tasks got worse)
- forgetting        = mean_{j<T} (max_{j<=i<T} R[i][j] - R[T][j])   (>= 0; the drop from each task's best)

`ContinualEvaluation` (a callback, added by `build_run` for `data.task=sequence`) measures the matrix at
every task boundary, plus *probe* tasks (evaluated, never trained: retention of prior knowledge) and the
accuracy of everything before training; it logs `continual/*` and writes `continual.json` and
`continual.png` (the matrix as a heat-map) into the run folder after every boundary.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from lightning.pytorch import Callback

from lightning_sd.distributed import StepWatch
from lightning_sd.files import atomic_write_text

Matrix = Sequence[Sequence[float | None]]


def continual_metrics(matrix: Matrix) -> dict[str, float | None]:
    """`avg_accuracy`, `bwt`, `forgetting` of a (possibly partial) accuracy matrix: the last row is "now".
    Rows are tasks trained so far; row i holds at least entries 0..i. BWT and forgetting are None with one row."""
    rows = len(matrix)
    if rows == 0:
        return {"avg_accuracy": None, "bwt": None, "forgetting": None}
    t = rows - 1
    final = [matrix[t][j] for j in range(rows)]
    if any(v is None for v in final):
        raise ValueError(f"row {t} of the accuracy matrix must hold tasks 0..{t}, got {list(matrix[t])}")
    out: dict[str, float | None] = {"avg_accuracy": sum(final) / rows, "bwt": None, "forgetting": None}
    if rows > 1:
        out["bwt"] = sum(final[j] - matrix[j][j] for j in range(t)) / t
        out["forgetting"] = sum(max(matrix[i][j] for i in range(j, t)) - final[j] for j in range(t)) / t
    return out


def save_json(path: str, results: dict) -> str:
    atomic_write_text(path, json.dumps(results, indent=2))
    return path


def plot_matrix(path: str, matrix: Matrix, labels: Sequence[str], initial: Sequence[float | None] | None = None,
                probes: Matrix | None = None, probe_labels: Sequence[str] = ()) -> str:
    """A heat-map PNG: rows "before" (optional) and "after task i", columns the tasks then the probes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = list(labels) + [f"{p} (probe)" for p in probe_labels]
    rows_data = []
    row_names = []
    if initial is not None:
        rows_data.append(list(initial))
        row_names.append("before training")
    for i, row in enumerate(matrix):
        extra = list(probes[i]) if probes is not None and i < len(probes) else [None] * len(probe_labels)
        rows_data.append([row[j] if j < len(row) else None for j in range(len(labels))] + extra)
        row_names.append(f"after {labels[i]}")
    values = np.array([[np.nan if v is None else float(v) for v in r] for r in rows_data], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.55 * len(row_names)))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")  # not measured (a task not trained yet)
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(row_names)), row_names)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isnan(values[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", color="gray", fontsize=8)
            else:
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                        color="black" if values[i, j] > 0.5 else "white", fontsize=9)
    ax.set_title("accuracy on each task (columns) after training on each task (rows)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class ContinualEvaluation(Callback):
    """Fills the accuracy matrix of a `SequentialTasksDataModule` run at every task boundary.

    Args:
        datamodule: the `SequentialTasksDataModule` being trained on (gives labels and per-task eval loaders).
        run_dir: where `continual.json` / `continual.png` go (default: the trainer's `default_root_dir`).
        sampling: evaluation sampling (default: the module's `eval_sampling`, greedy).
        evaluate_initial: also measure every task and probe before training (the "before training" row).
    """

    def __init__(self, datamodule: Any, run_dir: str | None = None, sampling: Any = None,
                 evaluate_initial: bool = True) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.run_dir = run_dir
        self.sampling = sampling
        self.evaluate_initial = evaluate_initial
        self.initial: dict[str, float] | None = None
        self.rows: list[dict[str, float]] = []  # row i: label -> accuracy after task i (tasks <= i and probes)
        self._steps = StepWatch()

    # ---------------------------------------------------------------- measuring
    def _accuracy(self, pl_module, labels: Sequence[str]) -> dict[str, float]:
        from lightning_sd.evaluation import evaluate

        return {label: evaluate(pl_module, self.datamodule.eval_dataloader(label), self.sampling,
                                with_teacher=False, keep_samples=0).student_accuracy for label in labels}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.evaluate_initial and self.initial is None and trainer.global_step == 0:
            dm = self.datamodule
            self.initial = self._accuracy(pl_module, dm.task_labels + dm.probe_labels)
            self._save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._steps.moved(trainer):  # no optimizer step in this batch (gradient accumulation)
            return
        step = trainer.global_step
        dm = self.datamodule
        if step not in dm.boundaries:
            return
        stage = dm.boundaries.index(step)
        if stage < len(self.rows):  # already measured (a resumed run)
            return
        row = self._accuracy(pl_module, dm.task_labels[: stage + 1] + dm.probe_labels)
        self.rows.append(row)
        summary = self.results()
        logged = {f"continual/acc_{label}": acc for label, acc in row.items()}
        logged.update({f"continual/{k}": v for k, v in summary["summary"].items() if v is not None})
        for key, value in logged.items():
            pl_module.log(key, float(value), on_step=True, on_epoch=False, batch_size=1)
        self._save(trainer)

    # ---------------------------------------------------------------- results
    def matrix(self) -> list[list[float | None]]:
        labels = self.datamodule.task_labels
        return [[row.get(label) for label in labels] for row in self.rows]

    def results(self) -> dict:
        dm = self.datamodule
        matrix = self.matrix()
        return {
            "tasks": dm.task_labels, "probes": dm.probe_labels, "steps_per_task": dm.task_steps,
            "matrix": matrix,
            "probe_accuracy": [[row.get(p) for p in dm.probe_labels] for row in self.rows],
            "initial": self.initial,
            "summary": continual_metrics(matrix),
            "definitions": {
                "matrix": "matrix[i][j] = accuracy on task j after training on task i (null: not measured)",
                "avg_accuracy": "mean_j matrix[T][j] over the tasks trained so far (T = last row)",
                "bwt": "mean_{j<T} (matrix[T][j] - matrix[j][j])",
                "forgetting": "mean_{j<T} (max_{j<=i<T} matrix[i][j] - matrix[T][j])",
            },
        }

    def _save(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        folder = self.run_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        res = self.results()
        save_json(os.path.join(folder, "continual.json"), res)
        dm = self.datamodule
        initial = None if self.initial is None else [self.initial.get(x) for x in dm.task_labels + dm.probe_labels]
        plot_matrix(os.path.join(folder, "continual.png"), res["matrix"], dm.task_labels, initial=initial,
                    probes=res["probe_accuracy"], probe_labels=dm.probe_labels)

    def state_dict(self) -> dict:
        return {"initial": self.initial, "rows": self.rows, **self._steps.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = state_dict.get("initial")
        self.rows = list(state_dict.get("rows", []))
        self._steps.load(state_dict)


__all__ = ["continual_metrics", "plot_matrix", "save_json", "ContinualEvaluation"]
