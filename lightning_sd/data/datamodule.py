"""`PromptDataModule`: prompt records from a built-in task, JSONL files, a list or a Hugging Face dataset,
batched as left-padded prompt tokens plus the raw records (which carry the privileged context).

Batch format (train and val): a `lightning_sd.batch.StepBatch` with the collator's fields

    records: list[dict]             # the raw records, privileged fields included
    prompt_ids: LongTensor[B, P]    # formatted prompts, left-padded with the pad id
    prompt_mask: LongTensor[B, P]   # 1 on prompt tokens, 0 on padding
    prompt_text: list[str]          # the formatted prompts (chat template applied)

The train order is fixed by `(seed, epoch)`; `state_dict()` holds the epoch and the batches already
consumed, so a run resumed from a mid-epoch checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lightning_sd.batch import StepBatch
from lightning_sd.data.prompts import TRUNCATION, PromptEncoder, check_truncation
from lightning_sd.data.records import DataError, load_jsonl, validate_records
from lightning_sd.data.sampler import ResumableSampler
from lightning_sd.data.task_spec import parse_specs
from lightning_sd.data.tasks import Task, get_task

DEFAULT_N_TRAIN = 1024
DEFAULT_N_EVAL = 64


def _with_ids(records: list[dict], source: str) -> list[dict]:
    """Shallow copies of the records, each with an `id` (`"<source>:<row>"` where missing)."""
    out = [dict(r) for r in records]
    for i, r in enumerate(out):
        r.setdefault("id", f"{source}:{i}")
    return out


class PromptCollator:
    """Turns a list of records into a batch with a `PromptEncoder` (picklable, for worker processes)."""

    def __init__(self, prompts: PromptEncoder) -> None:
        self.prompts = prompts

    def __call__(self, records: list[dict]) -> StepBatch:
        enc = self.prompts.records(records, warn=False)  # setup() warned once for all records
        return StepBatch(records=records, prompt_ids=enc.ids, prompt_mask=enc.mask, prompt_text=enc.texts)


def prompt_batch(tokenizer: Any, records: list[dict], **options: Any) -> StepBatch:
    """The `StepBatch` a `PromptDataModule` makes of `records` (`options`: the `PromptEncoder`'s, e.g.
    `system_prompt`, `max_length`)."""
    return PromptCollator(PromptEncoder(tokenizer, **options))(records)


class PromptDataModule(L.LightningDataModule):
    """Prompts for on-policy training. Give exactly one train source: `task` (a built-in task name, or a
    `Task`, with `task_kwargs`), `train_file` (JSONL), `records` (a list of dicts) or `hf_dataset` (any
    iterable of dicts, e.g. a `datasets.Dataset`). Eval records come from `eval_file` / `eval_records`, else
    from the task's `eval_split` ("eval", the held-out test split; "val" to tune on a validation split disjoint
    from it, for tasks that have one), else there are none.

    `n_train` / `n_eval`: how many records a task generates (default 1024 / up to 64), or the first so many
    of a file or list (default all). `max_prompt_length` counts formatted tokens; longer prompts lose their
    beginning (`truncation="left"`) or stop setup with an error (`truncation="error"`).

    `probes`: task specs (`task_spec.TaskSpec` or dicts) only evaluated, never trained, e.g. facts the model
    knew before training (retention): each on its own `eval_split`, with its own verifier (`probe_task`), its
    records served by `eval_dataloader(label)`.
    """

    def __init__(self, tokenizer: Any, *, task: str | Task | None = None, task_kwargs: dict | None = None,
                 train_file: str | None = None, eval_file: str | None = None, records: list[dict] | None = None,
                 eval_records: list[dict] | None = None, hf_dataset: Iterable[dict] | None = None,
                 n_train: int | None = None, n_eval: int | None = None, batch_size: int = 8,
                 eval_batch_size: int | None = None, max_prompt_length: int | None = None, truncation: str = TRUNCATION,
                 seed: int = 0, system_prompt: str | None = None, num_workers: int = 0,
                 eval_split: str = "eval", probes: list | None = None) -> None:
        super().__init__()
        sources = {"task": task, "train_file": train_file, "records": records, "hf_dataset": hf_dataset}
        given = [k for k, v in sources.items() if v is not None]
        if len(given) != 1:
            raise DataError(f"PromptDataModule needs exactly one train source: task=, train_file=, records= or"
                            f" hf_dataset= (got {given or 'none'})")
        if eval_file is not None and eval_records is not None:
            raise DataError("give eval_file= or eval_records=, not both")
        if task_kwargs and not isinstance(task, str):
            raise DataError("task_kwargs= needs task= to be a built-in task name")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise DataError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be positive")
        for opt, v in (("n_train", n_train), ("n_eval", n_eval)):
            if v is not None and v < (1 if opt == "n_train" else 0):
                raise DataError(f"{opt}={v} must be {'positive' if opt == 'n_train' else 'zero or more'} (or None)")
        if eval_split not in ("eval", "val"):
            raise DataError(f"data.eval_split={eval_split!r} must be 'eval' (held-out test) or 'val' (validation)")
        check_truncation(truncation)
        if max_prompt_length is not None and max_prompt_length < 1:
            raise DataError(f"max_prompt_length={max_prompt_length} must be positive (or None)")

        self.tokenizer = tokenizer
        self.task: Task | None = get_task(task, **(task_kwargs or {})) if isinstance(task, str) else task
        self.train_file, self.eval_file = train_file, eval_file
        self._records, self._eval_records, self._hf_dataset = records, eval_records, hf_dataset
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_prompt_length, self.truncation, self.system_prompt = max_prompt_length, truncation, system_prompt
        self.num_workers = num_workers
        self.eval_split = eval_split
        self.probe_specs = parse_specs(probes, "probes")
        self.probe_tasks: dict[str, Task] = {s.label: get_task(s.task, **s.task_kwargs) for s in self.probe_specs}
        self.probe_records: dict[str, list[dict]] = {}

        self.train_records: list[dict] = []
        self.eval_records: list[dict] = []
        self.collate: PromptCollator | None = None
        self._sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------ loading

    def _train_source(self) -> tuple[list[dict], str]:
        if self.task is not None:
            return self.task.records("train", self.n_train or DEFAULT_N_TRAIN, self.seed), f"task {self.task.name!r}"
        if self.train_file is not None:
            rows, source = load_jsonl(self.train_file), str(self.train_file)
        elif self._records is not None:
            rows, source = validate_records(self._records, source="records"), "records"
        else:
            rows = list(self._hf_dataset)
            if rows and not isinstance(rows[0], dict):
                raise DataError(f"hf_dataset row 0 is a {type(rows[0]).__name__}, not a dict; pass one split,"
                                f" e.g. hf_dataset=dataset['train']")
            rows, source = validate_records([dict(r) for r in rows], source="hf_dataset"), "hf_dataset"
        if self.n_train is not None and len(rows) > self.n_train:
            warnings.warn(f"using the first {self.n_train} of {len(rows)} records of {source} (n_train={self.n_train})",
                          stacklevel=3)
        return rows[: self.n_train], source

    def _eval_source(self) -> tuple[list[dict], str]:
        if self.eval_file is not None:
            return load_jsonl(self.eval_file)[: self.n_eval], str(self.eval_file)
        if self._eval_records is not None:
            return validate_records(self._eval_records, source="eval_records")[: self.n_eval], "eval_records"
        if self.task is not None:
            n = self.n_eval
            if n is None:
                n = min(DEFAULT_N_EVAL, self.task.n_distinct(self.eval_split) or DEFAULT_N_EVAL)
            return ((self.task.records(self.eval_split, n, self.seed) if n else []),
                    f"task {self.task.name!r} ({self.eval_split})")
        return [], "none"

    def setup(self, stage: str | None = None) -> None:
        """Load or generate the records, check them and their prompt lengths (once)."""
        if self.collate is not None:
            return
        self.prompts = PromptEncoder(self.tokenizer, self.system_prompt, self.max_prompt_length, self.truncation)
        train, train_src = self._train_source()
        evals, eval_src = self._eval_source()
        self.train_records, self.eval_records = _with_ids(train, train_src), _with_ids(evals, eval_src)
        self._check_lengths(self.train_records, train_src)
        if self.eval_records:
            self._check_lengths(self.eval_records, eval_src)
            overlap = {r["prompt"] for r in self.train_records} & {r["prompt"] for r in self.eval_records}
            if overlap:
                warnings.warn(f"{len(overlap)} eval prompts also appear in the train records ({train_src});"
                              f" eval accuracy will overstate generalization", stacklevel=2)
        for spec in self.probe_specs:
            task = self.probe_tasks[spec.label]
            n = spec.n_eval if spec.n_eval is not None else task.n_distinct(self.eval_split) or DEFAULT_N_EVAL
            source = f"probe {spec.label!r} ({self.eval_split})"
            self.probe_records[spec.label] = _with_ids(task.records(self.eval_split, n, self.seed), source)
            self._check_lengths(self.probe_records[spec.label], source)
        self.collate = PromptCollator(self.prompts)

    def _check_lengths(self, records: list[dict], source: str) -> None:
        if self.max_prompt_length is None or not records:
            return
        texts = [self.prompts.format(r["prompt"], r) for r in records]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        long = [i for i, n in enumerate(lengths) if n > self.max_prompt_length]
        if not long:
            return
        i = long[0]
        if self.truncation == "error":
            raise DataError(f"{source} row {i} (id {records[i]['id']!r}) has {lengths[i]} prompt tokens, more than"
                            f" max_prompt_length={self.max_prompt_length}; raise max_prompt_length or set"
                            f" truncation='left' ({len(long)} of {len(records)} rows are too long)")
        warnings.warn(f"{len(long)} of {len(records)} prompts of {source} are longer than max_prompt_length="
                      f"{self.max_prompt_length} tokens (longest {max(lengths)}); they lose their beginning"
                      f" (truncation='left')", stacklevel=3)

    # -------------------------------------------------------------------------------------- dataloaders

    def train_dataloader(self) -> DataLoader:
        if self.collate is None:
            self.setup("fit")
        self._sampler = ResumableSampler(len(self.train_records), batch_size=self.batch_size, seed=self.seed,
                                         num_replicas=self._world_size(),
                                         rank=self.trainer.global_rank if self.trainer else 0)
        if self._resume is not None:
            self._sampler.resume(*self._resume)
            self._resume = None
        return DataLoader(self.train_records, batch_size=self.batch_size, sampler=self._sampler,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.collate is None:
            self.setup("validate")
        if not self.eval_records:
            return []
        return DataLoader(self.eval_records, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    @property
    def probe_labels(self) -> list[str]:
        return [s.label for s in self.probe_specs]

    def eval_dataloader(self, label: str) -> DataLoader | list:
        """The eval records of the probe `label`."""
        if self.collate is None:
            self.setup("validate")
        if label not in self.probe_records:
            raise DataError(f"no probe labelled {label!r}; probes: {self.probe_labels}")
        records = self.probe_records[label]
        return DataLoader(records, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate) \
            if records else []

    def probe_task(self, label: str) -> Task:
        """The task that verifies the probe `label`'s completions."""
        return self.probe_tasks[label]

    # ---------------------------------------------------------------------------------- resumable state

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    def _batches_done(self) -> int:
        """Train batches of the current epoch consumed so far: Lightning's own count when a trainer is
        running (it fetches one batch ahead, so the sampler's count would be one too many), else the sampler's."""
        assert self._sampler is not None
        if self.trainer is None:
            return self._sampler.batches_yielded
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def state_dict(self) -> dict[str, Any]:
        if self._sampler is None:
            if self._resume is None:
                return {}
            epoch, done = self._resume
        else:
            epoch, done = self._sampler.epoch, self._batches_done()
        return {"epoch": epoch, "batches_done": done, "seed": self.seed, "n_train": len(self.train_records),
                "batch_size": self.batch_size, "world_size": self._world_size()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        now = {"seed": self.seed, "n_train": len(self.train_records) if self.train_records else state_dict["n_train"],
               "batch_size": self.batch_size, "world_size": self._world_size()}
        changed = {k: (state_dict[k], v) for k, v in now.items() if state_dict.get(k) != v}
        if changed:
            warnings.warn(f"resuming with different data settings {changed} (saved, now): the train order will"
                          f" not continue where it stopped", stacklevel=2)
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
        # Lightning only knows resumable *dataloaders*; this one resumes through the data module
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        if self._sampler is not None:
            self._sampler.resume(*self._resume)
            self._resume = None
