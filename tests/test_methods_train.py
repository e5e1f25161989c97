"""The method variants from the command line: every `loss=<variant>` trains with `python train.py`, every
loss key can be overridden or swept on every variant, and the experiment presets pick each method's teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_sd.config import ConfigError, group_defaults, validate_config
from lightning_sd.methods import method_class
from lightning_sd.objectives import DISTILLATION_NAMES, LossConfig

ROOT = Path(__file__).resolve().parents[1]
LOSSES = sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml") if not p.stem.startswith("_"))
SMALL = ["model=tiny", "trainer.max_steps=2", "data.n_train=4", "data.n_eval=2", "data.batch_size=2",
         "data.eval_batch_size=4", "generation.max_new_tokens=6", "eval.max_new_tokens=6", "eval.before=false",
         "logger=none", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def train(tmp_path: Path, *args: str) -> list[dict]:
    """`python train.py -m ...` in a fresh process (one thread: the machine is shared); the jobs' metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "-m", *args, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [json.loads((job / "metrics.json").read_text()) | {"dir": str(job)} for job in jobs]


# ------------------------------------------------------------------------------------------------ train.py

def test_every_loss_variant_trains_from_the_command_line(tmp_path):
    names = [n for n in LOSSES if n != "on_policy_kd"]  # on_policy_kd needs an external teacher: next test
    jobs = train(tmp_path, f"loss={','.join(names)}", *SMALL, "data=json_format", "generation.n=2")
    assert [j["config"]["loss"]["name"] for j in jobs] == names
    for job in jobs:
        assert job["train_metrics"]["train/loss"] == job["train_metrics"]["train/loss"], job["config"]["loss"]  # finite
        assert job["eval_after"]["n"] == 2


def test_continual_sequence_and_on_policy_kd_presets_with_a_sweep_over_lmbda(tmp_path):
    """Two presets x `loss.lmbda=0,1` in one process: the continual sequence writes its accuracy matrix; with
    lmbda=0 every batch trains on dataset completions, with lmbda=1 on samples (on_policy_kd_tiny's external
    teacher is a second tiny model)."""
    jobs = train(tmp_path, "experiment=continual_tiny,on_policy_kd_tiny", "loss.lmbda=0,1", "trainer.max_steps=2",
                 "eval.before=false", "eval.after=false", "logger=csv", "trainer.enable_checkpointing=false")
    by = {(j["config"]["loss"]["name"], j["config"]["loss"]["lmbda"]): j for j in jobs}
    assert sorted(by) == [("continual", 0), ("continual", 1), ("on_policy_kd", 0), ("on_policy_kd", 1)]
    for lmbda in (0, 1):
        kd, job = by[("on_policy_kd", lmbda)], by[("continual", lmbda)]
        assert kd["config"]["teacher"]["kind"] == "external"
        assert ("train/gen_tokens_per_s" in kd["train_metrics"]) == (lmbda == 1)  # sampled only when lmbda=1
        assert ("train/truncated" in kd["train_metrics"]) == (lmbda == 1)  # a demonstration is never counted as cut
        if lmbda == 0:
            assert kd["train_metrics"]["train/on_policy"] == 0.0
        assert job["config"]["teacher"] == {"kind": "ema", "rate": 0.01, "mix": None, "model": None}
        result = json.loads((Path(job["dir"]) / "continual.json").read_text())
        assert result["tasks"] == ["facts_a", "facts_b"] and result["probes"] == ["known_facts"]
        assert len(result["matrix"]) == 2 and result["matrix"][0][1] is None and None not in result["matrix"][1]
        assert (Path(job["dir"]) / "continual.png").exists()
        assert "continual/bwt" in job["train_metrics"]


# ------------------------------------------------------------------------------------- overrides and presets

