"""Records: the plain dicts every data source is turned into, and their JSONL files.

A record is `{"prompt": str, "solution": str, "answer": str, "id": str, "task": str, ...}`. Only `prompt` is
required. `solution` is the privileged context a teacher may see (a worked reference solution or a
demonstration); `answer` is what a verifier checks against; any other keys travel along untouched.

Errors are `DataError`s whose messages name the file and line (or the row index) and say what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_sd.files import atomic_open

# Fields that must be strings when present (`answer` may also be a JSON number: verifiers use str(answer)).
STRING_FIELDS = ("prompt", "solution", "id", "task")


class DataError(ValueError):
    """Bad input data or data options; the message names where and what to change."""


def _check_record(rec: Any, where: str, required: Sequence[str], nonempty: Sequence[str]) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(rec).__name__}")
    for field in required:
        if rec.get(field) is None:
            raise DataError(f"{where}: missing required field {field!r}; every record needs {list(required)}"
                            f" (keys present: {sorted(rec)})")
    for field in nonempty:
        value = rec.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: field {field!r} is empty; fill it in or drop this record")
    for field in STRING_FIELDS:
        if field in rec and rec[field] is not None and not isinstance(rec[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}"
                            f" {rec[field]!r}")
    answer = rec.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")


def validate_records(records: Iterable[Any], required: Sequence[str] = ("prompt",),
                     nonempty: Sequence[str] | None = None, source: str = "records") -> list[dict]:
    """Check in-memory records (`nonempty` defaults to `required`); returns them as a list.

    Errors name `source`, the row index and the field.
    """
    nonempty = required if nonempty is None else nonempty
    out = list(records)
    if not out:
        raise DataError(f"{source}: no records")
    for i, rec in enumerate(out):
        _check_record(rec, f"{source} row {i}", required, nonempty)
    return out


def load_jsonl(path: str | os.PathLike, *, required: Sequence[str] = ("prompt",),
               nonempty: Sequence[str] = ("prompt",), skip_blank: bool = False) -> list[dict]:
    """Read one JSON object per line.

    Blank lines are an error naming the line (they usually mean a broken export) unless `skip_blank`;
    blank lines at the very end of the file are ignored. A UTF-8 byte-order mark and CRLF line ends are
    accepted. A record without `id` gets `"<file name>:<line>"`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1});"
                            f" re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
        if not text.strip():
            if skip_blank:
                continue
            raise DataError(f"{where}: blank line; JSONL needs one JSON object per line"
                            f" (remove it, or pass skip_blank=True)")
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        _check_record(rec, where, required, nonempty)
        rec.setdefault("id", f"{path.name}:{lineno}")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def save_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records one per line (UTF-8, non-ASCII kept); the file appears atomically."""
    path = Path(path)
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
