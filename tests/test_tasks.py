"""Built-in tasks: seeded, train/eval disjoint, solutions verify, wrong answers fail, feedback is specific."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_sd.data.records import DataError, load_jsonl, validate_records
from lightning_sd.data.tasks import TASKS, Task, Verdict, extract_answer, get_task, safe_verify
from lightning_sd.data.tasks.arithmetic import ArithmeticTask
from lightning_sd.data.tasks.facts import REAL_CAPITALS, FictionalFactsTask, RealCapitalsTask
from lightning_sd.data.tasks.json_format import JsonFormatTask

VARIANTS = [("arithmetic", {}), ("arithmetic", {"n_steps": 1}), ("arithmetic", {"n_steps": 4, "ops": ("+", "-", "*")}),
            ("fictional_facts", {}),
            ("fictional_facts", {"n_facts": 9, "kinds": ("capital", "profession", "hometown")}),
            ("real_capitals", {}), ("json_format", {}), ("json_format", {"n_keys": 6})]


def wrong_completion(task: Task, rec: dict) -> str:
    if task.name == "arithmetic":
        return rec["solution"].replace(f"The answer is {rec['answer']}.", f"The answer is {int(rec['answer']) + 1}.")
    if task.name == "json_format":
        return json.dumps({**json.loads(rec["answer"]), "name": "Nobody"})
    return "I am not sure, sorry."


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_task_contract(name, kwargs):
    task = get_task(name, **kwargs)
    train, evals = task.records("train", 40, seed=0), task.records("eval", 20, seed=0)
    assert task.records("train", 40, seed=0) == train  # deterministic
    assert task.records("train", 40, seed=1) != train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}  # eval prompts never in train
    assert not {r["prompt"] for r in evals} & {r["prompt"] for r in task.records("train", 200, seed=3)}
    validate_records(train + evals, required=("prompt", "solution", "answer", "id", "task"))
    assert len({r["id"] for r in train + evals}) == 60
    for rec in train + evals:
        assert rec["task"] == name and rec["split"] in ("train", "eval")
        assert task.verify(rec, rec["solution"]) == Verdict(1.0)
        assert task.verify(rec, str(rec["answer"])).reward == 1.0
        assert task.verify(rec, wrong_completion(task, rec)).reward == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_export_round_trips_through_load_jsonl(tmp_path, name):
    task = get_task(name)
    path = task.export_jsonl(tmp_path / f"{name}.jsonl", "eval", 5, seed=2)
    assert load_jsonl(path, required=("prompt", "solution", "answer")) == task.records("eval", 5, seed=2)


def test_get_task_errors_and_split_check():
    with pytest.raises(DataError, match=r"unknown task 'math'; built-in tasks: \['arithmetic'"):
        get_task("math")
    with pytest.raises(DataError, match=r"has no option\(s\) \['steps'\]; its options are \['n_steps'"):
        get_task("arithmetic", steps=3)
    with pytest.raises(DataError, match=r"split='test' is not one of arithmetic's splits \('train', 'val', 'eval'\)"):
        get_task("arithmetic").records("test", 3)
    from lightning_sd.data.tasks.base import check_split

    with pytest.raises(DataError, match=r"split='val' is not one of mine's splits .*eval_split=val needs"):
        check_split("val", ("train", "eval"), "mine")


def test_facts_splits_ask_the_same_facts_with_disjoint_phrasings():
    task = get_task("fictional_facts", n_facts=6, kinds=("capital", "profession", "hometown"), world_seed=3)
    prompts = {split: {r["prompt"] for r in task.records(split, task.n_distinct(split))}
               for split in ("train", "val", "eval")}
    assert all(prompts[a].isdisjoint(prompts[b]) for a, b in [("train", "val"), ("train", "eval"), ("val", "eval")])
    answers = {split: {r["answer"] for r in task.records(split, 6)} for split in ("train", "val", "eval")}
    assert answers["train"] == answers["val"] == answers["eval"] == {f.answer for f in task.facts}


# ------------------------------------------------------------------------------------------- arithmetic

def test_arithmetic_difficulty_knobs_and_solution_shape():
    one = ArithmeticTask(n_steps=1, max_operand=9).records("train", 30)
    assert all(r["solution"].count("=") == 1 and r["prompt"].endswith("Think step by step, then finish with the sentence 'The answer is' followed by the number.")
               for r in one)
    four = ArithmeticTask(n_steps=4).records("train", 30)
    assert all(r["solution"].count("=") == 4 for r in four)
    for rec in one + four:  # the worked steps are right and chain into the answer
        steps = re.findall(r"(\d+) ([+\-×]) (\d+) = (\d+)\.", rec["solution"])
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op] == int(c) >= 0
        assert steps[-1][3] == rec["answer"] and f"has {steps[0][0]} " in rec["prompt"]


def test_arithmetic_eval_numbers_are_not_train_numbers():
    task = ArithmeticTask(n_steps=1, max_operand=12)
    key = lambda r: re.sub(r"\D+", " ", r["solution"])  # noqa: E731 - the numbers of the problem
    assert not {key(r) for r in task.records("train", 150)} & {key(r) for r in task.records("eval", 30)}


def test_arithmetic_validation_split_is_disjoint_and_leaves_the_test_split_unchanged():
    """Tuning uses "val"; every reported number uses "eval". Carving out "val" must not move any test problem."""
    key = lambda r: re.sub(r"\D+", " ", r["solution"])  # noqa: E731 - the numbers of the problem
    task = ArithmeticTask(n_steps=1, max_operand=50)
    train, val, test = ({key(r) for r in task.records(split, n)} for split, n in (("train", 320), ("val", 64),
                                                                                 ("eval", 64)))
    assert len(val) > 40 and not val & train and not val & test and not train & test
    no_val = ArithmeticTask(n_steps=1, max_operand=50, val_share=0.0)
    assert no_val.records("eval", 64) == task.records("eval", 64)


def test_json_format_validation_split_is_disjoint_and_leaves_the_test_split_unchanged():
    task = JsonFormatTask(n_keys=2)
    train, val, test = ({r["answer"] for r in task.records(split, n)} for split, n in (("train", 256), ("val", 48),
                                                                                      ("eval", 64)))
    assert len(val) == 48 and not val & train and not val & test and not train & test
    assert JsonFormatTask(n_keys=2, val_share=0.0).records("eval", 64) == task.records("eval", 64)
    with pytest.raises(DataError, match="eval_share=0.5 and val_share=0.5"):
        JsonFormatTask(eval_share=0.5, val_share=0.5)


def test_data_eval_split_val_evaluates_on_the_validation_split():
    from conftest import RECORDS  # noqa: F401 - the tiny tokenizer needs nothing from them

    from lightning_sd.data.datamodule import PromptDataModule
    from lightning_sd.models import load_model

    tok = load_model("tiny", seed=0)[1]
    dm = PromptDataModule(tok, task="arithmetic", n_train=8, n_eval=4, eval_split="val")
    dm.setup("fit")
    assert {r["split"] for r in dm.eval_records} == {"val"}
    with pytest.raises(DataError, match="data.eval_split='test' must be 'eval'"):
        PromptDataModule(tok, task="arithmetic", eval_split="test")


def test_arithmetic_bad_options():
    with pytest.raises(DataError, match="n_steps=0 must be at least 1"):
        ArithmeticTask(n_steps=0)
    with pytest.raises(DataError, match=r"ops=\('/',\)"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(DataError, match="max_operand=1 must be at least 2"):
        ArithmeticTask(max_operand=1)


@pytest.mark.parametrize("text, expected", [
    ("7 + 5 = 12. 12 - 3 = 9. The answer is 9.", "9"),
    ("so \\boxed{42} and then 7", "42"),
    ("\\boxed{\\text{1,000 apples}}", "1000"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Answer: 1,234,567 dollars", "1234567"),
    ("The answer is: **-3.0**, not 5", "-3"),
    ("the final answer is $12.50$.", "12.5"),
    ("I think 3 then 4 then 15", "15"),
    ("12-3 is 9? no, 8", "8"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@given(st.integers(-10**7, 10**7))
def test_extract_answer_reads_back_formatted_integers(n):
    assert extract_answer(f"Steps 1 + 2 = 3. The answer is {n:,}.") == str(n)
    assert extract_answer(f"so \\boxed{{{n}}} is it, 77") == str(n)
    assert extract_answer(f"first 5, then {n}") == str(n)


# ------------------------------------------------------------------------------------------------ facts

def test_facts_same_facts_different_phrasings():
    task = FictionalFactsTask(n_facts=12)
    train, evals = task.records("train", 36), task.records("eval", 12)
    assert {r["entity"] for r in evals} == {r["entity"] for r in train[:12]} == {f.entity for f in task.facts}
    assert len({r["prompt"] for r in train}) == 36 == task.n_distinct("train") and task.n_distinct("eval") == 24
    assert all(r["solution"] == f"The capital of {r['entity']} is {r['answer']}." for r in train + evals)
    more = task.records("train", 40)
    assert len(more) == 40 and {r["prompt"] for r in more[36:]} <= {r["prompt"] for r in more[:36]}  # repeats
    assert FictionalFactsTask(world_seed=1).facts != task.facts
    assert FictionalFactsTask(n_facts=12).facts == task.facts
    names = [w for f in task.facts for w in (f.entity, f.answer)]
    assert len(set(names)) == 24 and not any(a != b and a.lower() in b.lower() for a in names for b in names)


def test_facts_verifier_is_whole_word_and_case_insensitive():
    task = FictionalFactsTask()
    rec = {"prompt": "q", "answer": "Tarnfeld"}
    assert task.verify(rec, "It is tarnfeld, of course.").reward == 1.0
    assert task.verify(rec, "Tarnfeldia").reward == 0.0
    assert task.verify({"answer": "lighthouse keeper"}, "She is a Lighthouse Keeper.").reward == 1.0


def test_real_capitals_probe():
    task = RealCapitalsTask()
    evals = task.records("eval", task.n_distinct("eval"))
    assert len(task.facts) == 16 == len(REAL_CAPITALS) and len(evals) == 32
    known = {"Paris", "Tokyo", "Rome", "Berlin", "Madrid", "London", "Moscow", "Beijing", "Cairo"}
    assert known <= {r["answer"] for r in evals}
    france = next(r for r in evals if r["entity"] == "France")
    assert task.verify(france, "The capital of France is Paris.").reward == 1.0
    assert task.verify(france, "The capital of France is Lyon.").reward == 0.0


# ------------------------------------------------------------------------------------------ json format

def test_json_prompt_and_knob():
    rec = JsonFormatTask(n_keys=2).records("train", 1, seed=0)[0]
    assert rec["prompt"].startswith("Write a JSON object describing a person named ")
    assert rec["prompt"].endswith("Reply with only the JSON.") and '"name" (string)' in rec["prompt"]
    for n in range(1, 7):
        assert all(len(json.loads(r["answer"])) == n for r in JsonFormatTask(n_keys=n).records("train", 5))
    with pytest.raises(DataError, match="n_keys=7 must be between 1 and 6"):
        JsonFormatTask(n_keys=7)


@pytest.mark.parametrize("reply, feedback", [
    ("Sure! Here is a person.", "no JSON object found in the reply"),
    ('{"name": "Ana" "age": 31}', "JSONDecodeError: Expecting ',' delimiter: line 1 column 16 (char 15)"),
    ('Here: {"name": "Ana", "age": 31', "JSONDecodeError: Expecting ',' delimiter: line 1 column 32 (char 31)"),
    ('{"name": "Ana"}', "missing key 'age'"),
    ('{"name": "Ana", "age": "31"}', "key 'age' should be an integer, got string '31'"),
    ('{"name": "Ana", "age": 31.5}', "key 'age' should be an integer, got number 31.5"),
    ('{"name": "Ana", "age": 32}', "key 'age' should be 31, got 32"),
    ('{"name": "ana", "age": 31, "city": "Oslo"}', "unexpected key 'city'; key 'name' should be 'Ana', got 'ana'"),
    ('{"name": null, "age": true}', "key 'name' should be a string, got null null; key 'age' should be an integer,"
                                    " got boolean true"),
])
def test_json_feedback_is_specific(reply, feedback):
    rec = {"prompt": "p", "answer": '{"name": "Ana", "age": 31}'}
    assert JsonFormatTask().verify(rec, reply) == Verdict(0.0, feedback)


def test_json_accepts_code_fences_and_any_key_order():
    rec = {"prompt": "p", "answer": '{"name": "Ana", "age": 31}'}
    assert JsonFormatTask().verify(rec, '```json\n{\n  "age": 31,\n  "name": "Ana"\n}\n```').reward == 1.0


# ------------------------------------------------------------------------------------------ safe_verify

class Weird(Task):
    name = "weird"

    def __init__(self, mode: str):
        self.mode = mode

    def records(self, split, n, seed=0):
        return []

    def verify(self, record, completion):
        if self.mode == "raise":
            raise ZeroDivisionError("boom")
        if self.mode == "sleep":
            time.sleep(3)
        if self.mode == "wrong type":
            return 1.0
        return Verdict(1.0)


def test_safe_verify_catches_raising_sleeping_and_wrong_type(caplog):
    rec = {"prompt": "p", "id": "r1"}
    assert safe_verify(Weird("ok"), rec, "x") == Verdict(1.0)
    assert safe_verify(Weird("raise"), rec, "x") is None
    assert "ZeroDivisionError: boom" in caplog.text and "'r1'" in caplog.text
    assert safe_verify(Weird("wrong type"), rec, "x") is None
    t0 = time.perf_counter()
    assert safe_verify(Weird("sleep"), rec, "x", timeout_s=0.2) is None
    assert time.perf_counter() - t0 < 1.5 and "timed out after 0.2 s" in caplog.text


def test_safe_verify_works_off_the_main_thread():
    rec = {"prompt": "p", "answer": "9"}
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda c: safe_verify(get_task("arithmetic"), rec, c), ["The answer is 9.", "8"]))
    assert out == [Verdict(1.0), Verdict(0.0)] and threading.current_thread() is threading.main_thread()