def override_values(name: str) -> dict:
    """A valid non-default value for every loss key the method reads: `LossConfig`'s own and its `Options`."""
    own = {f.name for f in fields(method_class(name).Options)}
    values = {"beta": 0.5, "support": "topk", "top_k": 7, "topk_from": "teacher", "tail": False, "temperature": 0.9,
              "entry_clip": 0.2, "entry_clip_mode": "value", "skip_first": 1, "reduction": "sum", "is_clip": 3.0,
              "chunk_size": 16, "nonfinite": "stop", "nonfinite_limit": 3,
              "template": "answer_hint", "feedback": False, "strip_reasoning": False}
    if "grpo_mix" in own:
        values["grpo_mix"] = 1.0 if name == "grpo" else 0.5
    if "lmbda" in own:  # contrast does not combine with chunk_size: overridden on its own below
        values.update(lmbda=0.5, reason_first=True, reason_max_new_tokens=9)
    return values


@pytest.mark.parametrize("name", DISTILLATION_NAMES)
def test_contrast_can_be_overridden_on_every_distillation_variant(name):
    teacher = ["teacher.model.name_or_path=/some/folder"] if name == "on_policy_kd" else []
    typed = validate_config(composed(f"loss={name}", "data=arithmetic", *teacher, "loss.contrast=1.5",
                                     "loss.template=answer_hint"))
    assert typed["loss"].options.contrast == 1.5


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_key_can_be_overridden_on_every_variant(name):
    """Each of the method's keys (shared or its own) takes a new value; every other key of the loss group
    belongs to another method, and setting it is refused with a message naming the methods that read it."""
    values = override_values(name)
    own = {f.name for f in fields(method_class(name).Options)} | set(LossConfig.keys())
    assert set(values) | {"name"} == own - ({"contrast"} if "contrast" in own else set())  # a new key: add it here
    overrides = [f"loss.{k}={v}" for k, v in values.items()]
    teacher = ["teacher.model.name_or_path=/some/folder"] if name == "on_policy_kd" else []
    typed = validate_config(composed(f"loss={name}", "data=arithmetic", "generation.n=2", *teacher, *overrides))
    loss = typed["loss"]
    assert loss.name == name
    for key, value in values.items():
        assert getattr(loss.options if key not in LossConfig.keys() else loss, key) == value, key
    for key in sorted(set(group_defaults("loss")) - own):
        other = {"lmbda": 0.5, "contrast": 1.0, "reason_first": True, "reason_max_new_tokens": 9, "grpo_mix": 0.5}[key]
        with pytest.raises(ConfigError, match=rf"loss.{key}=.* is an option of loss=.*not of loss={name}"):
            validate_config(composed(f"loss={name}", "data=arithmetic", "generation.n=2", *teacher,
                                     f"loss.{key}={other}"))


def test_a_bad_loss_override_names_the_key():
    with pytest.raises(ConfigError, match="loss.beta"):
        validate_config(composed("loss=on_policy_kd", "loss.beta=0.5",  # sampled support is reverse KL only
                                 "teacher.model.name_or_path=/some/folder"))
    with pytest.raises(ConfigError, match="bta"):
        validate_config(composed("loss=continual", "+loss.bta=0.5"))


PRESET_TEACHERS = {"self_critique": ("frozen", None), "continual": ("ema", 0.01), "rl_feedback": ("ema", 0.05),
                   "rl_feedback_rich": ("ema", 0.01), "sft": ("live", None), "grpo": ("live", None)}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_presets_pick_each_methods_teacher_and_validate(preset):
    cfg = composed(f"experiment={preset}")
    method = preset.removesuffix("_tiny")
    assert cfg.loss.name == ("rl_feedback" if method == "rl_feedback_rich" else method)
    if preset.endswith("_tiny"):
        assert cfg.model.name == "tiny"
    if method == "on_policy_kd":
        assert cfg.teacher.kind == "external"
        if preset == "on_policy_kd":  # the user names the teacher folder
            with pytest.raises(ConfigError, match="name_or_path"):
                validate_config(cfg)
            return
    else:
        assert (cfg.teacher.kind, cfg.teacher.rate) == PRESET_TEACHERS[method]
    typed = validate_config(cfg)
    assert typed["loss"].name == cfg.loss.name
    # the user's teacher choice wins over the preset's
    assert composed(f"experiment={preset}", "teacher=trust_region").teacher.kind == "trust_region"
