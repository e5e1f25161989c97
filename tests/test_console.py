"""What `train.py` prints: a header instead of the config dump, each log line once, an evaluation progress
callback, verifier failures counted, and the closing summary table."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECORDS, make_batch

from lightning_sd.console import summary_rows, summary_table
from lightning_sd.data.tasks.base import Verdict

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny", "trainer.max_steps=2", "data.n_train=8", "data.n_eval=4", "data.batch_size=2",
        "generation.max_new_tokens=6", "eval.max_new_tokens=6"]
PROGRESS_MARKS = ("━", "step ·", "it/s")  # rich progress-bar frames and their wrapped metric lines


def train_py(*args: str, run_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})})


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines a person reads (stdout and stderr), without progress-bar frames and their continuation lines."""
    lines, in_bar = [], False
    for line in (proc.stdout + proc.stderr).splitlines():
        if any(mark in line for mark in PROGRESS_MARKS):
            in_bar = True
            continue
        if in_bar and line.startswith(" "):
            continue
        in_bar = False
        if line.strip():
            lines.append(line.strip())
    return lines


def test_train_py_console_has_a_header_each_line_once_and_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_py(*FAST, run_dir=run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = console_lines(proc)
    repeated = {line: n for line, n in collections.Counter(lines).items() if n > 1}
    assert not repeated, repeated
    text = "\n".join(lines)
    assert "model    tiny" in text and "method   continual" in text and f"output   {run_dir}" in text
    assert "loss:\n" not in proc.stdout and "entry_clip_mode" not in proc.stdout  # no config dump by default
    assert "Tip:" not in text and "in eval mode" not in text and "LeafSpec" not in text
    for label in ("student accuracy", "teacher-with-context", "gap (teacher - student)", "steps", "tokens/s",
                  "peak memory", "run folder", "token views", "metrics"):
        assert any(line.startswith(label) for line in lines), label
    assert re.search(rf"^metrics +{re.escape(str(run_dir / 'metrics.json'))}$", text, re.M)
    assert re.search(r"^known_facts \(probe, never trained\) +\d\.\d{3} -> \d\.\d{3}$", text, re.M)
    assert (run_dir / ".hydra" / "config.yaml").read_text().count("entry_clip_mode") == 1  # the dump is kept there


def test_a_user_error_prints_its_message_alone_and_the_config_stays_in_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_py("model=tiny", "data=jsonl", "data.train_file=missing.jsonl", run_dir=run_dir)
    assert proc.returncode == 1
    assert "DataError: data.train_file='missing.jsonl': no such file" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "entry_clip_mode" not in proc.stdout  # no dump
    assert str(run_dir / ".hydra" / "config.yaml") in proc.stderr
    assert "entry_clip_mode" in (run_dir / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize("how", ["verbose=true", "HYDRA_FULL_ERROR=1"])
def test_a_user_error_shows_the_traceback_when_asked(tmp_path, how):
    args, env = (["verbose=true"], {}) if how == "verbose=true" else ([], {"HYDRA_FULL_ERROR": "1"})
    proc = train_py("model=tiny", "data=jsonl", "data.train_file=missing.jsonl", *args, run_dir=tmp_path / "run",
                    env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "no such file" in proc.stderr


def test_only_the_known_user_errors_print_their_message_alone():
    from train import is_user_error

    from lightning_sd.callbacks.checkpoint_io import CheckpointError
    from lightning_sd.config import ConfigError
    from lightning_sd.data.records import DataError
    from lightning_sd.models import ModelLoadError

    assert all(is_user_error(cls("x")) for cls in (ConfigError, DataError, ModelLoadError, CheckpointError))
    assert not any(is_user_error(err) for err in (RuntimeError("x"), ValueError("x"), KeyError("x")))


def test_evaluate_reports_progress_per_generation_and_counts_verifier_failures(tiny):
    from lightning_sd.evaluation import evaluate
    from lightning_sd.module import SelfDistillationModule
    from lightning_sd.sampling import SamplingConfig

    class Flaky:
        name = "flaky"

        def verify(self, record, completion):
            if record["id"] == "b":
                raise ValueError("cannot parse")
            return Verdict(reward=1.0)

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", task=Flaky(),
                                    eval_sampling=SamplingConfig(do_sample=False, max_new_tokens=3))
    calls = []
    batches = [make_batch(tok, [dict(r) for r in RECORDS[:2]]), make_batch(tok, [dict(r) for r in RECORDS[2:]])]
    result = evaluate(module, batches, progress=lambda prompts, tokens: calls.append((prompts, tokens)))
    assert [p for p, _ in calls] == [2, 2, 2, 2]  # student, then teacher, per batch
    assert sum(t for _, t in calls) == 2 * result.n * result.mean_completion_tokens
    assert result.verifier_failures == 2  # record "b": once for the student, once for the teacher
    assert result.student_accuracy == 0.75


def test_summary_rows_show_before_after_gap_and_where_things_are(tmp_path):
    metrics = {"eval_before": {"student_accuracy": 0.25, "teacher_accuracy": 0.75, "gap": 0.5},
               "eval_after": {"student_accuracy": 0.5, "teacher_accuracy": 0.75, "gap": 0.25, "verifier_failures": 3},
               "global_step": 7, "train_seconds": 12.0, "total_seconds": 20.0, "peak_memory_gib": (1.5, "RAM"),
               "train_metrics": {"train/gen_tokens_per_s": 100.0, "train/train_tokens_per_s": 50.0}}
    rows = dict(summary_rows(metrics, str(tmp_path)))
    assert rows["student accuracy"] == "0.250 -> 0.500"
    assert rows["gap (teacher - student)"] == "0.500 -> 0.250"
    assert rows["verifier failures"].startswith("3 ")
    assert rows["steps"] == "7" and rows["tokens/s"] == "100 generated, 50 trained"
    # the run means of the speeds win over the last step's values
    means = {**metrics, "train_diagnostics": {"gen_tokens_per_s": 80.0, "train_tokens_per_s": 30.0}}
    assert dict(summary_rows(means, str(tmp_path)))["tokens/s"] == "80 generated, 30 trained"
    assert rows["peak memory"] == "1.50 GiB (RAM)" and "token views" not in rows  # no token_views folder
    assert summary_table(metrics, str(tmp_path)).count("\n") == len(rows)


def test_eval_progress_draws_prompts_and_tokens_per_second_on_a_terminal_only(monkeypatch, capsys):
    from lightning_sd.console import eval_progress

    with eval_progress("eval before", 4) as advance:  # captured output is not a terminal: nothing drawn
        advance(2, 10)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    with eval_progress("eval before", 4) as advance:
        advance(2, 10)
        advance(2, 10)
    drawn = capsys.readouterr().out
    assert "eval before" in drawn and "4/4" in drawn and "tok/s" in drawn
    with eval_progress("eval before", 4, enabled=False) as advance:  # trainer.enable_progress_bar=false
        advance(4, 10)
    assert capsys.readouterr().out == ""
