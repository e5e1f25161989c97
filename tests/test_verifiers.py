"""`data.verifier`: each built-in verifier against hand-written cases, user functions, failures counted with the
row id, and the config paths that use a verifier (JSONL data, RL methods)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.base import safe_verify
from lightning_sd.data.verifiers import build_verifier, check_answers, picked_choice, reference_answer


def score(name: str, answer, completion: str, pattern: str | None = None) -> float:
    record = {"id": "r1", "prompt": "p"} if answer is None else {"id": "r1", "prompt": "p", "answer": answer}
    return build_verifier(name, pattern).verify(record, completion).reward


@pytest.mark.parametrize("answer,completion", [
    ("1/2", "The answer is 0.5"),
    ("0.5", "so we get $\\frac{1}{2}$"),
    ("\\frac{1}{2}", "Half of it: 1/2"),
    ("72", "She sold 48 + 24 = 72 clips. The answer is 72."),
    ("1,000", "The final answer is \\boxed{1000}"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "Altogether 72 clips."),  # GSM8K: after ####
    ("\\sqrt{2}/2", "$\\frac{\\sqrt{2}}{2}$"),
    (3, "It is 3."),
])
def test_math_accepts_equal_answers_written_differently(answer, completion):
    assert score("math", answer, completion) == 1.0


@pytest.mark.parametrize("answer,completion", [
    ("1/2", "The answer is 0.25"),
    ("72", "The answer is 27."),
    ("#### 18", "The answer is 81."),
    ("5", "I do not know."),
])
def test_math_rejects_different_answers(answer, completion):
    assert score("math", answer, completion) == 0.0


def test_reference_answer_takes_the_text_after_the_last_marks_and_requires_an_answer():
    assert reference_answer({"answer": "3 + 4 = 7\n#### 7"}) == "7"
    assert reference_answer({"answer": 12}) == "12"
    with pytest.raises(DataError, match="'r9' has no 'answer'"):
        reference_answer({"id": "r9", "prompt": "p"})


@pytest.mark.parametrize("name,answer,completion,expected", [
    ("exact", "Paris", "  Paris\n", 1.0),
    ("exact", "Paris", "paris", 0.0),
    ("exact", "Paris", "Paris.", 0.0),
    ("normalized", "Paris", "paris.", 1.0),
    ("normalized", "New York", "  new   YORK! ", 1.0),
    ("normalized", "Paris", "It is Paris.", 0.0),
    ("contains", "Paris", "The capital of France is Paris.", 1.0),
    ("contains", "New York", "I'd say new york, of course", 1.0),
    ("contains", "5", "There are 15 apples.", 0.0),  # whole words only
    ("contains", "Paris", "Lyon", 0.0),
])
def test_string_verifiers(name, answer, completion, expected):
    assert score(name, answer, completion) == expected


@pytest.mark.parametrize("completion,letter", [
    ("The answer is (B).", "B"), ("Answer: C", "C"), ("I think (D) fits best.", "D"), ("E) the last one", "E"),
    ("A", "A"), ("  b  ", None), ("A cat sat on the mat.", None), ("Between (A) and (C), the answer is C", "C"),
])
def test_choice_picks_the_option_letter(completion, letter):
    assert picked_choice(completion) == letter


def test_choice_verifier_and_its_bad_answer():
    assert score("choice", "B", "The answer is (B)") == 1.0
    assert score("choice", "(c)", "Answer: C") == 1.0
    assert score("choice", "B", "The answer is (A)") == 0.0
    with pytest.raises(DataError, match="needs an answer A-E, got 'F'"):
        score("choice", "F", "The answer is F")


def test_regex_compares_its_group_with_the_answer_or_just_matches():
    pattern = r"ANSWER:\s*(\w+)"
    assert score("regex", "42", "work... ANSWER: 41 no wait ANSWER: 42", pattern) == 1.0
    assert score("regex", "42", "ANSWER: 41", pattern) == 0.0
    assert score("regex", "42", "no marker at all", pattern) == 0.0
    assert score("regex", None, '{"name": "x"}', r"^\{.*\}$") == 1.0  # no answer: a match is a success
    assert score("regex", None, "plain text", r"^\{.*\}$") == 0.0
    with pytest.raises(DataError, match="data.verifier=regex needs data.verifier_pattern"):
        build_verifier("regex")
    with pytest.raises(DataError, match="data.verifier_pattern='\\(' is not a valid regular expression"):
        build_verifier("regex", "(")


def test_none_and_unknown_names():
    assert build_verifier("none") is None and build_verifier(None) is None
    with pytest.raises(DataError, match="data.verifier='mathh' is not one of"):
        build_verifier("mathh")


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("my_checks")

    def length_reward(record, completion, limit=10):
        return min(len(completion), limit) / limit

    def with_feedback(record, completion):
        return (1.0, None) if "yes" in completion else (0.0, "say yes")

    def out_of_range(record, completion):
        return 2.0

    module.length_reward, module.with_feedback, module.out_of_range = length_reward, with_feedback, out_of_range
    monkeypatch.setitem(sys.modules, "my_checks", module)
    return module


def test_a_user_function_gets_its_options_and_may_return_feedback(user_module):
    v = build_verifier({"_target_": "my_checks.length_reward", "limit": 4})
    assert v.verify({"prompt": "p"}, "ab").reward == 0.5
    verdict = build_verifier({"_target_": "my_checks.with_feedback"}).verify({"prompt": "p"}, "no")
    assert (verdict.reward, verdict.feedback) == (0.0, "say yes")
    with pytest.raises(DataError, match="cannot import it"):
        build_verifier({"_target_": "my_checks.missing"})


def test_a_verifier_that_raises_or_returns_nonsense_is_reported_with_the_row_id(user_module, caplog):
    bad = build_verifier({"_target_": "my_checks.out_of_range"})
    with caplog.at_level(logging.WARNING):
        assert safe_verify(bad, {"id": "row-7", "prompt": "p"}, "x") is None
    assert "row-7" in caplog.text and "reward in [0, 1]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert safe_verify(build_verifier("exact"), {"id": "row-8", "prompt": "p"}, "x") is None  # no answer
    assert "row-8" in caplog.text


def test_a_verifier_that_hangs_times_out_and_is_reported(user_module, caplog):
    import time

    user_module.slow = lambda record, completion: time.sleep(5) or 1.0
    with caplog.at_level(logging.WARNING):
        assert safe_verify(build_verifier({"_target_": "my_checks.slow"}), {"id": "row-9"}, "x", timeout_s=0.2) is None
    assert "timed out" in caplog.text and "row-9" in caplog.text


def test_check_answers_names_the_row_without_an_answer():
    records = [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q"}]
    with pytest.raises(DataError, match="train.jsonl row 1 \\(id 'b'\\) has no 'answer'.*data.verifier=math"):
        check_answers(records, build_verifier("math"), "train.jsonl")
    check_answers(records, build_verifier("regex", "x"), "train.jsonl")  # regex needs none


def test_jsonl_data_with_a_verifier_gives_rl_methods_their_rewards(tmp_path):
    from test_config import TINY, compose_cfg

    from lightning_sd.build import build_verifier_for
    from lightning_sd.config import ConfigError, validate_config

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "2+2?", "solution": "4", "answer": "4"}\n')
    base = TINY + ["data=jsonl", f"data.train_file={path}", "loss=grpo", "generation.n=2"]
    with pytest.raises(ConfigError, match="learns from verifier rewards.*data.verifier"):
        validate_config(compose_cfg(base))
    d = validate_config(compose_cfg(base + ["data.verifier=normalized"]))["data"]
    verifier = build_verifier_for(d, None)
    assert verifier.verify({"prompt": "2+2?", "answer": "4"}, " 4. ").reward == 1.0
    with pytest.raises(ConfigError, match="data.verifier='nope' is not one of"):
        validate_config(compose_cfg(base + ["data.verifier=nope"]))
    with pytest.raises(ConfigError, match="learns from verifier rewards"):
        validate_config(compose_cfg(TINY + ["loss=grpo", "generation.n=2", "data.verifier=none"]))


def test_a_built_in_task_keeps_its_verifier_unless_data_verifier_is_set():
    from test_config import TINY, compose_cfg

    from lightning_sd.build import build_verifier_for
    from lightning_sd.config import validate_config
    from lightning_sd.data.tasks import get_task

    task = get_task("arithmetic")
    d = validate_config(compose_cfg(TINY))["data"]
    assert build_verifier_for(d, task) is task
    d = validate_config(compose_cfg(TINY + ["data.verifier=contains"]))["data"]
    assert build_verifier_for(d, task).name == "contains"


def test_datasets_and_math_verify_are_imported_only_where_used():
    import subprocess

    code = ("import sys, lightning_sd, lightning_sd.build, lightning_sd.data.verifiers, lightning_sd.data.hf; "
            "from lightning_sd.data.verifiers import build_verifier; build_verifier('normalized'); "
            "print('datasets' in sys.modules, 'math_verify' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


@pytest.mark.parametrize("loss", ["grpo", "rl_feedback"])
def test_rl_methods_train_on_jsonl_data_with_rewards_from_data_verifier(loss, user_module, tmp_path):
    from lightning.pytorch import Trainer
    from test_config import ROOT, TINY, compose_cfg

    from lightning_sd.build import build_run

    user_module.always = lambda record, completion: (1.0, "fine")  # a random tiny model is never right otherwise
    cfg = compose_cfg([o for o in TINY if not o.startswith("data.n_")] + [
        "data=jsonl", f"data.train_file={ROOT / 'examples' / 'data' / 'capitals_train.jsonl'}", f"loss={loss}",
        "generation.n=2", "trainer.max_steps=1", "+data.verifier._target_=my_checks.always",
        "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", "logger=none"])
    run = build_run(cfg, run_dir=str(tmp_path))
    trainer = Trainer(**run.trainer_kwargs, callbacks=run.callbacks, logger=False, enable_model_summary=False)
    trainer.fit(run.module, datamodule=run.datamodule)
    assert float(trainer.callback_metrics["train/reward"]) == 1.0  # the user function scored every rollout
