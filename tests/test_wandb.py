"""W&B: an offline run through `train.py` writes the config, per-step metrics, the sample table, the token
views and the evaluation results into its run files; sweep files turn into plain `python train.py`
command lines with Hydra overrides. Also `run_train`, the in-process `train.py` the other test files use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEPS = ROOT / "sweeps"
TINY = ["model=tiny", "data.batch_size=2", "data.n_train=8", "data.n_eval=2", "data.eval_batch_size=2",
        "generation.max_new_tokens=6", "eval.max_new_tokens=6", "trainer.enable_progress_bar=false"]



def compose_config(overrides: list[str], with_hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=with_hydra)


def run_train(overrides: list[str], run_dir: Path) -> dict:
    """`python train.py <overrides> hydra.run.dir=<run_dir>`, in this process (no re-import: ~1 s for tiny)."""
    cfg = compose_config(overrides, with_hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    os.makedirs(run_dir, exist_ok=True)
    import train

    return train.main.__wrapped__(cfg)


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for key in ("WANDB_X_DISABLE_STATS", "WANDB_X_DISABLE_META", "WANDB_DISABLE_GIT", "WANDB_SILENT"):
        monkeypatch.setenv(key, "true")  # no system probing: the run starts in ~1 s instead of ~30 s
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield


def test_offline_wandb_run_has_config_metrics_samples_views_and_eval(tmp_path, wandb_offline):
    from lightning_sd.callbacks.samples import COLUMNS
    from lightning_sd.logging_utils import read_offline_run

    run_dir = tmp_path / "run"
    run_train(TINY + ["logger=wandb", "trainer.max_steps=4", "logger.log_samples_every=2",
                      "callbacks.token_view_every=2", "loss.beta=0.5",
                      "loss.lmbda=1"], run_dir)  # every step samples, so every row has the rollout metrics
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    run = read_offline_run(offline)

    assert run["config"]["loss"]["beta"] == 0.5 and run["config"]["model"]["name"] == "tiny"  # the whole config
    steps = [h["trainer/global_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [0, 1, 2, 3]  # one row of metrics per optimizer step
    row = next(h for h in run["history"] if "train/loss" in h)
    assert {"train/divergence", "train/reward", "train/gen_tokens_per_s"} <= set(row)
    for tag in ("before", "after"):
        assert 0.0 <= run["summary"][f"eval/{tag}/student_accuracy"] <= 1.0
        assert f"eval/{tag}/teacher_accuracy" in run["summary"]

    tables = [json.loads(p.read_text()) for p in offline.glob("files/media/table/samples_*.table.json")]
    assert sorted(t["data"][0][0] for t in tables) == [0, 2]  # logged at steps 0 and 2
    for table in tables:
        assert table["columns"] == COLUMNS and len(table["data"]) == 2  # 2 prompts x 1 sample
        step, record_id, prompt, completion, reward, mean_div, tokens = table["data"][0]
        assert prompt and isinstance(completion, str) and reward in (0.0, 1.0) and tokens >= 1
        assert mean_div is not None and mean_div >= 0.0
    assert list(offline.glob("files/media/table/eval/after/samples_*.table.json"))  # eval samples
    views = list(offline.glob("files/media/html/token_view_*.html"))
    assert len(views) == 2 and "data-value" in views[0].read_text()
    assert (run_dir / "token_views" / "step_000002.html").exists()
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 4  # the same rows, locally
    assert (run_dir / "wandb_run_id").read_text().strip() == offline.name.rsplit("-", 1)[-1]  # for a resume


def test_wandb_run_id_is_kept_per_run_folder_and_follows_the_sweep_agent(tmp_path, monkeypatch):
    from lightning_sd.logging_utils import wandb_run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(tmp_path / "a")
    assert first and wandb_run_id(tmp_path / "a") == first  # a resumed folder logs to the same run
    monkeypatch.setenv("WANDB_RUN_ID", "sweeptrial1")
    assert wandb_run_id(tmp_path / "b") == "sweeptrial1"  # a sweep trial logs to the run the agent created
    assert wandb_run_id(tmp_path / "a") == first


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command line `wandb agent` runs for one trial (mirrors `wandb_agent.Agent._command_run`: the
    sweep's `command` with `${env}`, `${program}`, `${args_no_hyphens}` macros filled in)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    out: list[str] = []
    for chunk in map(str, command):
        out += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return out


def trials(parameters: dict) -> list[dict]:
    """Every value of every parameter once (the others at their first value); min and max of distributions."""
    options = {name: spec["values"] if "values" in spec else [spec["value"]] if "value" in spec
               else [spec["min"], spec["max"]] for name, spec in parameters.items()}
    first = {name: values[0] for name, values in options.items()}
    return [{**first, name: value} for name, values in options.items() for value in values]


SWEEP_FILES = sorted(p.name for p in SWEEPS.glob("*.yaml"))


def test_the_sweep_files_are_found():
    assert SWEEP_FILES, f"no W&B sweep file in {SWEEPS}"


@pytest.mark.parametrize("sweep_file", SWEEP_FILES)
def test_sweep_trial_command_is_plain_train_py_with_hydra_overrides(sweep_file, monkeypatch):
    from lightning_sd.config import validate_config

    sweep = yaml.safe_load((SWEEPS / sweep_file).read_text())
    assert sweep["program"] == "train.py" and sweep["metric"]["name"] == "eval/after/student_accuracy"
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    for params in trials(sweep["parameters"]):
        cmd = agent_command(sweep, params)
        assert cmd[:3] == ["/usr/bin/env", "python", "train.py"]
        overrides = cmd[3:]
        for name, value in params.items():
            assert f"{name}={value}" in overrides  # ${args_no_hyphens}: key=value, no leading dashes
        assert not any(o.startswith("-") for o in overrides)
        cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
        typed = validate_config(cfg)  # the trial's config is valid: it would start
        assert typed["logger"].name == "wandb"
        for name, value in params.items():  # each swept value reached the config (a group choice picks its file)
            got = cfg.teacher.kind if name == "teacher" else OmegaConf.select(cfg, name)
            assert got == value, name
    hydra_cfg = compose_config(overrides, with_hydra=True)  # one folder per trial, from the agent's ids
    assert OmegaConf.to_container(hydra_cfg.hydra.run, resolve=True)["dir"] == "outputs/sweeps/sw1/r1"
