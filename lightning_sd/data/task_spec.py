"""A task named in a config: `{task: <built-in task>, task_kwargs: {...}, n_train, n_eval, label}`. Used for the
tasks of a sequence (`data.task=sequence`) and for probes (`data.probes`: tasks only evaluated, never trained)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks import get_task

SPEC_KEYS = ("task", "task_kwargs", "n_train", "n_eval", "label")


@dataclass
class TaskSpec:
    """A built-in task name and its options, how many records, a unique label."""

    task: str
    task_kwargs: dict = field(default_factory=dict)
    n_train: int | None = None
    n_eval: int | None = None
    label: str | None = None


def parse_specs(items: Any, where: str) -> list[TaskSpec]:
    """Validate a list of task specs (dicts or `TaskSpec`s); labels default to the task name and must be
    unique."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{where} must be a list of task specs like {{task: fictional_facts, task_kwargs: {{}}, "
                        f"n_train: 48, n_eval: 12, label: facts_a}}, got {type(items).__name__}")
    specs = []
    for k, item in enumerate(items):
        if isinstance(item, TaskSpec):
            item = dict(vars(item))
        if not isinstance(item, dict) or "task" not in item:
            raise DataError(f"{where}[{k}] must be a dict with at least 'task' (keys {SPEC_KEYS}), got {item!r}")
        unknown = sorted(set(item) - set(SPEC_KEYS))
        if unknown:
            raise DataError(f"{where}[{k}] has unknown key(s) {unknown}; valid keys: {SPEC_KEYS}")
        spec = TaskSpec(task=item["task"], task_kwargs=dict(item.get("task_kwargs") or {}), n_train=item.get("n_train"),
                        n_eval=item.get("n_eval"), label=item.get("label") or item["task"])
        get_task(spec.task, **spec.task_kwargs)  # unknown task or option: a DataError naming it
        specs.append(spec)
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise DataError(f"{where}: labels must be unique; repeated: {dupes} (give each spec a label)")
    return specs


__all__ = ["SPEC_KEYS", "TaskSpec", "parse_specs"]
