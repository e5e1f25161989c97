"""Bad input, clear errors, nothing lost: one test per item of the issue. Each asserts that the message names
the offending field, file and line, or option, and that training stops at start-up or goes on, as the item
says. `run_train` is `python train.py ...` in this process."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from test_wandb import TINY, compose_config, run_train

from lightning_sd.callbacks.counters import FailureCounters
from lightning_sd.config import ConfigError, validate_config
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.base import Task, Verdict
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.module import SelfDistillationModule
from lightning_sd.sampling import SamplingConfig

QUICK = TINY + ["trainer.max_steps=2", "eval.before=false", "eval.after=false", "trainer.enable_checkpointing=false",
                "callbacks.token_view_every=null"]



def jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


GOOD = {"prompt": "What is 2 + 3?", "solution": "2 + 3 = 5. The answer is 5.", "answer": "5"}


def file_run(tmp_path: Path, lines: list, *extra: str) -> dict:
    path = jsonl(tmp_path / "train.jsonl", lines)
    return run_train(QUICK + ["data=jsonl", f"data.train_file={path}", "data.n_train=null", *extra],
                     tmp_path / "run")


# ------------------------------------------------------------------------------------- records and files

def test_missing_prompt_names_file_line_and_field(tmp_path):
    with pytest.raises(DataError) as err:
        file_run(tmp_path, [GOOD, {"solution": "x", "answer": "1"}, GOOD])
    assert f"{tmp_path / 'train.jsonl'}:2" in str(err.value) and "'prompt'" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


@pytest.mark.parametrize("loss,field", [("self_critique", "solution"), ("continual", "solution")],
                         ids=["reference-solution", "demonstration"])
def test_missing_or_empty_privileged_field_named_at_start_up(tmp_path, loss, field):
    """The reference solution (self-critique) and the demonstration (continual) both live in `solution`."""
    with pytest.raises(DataError) as err:
        file_run(tmp_path, [GOOD, GOOD, {**GOOD, field: "  "}], f"loss={loss}")
    msg = str(err.value)
    assert "train.jsonl:3" in msg and f"field {field!r} is empty" in msg and "loss.template=" in msg
    no_field = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(DataError, match=rf"train\.jsonl:2 .*field '{field}' is missing"):
        file_run(tmp_path, [GOOD, no_field], f"loss={loss}")


def test_non_utf8_and_blank_lines_name_file_and_line(tmp_path):
    with pytest.raises(DataError) as err:
        file_run(tmp_path, [GOOD, b'{"prompt": "caf\xe9"}'])
    assert f"{tmp_path / 'train.jsonl'}:2: not valid UTF-8" in str(err.value)
    with pytest.raises(DataError) as err:
        file_run(tmp_path, [GOOD, b"", GOOD])
    assert f"{tmp_path / 'train.jsonl'}:2: blank line" in str(err.value)


def test_prompt_longer_than_max_prompt_length_errors_or_truncates_with_a_count(tmp_path):
    long = {**GOOD, "prompt": "Please add these numbers carefully. " * 8 + "What is 2 + 3?"}
    with pytest.raises(DataError) as err:
        file_run(tmp_path, [GOOD, long, GOOD, long], "data.max_prompt_length=60", "data.truncation=error")
    assert "row 1" in str(err.value) and "max_prompt_length=60" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = file_run(tmp_path, [GOOD, long, GOOD, long], "data.max_prompt_length=60", "data.truncation=left")
    assert any("2 of 4 prompts" in str(w.message) and "max_prompt_length=60" in str(w.message) for w in caught)
    assert metrics["train_metrics"]["train/loss"] >= 0  # trained on the truncated prompts


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_without_pad_token_or_chat_template_is_reported_and_training_goes_on(tiny, records):
    from _tokenizers import byte_tokenizer

    from lightning_sd.build import warn_if_no_chat_template

    model, _ = tiny
    tok = byte_tokenizer(eos=True)  # no pad token, no chat template; ids fit the tiny model's 259 rows
    with pytest.warns(UserWarning, match="has no pad token; using its eos token"):
        module = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "answer_hint"})
    with pytest.warns(UserWarning, match="'tiny-bytes' has no chat template"):
        warn_if_no_chat_template(tok)
    dm = PromptDataModule(tok, records=records, batch_size=2)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=4))])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    with pytest.raises(DataError, match="neither a pad token nor an eos token"):
        SelfDistillationModule(model, byte_tokenizer(), teacher="frozen", loss={"template": "answer_hint"})


def test_teacher_student_vocabulary_mismatch_names_the_teacher_option(tmp_path):
    with pytest.raises(ValueError) as err:
        run_train(QUICK + ["teacher=external", "teacher.model.name=tiny", "teacher.model.name_or_path=null",
                           "teacher.model.tokenizer=smollm2"], tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("teacher.model (name='tiny'") and "tokenizer='smollm2'" in msg
    assert "one shared vocabulary" in msg


# -------------------------------------------------------------------------------------- verifier failures

class FlakyTask(Task):
    """Verifier that raises on record "a", hangs on record "b" and works on the others."""

    name = "flaky"

    def records(self, split, n, seed=0):
        raise NotImplementedError

    def verify(self, record, completion):
        if record["id"] == "a":
            raise RuntimeError("verifier bug")
        if record["id"] == "b":
            time.sleep(5)
        return Verdict(reward=1.0)


def test_verifier_that_raises_or_times_out_gives_no_signal_is_counted_and_training_goes_on(tiny, records):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "answer_hint"}, task=FlakyTask())
    dm = PromptDataModule(tok, records=records[:2], batch_size=2)  # records "a" and "b" in every batch
    counters = FailureCounters()
    gen = OnPolicyGeneration(SamplingConfig(n=2, max_new_tokens=4), verifier_timeout_s=0.2)
    rewards = []

    class Keep(FailureCounters):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(list(batch.rewards))

    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[gen, counters, Keep()])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2  # training went on
    assert rewards == [[None] * 4, [None] * 4]  # every rollout of "a" (raised) and "b" (timed out): no reward
    assert counters.verifier_failures == 8  # the run's total, kept by one callback
    assert trainer.callback_metrics["train/verifier_failures"] == 8.0  # logged next to the loss
    assert "train/reward" not in trainer.callback_metrics  # no made-up reward


# ------------------------------------------------------------------------------------------ non-finite loss

class NaNOnce(SelfDistillationModule):
    """The student's logits of rollout row 1 turn NaN in the second training step."""

    calls = 0

    def student_forward(self, batch):
        out = super().student_forward(batch)
        NaNOnce.calls += 1
        if NaNOnce.calls == 2:
            out = out.clone()
            out[1] = float("nan")
        return out


