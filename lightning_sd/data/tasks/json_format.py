"""Write a small JSON object to a spec: the task with rich feedback.

"Write a JSON object describing a person named Ana who is 31 years old. Use the keys "name" (string) and
"age" (integer). Reply with only the JSON." The verifier parses the first {...} in the reply and, when it
is wrong, says exactly why, the way a test harness would: "JSONDecodeError: Expecting ',' delimiter: line 1
column 17 (char 16)", "missing key 'age'", "key 'age' should be an integer, got string '31'",
"no JSON object found in the reply". Difficulty = `n_keys` (1-6).
"""

from __future__ import annotations

import json
import random
from typing import Any

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.base import Task, Verdict, check_shares, distinct_records

NAMES = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara"]
CITIES = ["Lisbon", "Oslo", "Lima", "Cairo", "Seoul", "Dublin", "Quito", "Vienna", "Nairobi", "Hanoi", "Perth",
          "Porto"]
PETS = ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish"]

# key -> (type name, phrase). "name" is always the first key.
FIELDS: dict[str, tuple[str, str]] = {
    "name": ("string", "named {v}"),
    "age": ("integer", "who is {v} years old"),
    "city": ("string", "who lives in {v}"),
    "is_student": ("boolean", "who {v}"),
    "height_cm": ("integer", "who is {v} cm tall"),
    "pet": ("string", "whose pet is a {v}"),
}


def type_name(value: Any) -> str:
    """The JSON type of a parsed value, in words."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return {type(None): "null", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def check_json(reply: str, expected: dict) -> list[str]:
    """The errors of `reply` against `expected` (empty when exactly right)."""
    start = reply.find("{")
    if start < 0:
        return ["no JSON object found in the reply"]
    try:
        got, _ = json.JSONDecoder().raw_decode(reply, start)
    except json.JSONDecodeError as e:
        return [f"JSONDecodeError: {e}"]
    errors = [f"missing key '{k}'" for k in expected if k not in got]
    errors += [f"unexpected key '{k}'" for k in got if k not in expected]
    for k, want in expected.items():
        if k not in got:
            continue
        have = got[k]
        if type_name(have) != type_name(want):
            errors.append(f"key '{k}' should be {_article(type_name(want))} {type_name(want)},"
                          f" got {type_name(have)} {_show(have)}")
        elif have != want:
            errors.append(f"key '{k}' should be {_show(want)}, got {_show(have)}")
    return errors


class JsonFormatTask(Task):
    """A person described in words, to be written as a JSON object with `n_keys` typed keys ("name" plus
    `n_keys - 1` of age, city, is_student, height_cm, pet). `answer` and `solution` hold the correct JSON.
    Splits by a hash of the target JSON: `eval_share` held-out test ("eval"), `val_share` validation ("val")."""

    name = "json_format"
    splits = ("train", "val", "eval")

    def __init__(self, n_keys: int = 2, eval_share: float = 0.2, val_share: float = 0.1) -> None:
        if not 1 <= n_keys <= len(FIELDS):
            raise DataError(f"json_format: n_keys={n_keys} must be between 1 and {len(FIELDS)}")
        check_shares(self.name, eval_share, val_share)
        self.n_keys, self.eval_share, self.val_share = n_keys, eval_share, val_share

    def _target(self, rng: random.Random) -> dict:
        keys = ["name"] + sorted(rng.sample(list(FIELDS)[1:], self.n_keys - 1), key=list(FIELDS).index)
        values = {"name": rng.choice(NAMES), "age": rng.randint(18, 80), "city": rng.choice(CITIES),
                  "is_student": rng.random() < 0.5, "height_cm": rng.randint(150, 200), "pet": rng.choice(PETS)}
        return {k: values[k] for k in keys}

    def _prompt(self, target: dict) -> str:
        phrases = []
        for k, v in target.items():
            word = ("is a student" if v else "is not a student") if k == "is_student" else v
            phrases.append(FIELDS[k][1].format(v=word))
        keys = [f'"{k}" ({FIELDS[k][0]})' for k in target]
        key_list = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return (f"Write a JSON object describing a person {', '.join(phrases)}. Use the key{'s' * (len(keys) > 1)}"
                f" {key_list}. Reply with only the JSON.")

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        def candidate(rng: random.Random):
            target = self._target(rng)
            answer = json.dumps(target)
            return answer, lambda: {"prompt": self._prompt(target), "solution": answer, "answer": answer}

        return distinct_records(self, split, n, seed, candidate, unique="answer", shortage=(
            f"json_format: could not make {n} different {split} records with n_keys={self.n_keys}; ask for fewer "
            f"or raise n_keys"))

    def verify(self, record: dict, completion: str) -> Verdict:
        errors = check_json(completion, json.loads(record["answer"]))
        return Verdict(reward=0.0, feedback="; ".join(errors)) if errors else Verdict(reward=1.0)

