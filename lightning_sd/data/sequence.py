"""`SequentialTasksDataModule`: continual training over a sequence of tasks.

The train loader yields `steps_per_task` optimizer steps of task 1, then of task 2, ... (one pass, in a
fixed order); eval loaders exist per task (`eval_dataloader(label)`) and for *probes*, tasks that are
only evaluated (e.g. real capitals, to measure what the model knew before). Records carry
`sequence_task` (the task's label), and `TaskSequence` verifies each record with its own task's verifier,
so rewards, evaluation and teacher contexts work unchanged.

From Hydra: `data.task=sequence` with `data.task_kwargs = {tasks: [spec, ...], steps_per_task: N | null}` and
`data.probes: [spec, ...]`, a spec being `{task: <built-in task>, task_kwargs: {...}, n_train, n_eval, label}`
(`task_spec.py`; see `conf/data/continual_facts.yaml`). `steps_per_task: null` splits `trainer.max_steps` over the
tasks (`max_steps // T` each, the remainder to the last task).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.data.prompts import TRUNCATION
from lightning_sd.data.records import DataError
from lightning_sd.data.sampler import ResumableSampler
from lightning_sd.data.task_spec import TaskSpec, parse_specs
from lightning_sd.data.tasks import Task, Verdict, get_task

SEQUENCE_TASK = "sequence"  # the `data.task` value that selects this data module
def check_sequence(task_kwargs: dict, max_steps: int, probes: list | None = None) -> list[int]:
    """Check `data.task_kwargs` of `data.task=sequence` (and `data.probes`); returns the optimizer steps of each
    task."""
    if "probes" in task_kwargs:
        raise DataError("data.task_kwargs.probes moved to data.probes (the same list of task specs), which every "
                        "data option has")
    unknown = sorted(set(task_kwargs) - {"tasks", "steps_per_task"})
    if unknown:
        raise DataError(f"data.task_kwargs has unknown key(s) {unknown} for data.task=sequence; valid keys: tasks, "
                        "steps_per_task")
    tasks = parse_specs(task_kwargs.get("tasks"), "data.task_kwargs.tasks")
    probes = parse_specs(probes, "data.probes")
    if not tasks:
        raise DataError("data.task=sequence needs data.task_kwargs.tasks: a list of at least one task spec")
    labels = [s.label for s in tasks + probes]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise DataError(f"task labels must be unique across data.task_kwargs.tasks and data.probes; repeated: "
                        f"{dupes} (give each spec a label)")
    steps = task_kwargs.get("steps_per_task")
    if steps is None:
        if max_steps < len(tasks):
            raise DataError(f"trainer.max_steps={max_steps} is fewer than the {len(tasks)} tasks of the sequence: "
                            f"set trainer.max_steps >= {len(tasks)}")
        return split_steps(max_steps, len(tasks))
    if steps < 1 or steps * len(tasks) != max_steps:
        raise DataError(f"data.task_kwargs.steps_per_task={steps} x {len(tasks)} tasks must equal trainer.max_steps="
                        f"{max_steps}: set trainer.max_steps={max(steps, 1) * len(tasks)} (or steps_per_task=null)")
    return [int(steps)] * len(tasks)


def split_steps(total: int, n_tasks: int) -> list[int]:
    """`total // n_tasks` steps per task, the remainder to the last one."""
    each = total // n_tasks
    return [each] * (n_tasks - 1) + [total - each * (n_tasks - 1)]


class TaskSequence(Task):
    """Verifies each record with the task it came from (`record["sequence_task"]` is its label)."""

    name = SEQUENCE_TASK

    def __init__(self, tasks: dict[str, Task]) -> None:
        self.tasks = tasks

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        raise DataError("a TaskSequence has no records of its own: SequentialTasksDataModule makes them per task")

    def verify(self, record: dict, completion: str) -> Verdict:
        label = record.get("sequence_task")
        if label not in self.tasks:
            raise DataError(f"record {record.get('id')!r} has sequence_task={label!r}, not one of {sorted(self.tasks)}")
        return self.tasks[label].verify(record, completion)


class SequentialTasksDataModule(L.LightningDataModule):
    """Task 1 for `steps_per_task` optimizer steps, then task 2, ...; see the module docstring.

    `steps_per_task`: one number for every task, or a list with each task's steps.
    `tasks` / `probes`: lists of `TaskSpec` or dicts. `n_train` / `n_eval` are the defaults for specs that do
    not set their own. Records of a task repeat (reshuffled each pass) when its steps need more than it has.
    Every task and probe is evaluated on its `eval_split` ("eval": the held-out test; "val": for tuning).
    """

    def __init__(self, tokenizer: Any, *, tasks: list, probes: list | None = None, steps_per_task: int | list[int],
                 batch_size: int = 8, eval_batch_size: int | None = None, n_train: int | None = None,
                 n_eval: int | None = None, max_prompt_length: int | None = None, truncation: str = TRUNCATION,
                 seed: int = 0, system_prompt: str | None = None, eval_split: str = "eval") -> None:
        super().__init__()
        self.specs, self.probe_specs = parse_specs(tasks, "tasks"), parse_specs(probes, "probes")
        labels = [s.label for s in self.specs + self.probe_specs]
        if len(set(labels)) != len(labels):
            raise DataError(f"task labels must be unique, got {labels}; give each spec a label")
        if not self.specs:
            raise DataError("SequentialTasksDataModule needs at least one task")
        steps = [steps_per_task] * len(self.specs) if isinstance(steps_per_task, int) else list(steps_per_task)
        if len(steps) != len(self.specs) or min(steps) < 1:
            raise DataError(f"steps_per_task={steps_per_task} must be a positive number, or one per task "
                            f"({len(self.specs)} tasks)")
        self.task_steps = [int(x) for x in steps]
        self.boundaries = [sum(self.task_steps[: i + 1]) for i in range(len(self.task_steps))]  # global steps
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.max_prompt_length, self.truncation, self.system_prompt = max_prompt_length, truncation, system_prompt
        self.stages: dict[str, PromptDataModule] = {}
        for spec in self.specs + self.probe_specs:
            n_default = None if spec in self.probe_specs else n_eval  # a probe: all of its part by default
            self.stages[spec.label] = PromptDataModule(
                tokenizer, task=get_task(spec.task, **spec.task_kwargs), n_train=spec.n_train or n_train,
                n_eval=spec.n_eval if spec.n_eval is not None else n_default, batch_size=batch_size,
                eval_batch_size=self.eval_batch_size, max_prompt_length=max_prompt_length, truncation=truncation,
                seed=seed, system_prompt=system_prompt, eval_split=eval_split)
        self.task = TaskSequence({label: dm.task for label, dm in self.stages.items()})
        self.collate = None
        self._sampler: ResumableSampler | None = None
        self._resume: int | None = None

    @property
    def task_labels(self) -> list[str]:
        return [s.label for s in self.specs]

    @property
    def probe_labels(self) -> list[str]:
        return [s.label for s in self.probe_specs]

    def setup(self, stage: str | None = None) -> None:
        if self.collate is not None:
            return
        for label, dm in self.stages.items():
            dm.setup(stage)
            for rec in dm.train_records + dm.eval_records:
                rec["id"] = f"{label}/{rec['id']}"
                rec["sequence_task"] = label
        self.collate = next(iter(self.stages.values())).collate

    def stage_of_step(self, global_step: int) -> int:
        """Index of the task trained at optimizer step `global_step` (0-based)."""
        return next((i for i, end in enumerate(self.boundaries) if global_step < end), len(self.specs) - 1)

    def schedule(self, world_size: int = 1, rank: int = 0, accumulate: int = 1) -> list[dict]:
        """This rank's train records in order: per task, its steps x `accumulate` batches."""
        self.setup("fit")
        out: list[dict] = []
        for spec, steps in zip(self.specs, self.task_steps):
            per_stage = steps * accumulate * self.batch_size * world_size
            pool = self.stages[spec.label].train_records
            stream: list[dict] = []
            npass = 0
            while len(stream) < per_stage:
                order = list(range(len(pool)))
                random.Random(f"{self.seed}/{spec.label}/{npass}").shuffle(order)
                stream += [pool[i] for i in order]
                npass += 1
            out += stream[:per_stage][rank::world_size]
        return out

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        records = self.schedule(trainer.world_size if trainer else 1, trainer.global_rank if trainer else 0,
                                trainer.accumulate_grad_batches if trainer else 1)
        # the records are already this rank's, in order: no shuffling, no further sharding
        self._sampler = ResumableSampler(len(records), batch_size=self.batch_size, shuffle=False)
        if self._resume is not None:
            self._sampler.resume(0, self._resume)
            self._resume = None
        return DataLoader(records, batch_size=self.batch_size, sampler=self._sampler, collate_fn=self.collate)

    def _loader(self, records: list[dict]) -> DataLoader:
        return DataLoader(records, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        """Every task's eval records (the accuracy `train.py` reports before/after); the probes are reported
        apart (`eval_dataloader(label)`)."""
        self.setup("validate")
        records = [r for label in self.task_labels for r in self.stages[label].eval_records]
        return self._loader(records) if records else []

    def eval_dataloader(self, label: str) -> DataLoader:
        """The eval records of one task or probe."""
        self.setup("validate")
        if label not in self.stages:
            raise DataError(f"no task labelled {label!r}; labels: {list(self.stages)}")
        return self._loader(self.stages[label].eval_records)

    def probe_task(self, label: str) -> Task:
        """The task that verifies the probe `label`'s completions."""
        return self.stages[label].task

    def state_dict(self) -> dict[str, Any]:
        if self._sampler is None:
            return {} if self._resume is None else {"batches_done": self._resume}
        done = (int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready) if self.trainer is not None
                else self._sampler.batches_yielded)
        return {"batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = int(state_dict["batches_done"])


__all__ = ["SEQUENCE_TASK", "TaskSpec", "TaskSequence", "SequentialTasksDataModule", "parse_specs", "check_sequence",
           "split_steps"]
