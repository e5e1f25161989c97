"""Answer checking for any data (`data.verifier`): built-in verifiers by name, or a user function.

| name | a completion is correct when |
|---|---|
| `math` | its final answer equals the record's `answer` as mathematics (`1/2`, `0.5`, `\\frac{1}{2}`), by `math-verify` |
| `exact` | it is the answer, up to surrounding whitespace |
| `normalized` | it is the answer once both are lower-cased, stripped of punctuation and of repeated whitespace |
| `contains` | the normalized answer appears in it as whole words |
| `regex` | `data.verifier_pattern` matches it; with an `answer`, the last match (its first group, if it has one) normalized equals the normalized answer |
| `choice` | the letter it picks (A-E: "The answer is (B)", "B)", a lone "B") is the answer's |
| `none` | no checking (no accuracy, no rewards) |

A reference answer holding `#### ` (GSM8K's layout: reasoning, then `#### <number>`) is the text after the last
`####`. A user function is given as `{"_target_": "package.module.function", **options}` and called as
`function(record, completion, **options)`; it returns a reward in [0, 1] or `(reward, feedback_text)`.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Callable
from functools import partial
from typing import Any

from lightning_sd.data.records import DataError
from lightning_sd.data.targets import import_function
from lightning_sd.data.tasks.base import Verdict

BUILT_IN = ("math", "exact", "normalized", "contains", "regex", "choice", "none")
NEEDS_ANSWER = ("math", "exact", "normalized", "contains", "choice")  # regex works without one
CHOICES = "ABCDE"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_CHOICE_PATTERNS = (
    re.compile(r"[Aa]nswer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-E])\b\)?"),  # "The answer is (B)", "Answer: C"
    re.compile(r"\(([A-E])\)"),                                    # "(B)"
    re.compile(r"(?m)^\s*([A-E])\s*[).:]"),                        # "B) ..." at the start of a line
    re.compile(r"^\s*([A-E])\s*\.?\s*$"),                          # the whole reply is one letter
)


def reference_answer(record: dict) -> str:
    """The record's `answer` as text; the part after the last `####` when it has one (GSM8K)."""
    answer = record.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"record {record.get('id')!r} has no 'answer' to check completions against; add one, or "
                        "choose data.verifier=none (or regex without an answer)")
    text = str(answer)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def normalize_text(text: str) -> str:
    """Lower case, Unicode NFKC, punctuation replaced by spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


class _TimeoutIsOurs(logging.Filter):
    """math-verify warns once that its own timeouts are off: by design here, `safe_verify` times out each call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def math_equal(reference: str, completion: str) -> bool:
    """Whether the completion's final answer equals `reference` mathematically (`math-verify`). Its own
    signal-based timeouts are off: they only work in the main thread, and `safe_verify` times out the call."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise DataError("data.verifier=math needs the math-verify package: pip install 'lightning_sd[math]' "
                        "(or pip install math-verify)") from None
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TimeoutIsOurs) for f in logger.filters):
            logger.addFilter(_TimeoutIsOurs())
    gold = parse(reference, parsing_timeout=None)
    if not gold and "$" not in reference:  # bare LaTeX ("\\sqrt{2}/2") parses once delimited as math
        gold = parse(f"${reference}$", parsing_timeout=None)
    predicted = parse(completion, parsing_timeout=None)
    return bool(gold) and bool(predicted) and bool(verify(gold, predicted, timeout_seconds=None))


def picked_choice(completion: str) -> str | None:
    """The option letter (A-E) a reply picks, or None."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(completion)
        if found:
            return found[-1]
    return None


def _math(record: dict, completion: str) -> float:
    return float(math_equal(reference_answer(record), completion))


def _exact(record: dict, completion: str) -> float:
    return float(completion.strip() == reference_answer(record))


def _normalized(record: dict, completion: str) -> float:
    return float(normalize_text(completion) == normalize_text(reference_answer(record)))


