"""Multi-step arithmetic word problems with worked solutions; difficulty = number of steps, operand size.

"Tom has 7 apples. He buys 5 more. Then he gives away 3. How many apples does Tom have now? Give the final
answer with "The answer is" + the number" with solution "7 + 5 = 12. 12 - 3 = 9. The answer is 9." and answer "9".
Intermediate values never go below zero. A problem's split is a stable hash of its numbers, so eval
problems differ from every train problem in their numbers, not only in names and objects.
"""

from __future__ import annotations

import random

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.base import Task, Verdict, check_shares, distinct_records, extract_answer, normalize_number

NAMES = [("Tom", "he"), ("Ana", "she"), ("Ben", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she"),
         ("Sam", "he"), ("Lily", "she"), ("Omar", "he"), ("Nina", "she"), ("Raj", "he"), ("Emma", "she"),
         ("Ivan", "he"), ("Sara", "she"), ("Max", "he"), ("Yuki", "she")]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells", "cards",
           "stamps", "balloons", "toy cars"]
VERBS = {
    "+": ["buys {k} more", "finds {k} more", "is given {k} more", "wins {k} more"],
    "-": ["gives away {k}", "loses {k}", "sells {k}", "gives {k} to a friend"],
}
TIMES = {2: "doubles", 3: "triples", 4: "becomes four times as large", 5: "becomes five times as large"}
SYMBOL = {"+": "+", "-": "-", "*": "×"}


def apply(value: int, op: str, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


class ArithmeticTask(Task):
    """Word problems of `n_steps` operations from `ops` ("+", "-", "*") on operands up to `max_operand`
    (multipliers are 2-5). `n_steps=1` gives one-operation problems. Splits by a hash of the numbers:
    `eval_share` held-out test ("eval"), `val_share` validation for tuning ("val"), the rest "train"."""

    name = "arithmetic"
    splits = ("train", "val", "eval")

    def __init__(self, n_steps: int = 2, max_operand: int = 20, ops: tuple[str, ...] = ("+", "-"),
                 eval_share: float = 0.2, val_share: float = 0.1,
                 instruction: str = "Think step by step, then finish with the sentence 'The answer is' followed by the number.") -> None:
        if n_steps < 1:
            raise DataError(f"arithmetic: n_steps={n_steps} must be at least 1")
        if max_operand < 2:
            raise DataError(f"arithmetic: max_operand={max_operand} must be at least 2")
        bad = [op for op in ops if op not in SYMBOL]
        if bad or not ops:
            raise DataError(f"arithmetic: ops={ops!r} must be a non-empty subset of {tuple(SYMBOL)}")
        check_shares(self.name, eval_share, val_share)
        self.n_steps, self.max_operand, self.ops = n_steps, max_operand, tuple(ops)
        self.eval_share, self.val_share, self.instruction = eval_share, val_share, instruction

    def _numbers(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
        value = start = rng.randint(2, self.max_operand)
        steps = []
        for _ in range(self.n_steps):
            op = rng.choice(self.ops)
            if op == "-" and value == 0:
                op = "+"
            if op == "+":
                k = rng.randint(1, self.max_operand)
            elif op == "-":
                k = rng.randint(1, min(value, self.max_operand))
            else:
                k = rng.randint(2, 5)
            value = apply(value, op, k)
            steps.append((op, k))
        return start, steps

    def _record(self, rng: random.Random, start: int, steps: list[tuple[str, int]]) -> dict:
        name, pron = rng.choice(NAMES)
        obj = rng.choice(OBJECTS)
        poss = "his" if pron == "he" else "her"
        sentences, work, value = [f"{name} has {start} {obj}."], [], start
        for i, (op, k) in enumerate(steps):
            if op == "*":
                phrase = f"the number of {poss} {obj} {TIMES[k]}"
            else:
                phrase = f"{pron} " + rng.choice(VERBS[op]).format(k=k)
            phrase = f"then {phrase}" if i else phrase
            sentences.append(phrase[0].upper() + phrase[1:] + ".")
            new = apply(value, op, k)
            work.append(f"{value} {SYMBOL[op]} {k} = {new}.")
            value = new
        sentences.append(f"How many {obj} does {name} have now? {self.instruction}".rstrip())
        return {"prompt": " ".join(sentences), "solution": " ".join(work) + f" The answer is {value}.",
                "answer": str(value), "instruction": self.instruction}

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        def candidate(rng: random.Random):
            start, steps = self._numbers(rng)
            return f"{start}" + "".join(f"{op}{k}" for op, k in steps), lambda: self._record(rng, start, steps)

        return distinct_records(self, split, n, seed, candidate, unique="prompt", shortage=(
            f"arithmetic: could not make {n} different {split} problems with n_steps={self.n_steps}, "
            f"max_operand={self.max_operand}; raise max_operand or ask for fewer"))

    def verify(self, record: dict, completion: str) -> Verdict:
        predicted = extract_answer(completion)
        correct = predicted is not None and predicted == normalize_number(str(record["answer"]))
        return Verdict(reward=1.0 if correct else 0.0)
