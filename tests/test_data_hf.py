"""`data=hf`: records from the `datasets` library (folders, data files, split slices), the field mapping,
chat `messages` rows, the row formatter, the errors, and the "Your own data" commands of docs/quickstart.md
run as subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lightning_sd.data.hf import from_messages, load_hf_records
from lightning_sd.data.records import DataError
from lightning_sd.data.verifiers import build_verifier

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "data"
GSM8K = {"prompt": "question", "solution": "answer", "answer": "answer"}
MESSAGES = {"prompt": "messages", "answer": "answer"}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of these tests out of the home folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_the_gsm8k_style_sample_loads_with_its_splits_and_each_solution_verifies():
    train, evals = load_hf_records(str(SAMPLES / "gsm8k_style"), "train", "test", fields=GSM8K)
    assert (len(train), len(evals)) == (24, 8)
    assert set(train[0]) == {"prompt", "solution", "answer", "id"} and "####" in train[0]["answer"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    math = build_verifier("math")
    for rec in train + evals:  # the reference reasoning itself is a correct completion
        assert math.verify(rec, rec["solution"].split("####")[0]).reward == 1.0, rec
        assert math.verify(rec, "The answer is 100000.").reward == 0.0


def test_the_messages_sample_gives_system_prompt_and_solution():
    train, evals = load_hf_records(str(SAMPLES / "chat_messages"), "train", "test", fields=MESSAGES)
    rec = evals[0]
    assert rec["system"].startswith("You are a careful math tutor")
    assert rec["prompt"].endswith("?") and "The answer is" in rec["solution"]
    assert build_verifier("math").verify(rec, rec["solution"]).reward == 1.0


def test_from_messages_keeps_earlier_turns_and_rejects_rows_without_a_user():
    out = from_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "2+2?"}], "row 0")
    assert out == {"prompt": "User: hi\n\nAssistant: hello\n\nUser: 2+2?"}
    with pytest.raises(DataError, match="row 3: the messages list has no user message"):
        from_messages([{"role": "system", "content": "x"}], "row 3")
    with pytest.raises(DataError, match="row 4: the prompt column holds str"):
        from_messages("text", "row 4")


def test_a_data_file_is_one_train_split_that_slices_and_csv_parquet_work(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(10)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"prompt": "q", "answer": "a"}
    train, evals = load_hf_records(str(path), "train[:8]", "train[8:]", fields=fields)
    assert [r["answer"] for r in evals] == ["9", "10"] and len(train) == 8
    csv = tmp_path / "rows.csv"
    csv.write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in rows))
    assert load_hf_records(str(csv), fields=fields)[0][3]["prompt"] == "What is 3 + 1?"
    import datasets

    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert len(load_hf_records(str(parquet), fields=fields)[0]) == 10


def test_a_missing_column_or_split_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape("data.fields.prompt='prompt' is not a column of the dataset; its "
                                                  "columns are ['question', 'answer']")):
        load_hf_records(str(SAMPLES / "gsm8k_style"), fields={"prompt": "prompt", "answer": "answer"})
    with pytest.raises(DataError, match="data.eval_split='validation'"):
        load_hf_records(str(SAMPLES / "gsm8k_style"), "train", "validation", fields=GSM8K)
    with pytest.raises(DataError, match="no such file or folder"):
        load_hf_records("./not/here", fields=GSM8K)
    bad = tmp_path / "rows.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="a .txt file"):
        load_hf_records(str(bad), fields=GSM8K)


def test_the_row_formatter_builds_records_a_mapping_cannot(monkeypatch):
    module = types.ModuleType("my_rows")
    module.to_record = lambda row, tag="": {"prompt": f"{tag}{row['question']}", "answer": row["answer"]}
    module.broken = lambda row: "not a dict"
    monkeypatch.setitem(sys.modules, "my_rows", module)
    train, _ = load_hf_records(str(SAMPLES / "gsm8k_style"), formatter={"_target_": "my_rows.to_record", "tag": "Q: "})
    assert train[0]["prompt"].startswith("Q: ") and train[0]["id"].endswith(":0")
    with pytest.raises(DataError, match="row 0: data.format returned str"):
        load_hf_records(str(SAMPLES / "gsm8k_style"), formatter={"_target_": "my_rows.broken"})


def test_config_errors_of_data_hf():
    from test_config import compose_cfg

    from lightning_sd.config import ConfigError, validate_config

    base = ["model=tiny", "data=hf", f"data.path={SAMPLES / 'gsm8k_style'}"]
    validate_config(compose_cfg(base))
    with pytest.raises(ConfigError, match="data.fields: unknown key"):
        validate_config(compose_cfg(base + ["+data.fields.promt=question"]))
    with pytest.raises(ConfigError, match="data.path"):
        validate_config(compose_cfg(["model=tiny", "data=hf"]))
    with pytest.raises(ConfigError, match="exactly one of data.task, data.train_file or data.path"):
        validate_config(compose_cfg(base + ["data.task=arithmetic"]))


FAST = ["model=tiny", "trainer.max_steps=2", "data.batch_size=2", "generation.max_new_tokens=6",
        "eval.max_new_tokens=6"]


def quickstart_commands() -> list[list[str]]:
    """The `python train.py ...` commands of the "Your own data" section of docs/quickstart.md."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return [line.split()[2:] for line in section.splitlines() if line.startswith("python train.py ")]


def test_the_quickstart_has_the_three_commands():
    commands = quickstart_commands()
    assert [c[0] for c in commands] == ["data=hf", "data=hf", "data=jsonl"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_your_own_data_commands_report_accuracy_before_and_after(index, tmp_path):
    args = quickstart_commands()[index]
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "train.py", *args, *FAST, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for tag in ("before", "after"):
        assert f"[eval {tag}] student accuracy" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for tag in ("eval_before", "eval_after"):
        result = metrics[tag]
        assert result["n"] > 0 and result["teacher_accuracy"] is not None and result["gap"] is not None
        assert result["verifier_failures"] == 0
    assert "gap (teacher - student)" in proc.stdout
