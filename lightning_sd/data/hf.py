"""Records from the `datasets` library (`data=hf`): a local folder, a data file (json, jsonl, parquet, csv,
arrow) or a Hub id, with a field mapping from columns to record fields, or a user's row formatter.

The prompt column holds plain text or a chat `messages` list (`[{"role": ..., "content": ...}, ...]`): its
system messages become the record's `system` prompt, the last user message its `prompt` (earlier turns are
kept as a transcript before it), and an assistant message after it the `solution` when no solution column
is mapped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_sd.data.records import DataError, validate_records
from lightning_sd.data.targets import import_function

FIELDS = ("prompt", "solution", "answer", "system", "id")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data=hf needs the datasets package: pip install 'lightning_sd[hf]' "
                        "(or pip install datasets)") from None
    return datasets


def load_split(path: str, split: str, name: str | None = None, num_proc: int | None = None, key: str = "data.split"):
    """One split of a dataset: `path` a data file (its one split is `train`; slices such as `train[:24]` work),
    a folder of data files (splits from the file names: train.jsonl, test.jsonl, ...) or a Hub id."""
    datasets = _datasets()
    local = Path(path)
    kwargs: dict[str, Any] = {"split": split, "num_proc": num_proc}
    if local.is_file():
        builder = FILE_TYPES.get(local.suffix.lower())
        if builder is None:
            raise DataError(f"data.path={path!r}: a {local.suffix or 'suffix-less'} file; give a "
                            f"{'/'.join(sorted(FILE_TYPES))} file, or a folder of them")
        args: tuple = (builder,)
        kwargs["data_files"] = {"train": str(local)}
    else:
        if not local.exists() and (path.startswith((".", "/", "~")) or os.sep + os.sep in path):
            raise DataError(f"data.path={path!r}: no such file or folder (relative paths start from {os.getcwd()})")
        args = (path,) if name is None else (path, name)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"{key}={split!r}: {err}") from None
        raise


def from_messages(messages: Any, where: str) -> dict:
    """`{"prompt", "system"?, "solution"?}` from a chat `messages` list."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataError(f"{where}: the prompt column holds {type(messages).__name__}; a messages list must be "
                        "[{'role': ..., 'content': ...}, ...]")
    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the messages list has no user message (roles: {[m['role'] for m in messages]})")
    last = users[-1]
    earlier = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns[:last])
    out = {"prompt": (earlier + "\n\nUser: " if earlier else "") + str(turns[last]["content"])}
    if system:
        out["system"] = system
    replies = [m for m in turns[last + 1:] if m["role"] == "assistant"]
    if replies:
        out["solution"] = str(replies[-1]["content"])
    return out


def map_row(row: dict, fields: dict, where: str) -> dict:
    """A record from one row through the field mapping (`{field: column}`, null columns skipped)."""
    rec = {field: row[column] for field, column in fields.items() if column is not None}
    if isinstance(rec.get("prompt"), list):
        parsed = from_messages(rec.pop("prompt"), where)
        rec["prompt"] = parsed.pop("prompt")
        for field, value in parsed.items():  # a mapped column wins over what the messages hold
            rec.setdefault(field, value)
    if rec.get("id") is not None:
        rec["id"] = str(rec["id"])
    for field in ("solution", "system"):
        if rec.get(field) is not None and not isinstance(rec[field], str):
            rec[field] = str(rec[field])
    return {k: v for k, v in rec.items() if v is not None}


def check_columns(columns: list[str], fields: dict, source: str) -> None:
    """Raise `DataError` when a mapped column is not in the dataset, naming it and listing those present."""
    for field, column in fields.items():
        if column is not None and column not in columns:
            raise DataError(f"{source}: data.fields.{field}={column!r} is not a column of the dataset; its columns "
                            f"are {columns}. Set data.fields.{field}=<one of them> (or null if there is none)")


def dataset_records(dataset: Any, fields: dict | None, formatter: dict | None, source: str) -> list[dict]:
    """Records from the rows of `dataset` (any iterable of dicts with `column_names`), checked, with ids."""
    if formatter is not None:
        fn = import_function(dict(formatter), "data.format")
        records = []
        for i, row in enumerate(dataset):
            rec = fn(dict(row))
            if not isinstance(rec, dict):
                raise DataError(f"{source} row {i}: data.format returned {type(rec).__name__}; it must return a "
                                "record dict {'prompt': ..., 'solution'?: ..., 'answer'?: ...}")
            records.append(rec)
    else:
        fields = {k: v for k, v in (fields or {}).items() if v is not None}
        check_columns(list(getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset) else [])),
                      fields, source)
        records = [map_row(dict(row), fields, f"{source} row {i}") for i, row in enumerate(dataset)]
    for i, rec in enumerate(records):
        rec.setdefault("id", f"{source}:{i}")
    return validate_records(records, source=source)


def load_hf_records(path: str, split: str = "train", eval_split: str | None = None, name: str | None = None,
                    num_proc: int | None = None, fields: dict | None = None,
                    formatter: dict | None = None) -> tuple[list[dict], list[dict]]:
    """`(train records, eval records)` of a dataset; no eval records when `eval_split` is None."""
    train = load_split(path, split, name, num_proc)
    train_records = dataset_records(train, fields, formatter, f"{path} [{split}]")
    if eval_split is None:
        return train_records, []
    evals = load_split(path, eval_split, name, num_proc, key="data.eval_split")
    return train_records, dataset_records(evals, fields, formatter, f"{path} [{eval_split}]")


__all__ = ["FIELDS", "check_columns", "dataset_records", "from_messages", "load_hf_records", "load_split", "map_row"]
