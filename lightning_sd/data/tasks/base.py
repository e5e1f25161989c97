"""What every task provides: seeded records for a split, and a verifier that scores a completion.

Generated tasks keep train and eval disjoint by construction: each problem is put in one split by a stable
hash of its content (or, for fact recall, by the question's phrasing), so no eval prompt is ever a train
prompt, whatever `n` and `seed` are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lightning_sd.data.records import DataError, save_jsonl

log = logging.getLogger(__name__)

# "eval" is the held-out test split every reported number uses; "val", where a task has one, is a third split
# disjoint from both, for tuning (a recipe search never sees "eval")
SPLITS = ("train", "val", "eval")


@dataclass
class Verdict:
    reward: float  # 1.0 correct, 0.0 wrong
    feedback: str | None = None  # the concrete error, for tasks with rich feedback


class Task(ABC):
    """A source of prompt records plus their verifier. Subclasses set `name` and implement `records` and
    `verify`; `verify` must be pure and fast (it runs on every sampled completion)."""

    name: str = "task"
    splits: tuple[str, ...] = ("train", "eval")  # the splits `records` serves; tasks with "val" list it

    @abstractmethod
    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """`n` records of `split` (one of `self.splits`), the same for the same seed."""

    @abstractmethod
    def verify(self, record: dict, completion: str) -> Verdict:
        """Score one completion of `record["prompt"]`."""

    def n_distinct(self, split: str) -> int | None:
        """How many different prompts `split` has (None: practically unbounded); beyond it records repeat."""
        return None

    def export_jsonl(self, path: str | os.PathLike, split: str, n: int, seed: int = 0) -> Path:
        """Write `records(split, n, seed)` to a JSONL file (readable by `load_jsonl`)."""
        return save_jsonl(self.records(split, n, seed), path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_split(split: str, splits: tuple[str, ...] = ("train", "eval"), task: str = "this task") -> None:
    if split not in splits:
        raise DataError(f"split={split!r} is not one of {task}'s splits {splits}"
                        + (" (data.eval_split=val needs a task with a validation split: every built-in task has one; a task of "
                           "your own lists 'val' in its `splits`)"
                           if split == "val" else ""))


def check_shares(task: str, eval_share: float, val_share: float) -> None:
    """Raise `DataError` unless `eval_share` and `val_share` split the records: `eval_share` in (0, 1),
    `val_share` >= 0, together below 1."""
    if not 0 < eval_share < 1 or not 0 <= val_share < 1 - eval_share:
        raise DataError(f"{task}: eval_share={eval_share} and val_share={val_share} must be shares of the "
                        "records (eval_share > 0, val_share >= 0, together below 1)")


def distinct_records(task: Task, split: str, n: int, seed: int,
                     candidate: Callable[[random.Random], tuple[str, Callable[[], dict]]], unique: str,
                     shortage: str) -> list[dict]:
    """`n` different records of `split`, drawn by rejection: `candidate(rng)` returns the candidate's split key
    (`split_of` assigns it to a split with the task's `eval_share` and `val_share`) and a function that makes
    its record (called only for the split asked for); a record whose `unique` field repeats an earlier one is
    dropped. The random stream depends on the task's name, the split and `seed` only. Raises
    `DataError(shortage)` when `n` records cannot be found (the split is too small)."""
    check_split(split, task.splits, task.name)
    rng = random.Random(f"{task.name}/{split}/{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        key, make = candidate(rng)
        if split_of(key, task.eval_share, getattr(task, "val_share", 0.0)) != split:
            continue
        rec = make()
        if rec[unique] in seen:
            continue
        seen.add(rec[unique])
        out.append({**rec, "id": f"{task.name}/{split}/{seed}/{len(out)}", "task": task.name, "split": split})
    if len(out) < n:
        raise DataError(shortage)
    return out


def stable_hash(text: str, byteorder: str = "big") -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` of a str is salted per process): the
    first 8 bytes of the text's SHA-256, read in `byteorder`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], byteorder)


def split_of(key: str, eval_share: float = 0.2, val_share: float = 0.0) -> str:
    """The split a problem belongs to, from a stable hash of its canonical `key`: the first `eval_share` of the
    hash range is "eval" (held-out test), the next `val_share` "val" (tuning), the rest "train". Changing
    `val_share` never moves a problem into or out of "eval"."""
    h = stable_hash(key) % 10_000
    return "eval" if h < eval_share * 10_000 else "val" if h < (eval_share + val_share) * 10_000 else "train"


# ---------------------------------------------------------------------------------------------- answers

_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def normalize_number(text: str) -> str:
    """"1,000" -> "1000", "12.50" -> "12.5", "9.0" -> "9", "-0" -> "0"; other text is returned stripped."""
    s = text.strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", s):
        return text.strip()
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    sign = "-" if s.startswith("-") else ""
    digits = s.lstrip("+-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return digits if digits == "0" else sign + digits


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a reply, normalized: the last `\\boxed{...}`, else the first number after
    the last "answer is" / "answer:", else the last number in the text; None when there is none."""
    boxed = _boxed_contents(text)
    if boxed:
        nums = _NUM_RE.findall(boxed[-1])  # "9", "9 apples", "\text{9}": the number; "\frac{1}{2}": as is
        return normalize_number(nums[0]) if len(nums) == 1 else (boxed[-1].strip() or None)
    marks = list(_ANSWER_RE.finditer(text))
    if marks:
        m = _NUM_RE.search(text[marks[-1].end():marks[-1].end() + 30])
        if m:
            return normalize_number(m.group())
    nums = _NUM_RE.findall(text)
    return normalize_number(nums[-1]) if nums else None


# ------------------------------------------------------------------------------------------ safe verify

def safe_verify(task: Task, record: dict, completion: str, timeout_s: float = 5.0) -> Verdict | None:
    """`task.verify(record, completion)`, or None when the verifier raises, returns something other than a
    `Verdict`, or takes longer than `timeout_s` (the caller counts the Nones).

    The verifier runs in a fresh daemon thread whose result arrives through a `concurrent.futures.Future`,
    so this works from any thread (no signals) and a stuck verifier never blocks interpreter exit. Python
    cannot kill a thread: a timed-out verifier keeps running in the background and its result is dropped.
    """
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(task.verify(record, completion))
        except BaseException as e:  # noqa: BLE001 - reported through the future
            future.set_exception(e)

    threading.Thread(target=run, name=f"verify-{task.name}", daemon=True).start()
    try:
        verdict = future.result(timeout=timeout_s)
    except FutureTimeout:
        log.warning("verifier of task %r timed out after %.1f s on record %r", task.name, timeout_s, record.get("id"))
        return None
    except Exception as e:  # noqa: BLE001
        log.warning("verifier of task %r raised %s: %s on record %r", task.name, type(e).__name__, e, record.get("id"))
        return None
    if not isinstance(verdict, Verdict):
        log.warning("verifier of task %r returned %r, not a Verdict", task.name, verdict)
        return None
    return verdict