def _contains(record: dict, completion: str) -> float:
    return float(f" {normalize_text(reference_answer(record))} " in f" {normalize_text(completion)} ")


def _choice(record: dict, completion: str) -> float:
    answer = reference_answer(record).strip("() .").upper()
    if answer not in tuple(CHOICES):
        raise DataError(f"record {record.get('id')!r}: data.verifier=choice needs an answer A-E, got {answer!r}")
    return float(picked_choice(completion) == answer)


def _regex(pattern: re.Pattern, record: dict, completion: str) -> float:
    matches = list(pattern.finditer(completion))
    if record.get("answer") is None:
        return float(bool(matches))
    if not matches:
        return 0.0
    found = matches[-1].group(1 if pattern.groups else 0)
    return float(normalize_text(found or "") == normalize_text(reference_answer(record)))


FUNCTIONS: dict[str, Callable[[dict, str], float]] = {
    "math": _math, "exact": _exact, "normalized": _normalized, "contains": _contains, "choice": _choice}


class Verifier:
    """Checks a completion of a record: `verify(record, completion) -> Verdict`, as a task's verifier does.
    `fn(record, completion)` returns a reward in [0, 1] or `(reward, feedback)`; anything else raises."""

    def __init__(self, name: str, fn: Callable[..., Any], needs_answer: bool = False) -> None:
        self.name, self.fn, self.needs_answer = name, fn, needs_answer

    def verify(self, record: dict, completion: str) -> Verdict:
        out = self.fn(record, completion)
        reward, feedback = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if isinstance(reward, bool):
            reward = float(reward)
        if not isinstance(reward, (int, float)) or not 0.0 <= float(reward) <= 1.0:
            raise ValueError(f"verifier {self.name!r} returned {out!r}; it must return a reward in [0, 1] or "
                             "(reward, feedback_text)")
        if feedback is not None and not isinstance(feedback, str):
            raise ValueError(f"verifier {self.name!r} returned feedback {feedback!r}; it must be a string or None")
        return Verdict(reward=float(reward), feedback=feedback)

    def __repr__(self) -> str:
        return f"Verifier({self.name!r})"


def _user_function(spec: dict) -> Verifier:
    return Verifier(str(spec.get("_target_")), import_function(spec, "data.verifier"))


def build_verifier(spec: str | dict | None, pattern: str | None = None) -> Verifier | None:
    """The verifier of `data.verifier`: a built-in name, or a dict with `_target_`; None for `none` / null.
    Raises `DataError` naming the key and the valid values."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, dict):
        return _user_function(dict(spec))
    if spec not in BUILT_IN:
        raise DataError(f"data.verifier={spec!r} is not one of {list(BUILT_IN)}, nor a dict with _target_ naming "
                        "a function (record, completion) -> reward")
    if spec == "regex":
        if not pattern:
            raise DataError("data.verifier=regex needs data.verifier_pattern, e.g. data.verifier_pattern='answer: (\\d+)'")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise DataError(f"data.verifier_pattern={pattern!r} is not a valid regular expression: {err}") from None
        return Verifier("regex", partial(_regex, compiled))
    return Verifier(spec, FUNCTIONS[spec], needs_answer=spec in NEEDS_ANSWER)


def check_answers(records: list[dict], verifier: Any, source: str) -> None:
    """Raise `DataError` naming the first row (and id) without an `answer` when `verifier` needs one."""
    if not getattr(verifier, "needs_answer", False):
        return
    missing = [i for i, r in enumerate(records) if r.get("answer") is None or not str(r["answer"]).strip()]
    if missing:
        i = missing[0]
        raise DataError(f"{source} row {i} (id {records[i].get('id')!r}) has no 'answer', which "
                        f"data.verifier={verifier.name} checks completions against ({len(missing)} of {len(records)} "
                        "rows lack one); map an answer column, or choose data.verifier=none")


__all__ = ["BUILT_IN", "Verifier", "build_verifier", "check_answers", "math_equal", "normalize_text",
           "picked_choice", "reference_answer"]
