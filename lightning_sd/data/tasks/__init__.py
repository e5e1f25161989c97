"""Built-in tasks by name: `get_task("arithmetic", n_steps=1)`."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.arithmetic import ArithmeticTask
from lightning_sd.data.tasks.base import Task, Verdict, extract_answer, normalize_number, safe_verify
from lightning_sd.data.tasks.facts import FictionalFactsTask, KnownFactsTask, RealCapitalsTask
from lightning_sd.data.tasks.json_format import JsonFormatTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "fictional_facts": FictionalFactsTask,
    "real_capitals": RealCapitalsTask,
    "known_facts": KnownFactsTask,
    "json_format": JsonFormatTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """A built-in task; unknown names or options raise `DataError` listing the valid ones."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    cls = TASKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(f"task {name!r} has no option(s) {unknown}; its options are {accepted}")
    return cls(**kwargs)


__all__ = ["TASKS", "ArithmeticTask", "FictionalFactsTask", "JsonFormatTask", "KnownFactsTask", "RealCapitalsTask", "Task", "Verdict",
           "extract_answer", "get_task", "normalize_number", "safe_verify"]