def nan_run(tiny, records, tmp_path, nonfinite: str):
    model, tok = tiny
    NaNOnce.calls = 0
    module = NaNOnce(model, tok, teacher="frozen", loss={"template": "answer_hint", "nonfinite": nonfinite},
                     optimizer={"lr": 1e-3}, run_dir=str(tmp_path))
    dm = PromptDataModule(tok, records=records, batch_size=2)
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=4))])
    return module, dm, trainer


class Weights(Callback):
    def __init__(self):
        self.before = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append([p.detach().clone() for p in pl_module.student.parameters()])


def test_nonfinite_loss_skip_counts_the_step_and_goes_on(tiny, records, tmp_path):
    module, dm, trainer = nan_run(tiny, records, tmp_path, "skip")
    weights = Weights()
    trainer.callbacks.append(weights)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 1 \(non-finite per-token terms in rollout rows "
                                         r"\[1\], record ids \['.+'\]\): step skipped"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and NaNOnce.calls == 3  # training went on to the end
    assert module.nonfinite_steps == 1 and trainer.callback_metrics["train/nonfinite_steps"] == 1.0
    after = [p.detach() for p in module.student.parameters()]
    changed = [any(not torch.equal(a, b) for a, b in zip(weights.before[i], (weights.before + [after])[i + 1]))
               for i in range(3)]
    assert changed == [True, False, True]  # the NaN step updated nothing; the others did
    assert all(torch.isfinite(p).all() for p in after)


def test_nonfinite_loss_stop_saves_the_batch(tiny, records, tmp_path):
    module, dm, trainer = nan_run(tiny, records, tmp_path, "stop")
    with pytest.raises(FloatingPointError) as err:
        trainer.fit(module, datamodule=dm)
    path = tmp_path / "nonfinite_batch_step1.pt"
    assert str(path) in str(err.value) and "loss.nonfinite=skip" in str(err.value)
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 1 and saved["bad_rows"] == [1] and len(saved["records"]) == 2
    assert torch.isnan(saved["per_token"][1]).any() and saved["completion_text"]


# ------------------------------------------------------------------------------------- invalid options

@pytest.mark.parametrize("overrides,names", [
    (["loss.support=sampled", "loss.beta=0.5"], ["loss.support=sampled", "loss.beta=1"]),
    (["+loss.bta=0.5"], ["loss.bta", "Valid keys of `loss`"]),
    (["teacher=ema", "teacher.rate=null"], ["teacher.rate"]),
    (["callbacks.progress_bar=fancy"], ["callbacks.progress_bar='fancy'"]),
    (["callbacks.token_view_every=0"], ["callbacks.token_view_every"]),
    (["logger.log_samples_every=0"], ["logger.log_samples_every"]),
    (["generation.max_new_tokens=0"], ["generation.max_new_tokens"]),
    (["generation.top_p=0"], ["generation.top_p"]),
], ids=["sampled-needs-beta-1", "unknown-key", "ema-without-rate", "progress-bar", "token-view", "samples",
        "generation-length", "generation-top-p"])
def test_invalid_option_combinations_rejected_at_start_up(tmp_path, overrides, names):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(QUICK + overrides))
    for name in names:
        assert name in str(err.value)
    with pytest.raises(ConfigError):  # train.py stops before loading anything
        run_train(QUICK + overrides, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("overrides,key", [
    (["teacher=frozen", "teacher.rate=1.5"],
     "teacher.rate=1.5 is ignored by teacher=frozen (only teacher=ema reads it)"),
    (["teacher=ema", "teacher.mix=0.5"], "teacher.mix=0.5 is ignored by teacher=ema (only teacher=trust_region"),
], ids=["rate-on-frozen", "mix-on-ema"])
def test_a_teacher_key_the_chosen_teacher_ignores_is_warned_about(overrides, key):
    with pytest.warns(UserWarning) as record:
        validate_config(compose_config(QUICK + overrides))
    assert any(key in str(w.message) for w in record), [str(w.message) for w in record]


def test_override_of_a_key_that_does_not_exist_is_named_by_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'loss.bta'"):
        compose_config(QUICK + ["loss.bta=0.5"])


def test_every_config_group_and_key_is_in_the_configuration_reference():
    """The messages above name keys; `docs/configuration.md` must explain every one of them."""
    from lightning_sd.config import GROUP_SCHEMAS, group_defaults

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    missing = [f"{group}.{key}" for group in GROUP_SCHEMAS for key in group_defaults(group)
               if f"`{key}`" not in doc and f"`{group}.{key}`" not in doc and f"{key}`" not in doc]
    headings = [line for line in doc.splitlines() if line.startswith("## ")]
    missing += [f"group {group}" for group in GROUP_SCHEMAS if not any(f"`{group}`" in h for h in headings)]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_a_fresh_run_without_eval_prompts_says_so_and_warns_of_no_deletion(tmp_path, capsys):
    """A run folder always holds Hydra's `.hydra/` when the logger starts: no "previous log files will be deleted"
    warning when there is no metrics.csv to replace; with no evaluation prompts the console says so instead of
    printing an accuracy of nan."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    overrides = [a for a in QUICK if a != "eval.before=false"] + ["eval.before=true", "data.n_eval=0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(overrides, run_dir)
    assert not [str(w.message) for w in caught if "will be deleted" in str(w.message)]
    out = capsys.readouterr().out
    assert "[eval before] no evaluation prompts (data.n_eval=0, or an empty eval set)" in out
    assert "accuracy nan" not in out
    assert (run_dir / "metrics.csv").exists()


def test_cfg_job_validates_before_printing_and_help_says_what_train_py_does():
    """`--cfg job` prints only configs that a run would accept; `--help` starts with what train.py does, points to
    the configuration reference and offers only selectable groups (no `sweep`)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def train_py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train.py", *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)

    bad = train_py("model=tiny", "generation.max_new_tokens=0", "--cfg", "job")
    assert bad.returncode == 1 and "generation.max_new_tokens must be >= 1, got 0" in bad.stderr
    assert "model:" not in bad.stdout
    good = train_py("model=tiny", "--cfg", "job")
    assert good.returncode == 0 and "name: tiny" in good.stdout
    shown = train_py("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("python train.py [group=option ...]")
    assert "docs/configuration.md" in shown.stdout and "teacher: ema" in shown.stdout
    assert "\nsweep:" not in shown.stdout and "is powered by Hydra" not in shown.stdout
    assert "_base" not in shown.stdout  # the defaults every option starts from are not an option


@pytest.mark.parametrize("bad", ["missing", "field"])
def test_data_file_errors_stop_the_run_before_the_model_is_loaded(tmp_path, monkeypatch, bad):
    import lightning_sd.build

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr(lightning_sd.build, "load_model", no_loading)
    path = tmp_path / "train.jsonl"
    if bad == "field":
        jsonl(path, [GOOD, {"prompt": "What is 1 + 1?", "answer": "2"}])
    with pytest.raises(DataError) as err:
        run_train(QUICK + ["data=jsonl", f"data.train_file={path}", "loss.template=self_critique_v3"],
                  tmp_path / "run")
    expected = f"data.train_file={str(path)!r}: no such file" if bad == "missing" else f"{path}:2"
    assert expected in str(err.value)
