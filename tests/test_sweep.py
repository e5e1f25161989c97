"""Recipe searches (`conf/hparams_search/`, Hydra's Optuna sweeper): a real 2-trial search on the tiny model
records each trial's objective and the sweeper's best parameters; a search is refused on the held-out test
split, before its first trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lightning_sd.config import ConfigError, validate_config

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs hydra-optuna-sweeper (pip install -e '.[sweep]')")

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))
# one optimizer step on 4 prompts, 2 rollouts of 4 tokens, 2 validation prompts, no evaluation before
TINY = ["model=tiny", "trainer.max_steps=1", "data.n_train=4", "data.n_eval=2", "data.batch_size=2",
        "generation.n=2", "generation.max_new_tokens=4", "eval.max_new_tokens=4", "eval.teacher=false",
        "eval.before=false", "trainer.enable_progress_bar=false"]


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_a_two_trial_optuna_search_records_every_trial_and_the_best_params(tmp_path):
    sweep_dir = tmp_path / "search"
    proc = run_train(["-m", "hparams_search=rl_feedback_json", "hydra.sweeper.n_trials=2",
                      f"hydra.sweep.dir={sweep_dir}", *TINY])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    searched = {"optimizer.lr", "loss.beta", "loss.top_k", "loss.grpo_mix", "teacher.rate"}
    for trial in ("0", "1"):
        record = json.loads((sweep_dir / trial / "metrics.json").read_text())
        objective = record["objective"]
        assert objective["metric"] == "eval_after.student_accuracy"
        assert objective["value"] == record["eval_after"]["student_accuracy"]
        assert 0.0 <= objective["value"] <= 1.0
        assert record["config"]["data"]["eval_split"] == "val" and record["eval_after"]["n"] == 2
        assert record["seed"] == 0 and record["hparams_search"] == "rl_feedback_json"
        assert record["job_num"] == int(trial) and "git_commit" in record
        assert {o.split("=")[0] for o in record["overrides"]} >= searched | {"model"}
        assert [h["step"] for h in record["history"]] == [0] and "reward" in record["history"][0]
        assert "truncated" in record["train_diagnostics"]
        assert record["machine"]["cpu_count"] and record["started"] <= record["finished"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results["best_params"]) == searched
    assert 0.0 <= results["best_value"] <= 1.0
    # docs' table of the search (experiments/report.py): one row per trial, the best objective in bold
    import report

    text = report.sweep_table("search", sweep_dir)
    rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and f"**{results['best_value']:.3f}**" in text
    assert "2 of 2 trials, one at a time" in text and "data.eval_split=val (2 prompts)" in text


def test_a_search_on_the_test_split_is_refused_before_its_first_trial(tmp_path):
    sweep_dir = tmp_path / "search"
    proc = run_train(["-m", "hparams_search=rl_feedback_json", "data.eval_split=eval", "loss.beta=choice(0.5,1.0)",
                      f"hydra.sweep.dir={sweep_dir}", *TINY])
    assert proc.returncode == 1
    assert "ConfigError: optimized_metric=eval_after.student_accuracy" in proc.stderr
    assert "data.eval_split=eval" in proc.stderr and "set data.eval_split=val" in proc.stderr
    assert not sweep_dir.exists()  # no trial ran


def test_the_split_rule_holds_inside_the_run_too():
    """`validate_config` (which every run calls) applies the rule, for a task and for a Hugging Face dataset."""
    with pytest.raises(ConfigError, match=r"data.eval_split=eval .*set data.eval_split=val"):
        validate_config(compose_cfg([*TINY, "optimized_metric=eval_after.student_accuracy"]))
    hf = ["data=hf", f"data.path={ROOT / 'examples' / 'data' / 'gsm8k_style'}", "model=tiny"]
    with pytest.raises(ConfigError, match=r"data.eval_split=test"):
        validate_config(compose_cfg([*hf, "optimized_metric=eval_after.student_accuracy"]))
    with pytest.raises(ConfigError, match=r"needs eval.after=true"):
        validate_config(compose_cfg([*TINY, "data.eval_split=val", "eval.after=false",
                                     "optimized_metric=eval_after.student_accuracy"]))
    validate_config(compose_cfg([*TINY, "data.eval_split=val", "optimized_metric=eval_after.student_accuracy"]))
    validate_config(compose_cfg(TINY))  # no search: the test split is the default


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_scores_on_the_validation_split_and_names_its_metric(search):
    cfg = compose_cfg([f"hparams_search={search}", "model=tiny"])
    assert cfg.optimized_metric and cfg.data.eval_split == "val"
    validate_config(cfg)


def test_a_search_without_optimized_metric_is_refused(tmp_path):
    proc = run_train(["-m", "hparams_search=rl_feedback_json", "optimized_metric=null",
                      f"hydra.sweep.dir={tmp_path / 'search'}", *TINY])
    assert proc.returncode == 1 and "a search needs optimized_metric" in proc.stderr


def test_the_half_samples_search_returns_the_sampled_accuracy_after_96_samples(tmp_path):
    sweep_dir = tmp_path / "search"
    proc = run_train(["-m", "hparams_search=rl_feedback_half_samples", "hydra.sweeper.n_trials=1",
                      f"hydra.sweep.dir={sweep_dir}", *TINY])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    sampled = record["eval_after"]["sampled"]
    assert record["objective"] == {"metric": "eval_after.sampled.student_accuracy",
                                   "value": sampled["student_accuracy"]}
    assert sampled["n"] == 2 * 2 and sampled["samples_per_prompt"] == 2 and sampled["temperature"] == 1.0
    assert "student sampled accuracy" in proc.stdout
    cfg = compose_cfg(["hparams_search=rl_feedback_half_samples"])
    assert cfg.trainer.max_steps * cfg.data.batch_size * cfg.generation.n == 96  # half of rl_feedback_rich's 192


def test_the_sampled_evaluation_is_checked_at_start_up():
    base = [*TINY, "data.eval_split=val"]
    with pytest.raises(ConfigError, match=r"set eval.samples"):
        validate_config(compose_cfg([*base, "optimized_metric=eval_after.sampled.student_accuracy"]))
    with pytest.raises(ConfigError, match=r"eval.samples must be an integer >= 0"):
        validate_config(compose_cfg([*base, "eval.samples=-1"]))
    with pytest.raises(ConfigError, match=r"eval.temperature must be > 0"):
        validate_config(compose_cfg([*base, "eval.samples=2", "eval.temperature=0"]))
    validate_config(compose_cfg([*base, "eval.samples=2", "optimized_metric=eval_after.sampled.student_accuracy"]))
