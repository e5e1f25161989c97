"""No update without signal: an optimizer step whose micro-batches (on every rank) carry no loss-bearing token
leaves the weights, the optimizer state, the LR schedule and the teacher exactly as they were; such steps are
counted (`train/empty_steps`), across a resume too. Step diagnostics are logged every step."""

from __future__ import annotations

import pytest
import torch
from conftest import StopAfter, make_batch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_sd import OnPolicyGeneration, SamplingConfig, SelfDistillationModule
from lightning_sd.data.tasks.base import Verdict
from lightning_sd.models import load_model


class Signal(Callback):
    """Decides before each batch whether the teacher context exists (`signal(global_step, batch_idx)`)."""

    def __init__(self, signal):
        self.signal, self.on = signal, True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = bool(self.signal(trainer.global_step, batch_idx))


def hint_or_nothing(switch: Signal):
    return lambda record, row: f"{record['prompt']}\n(The answer is {record['answer']}.)" if switch.on else None


def run(records, steps: int, signal, *, accumulate: int = 1, teacher: str = "ema", scheduler=None, ckpt_dir=None,
        ckpt_path=None, loss=None, task=None, n: int = 1, context=None, stop_after: int | None = None,
        optimizer=None, gradient_clip_val=None):
    model, tok = load_model("tiny", seed=0)
    switch = Signal(signal)
    module = SelfDistillationModule(model, tok, teacher=teacher, teacher_kwargs={"rate": 0.5} if teacher == "ema" else {},
                                    loss=loss or {"name": "distill", "template": "answer_hint"},
                                    context=context or hint_or_nothing(switch), task=task,
                                    optimizer={"lr": 1e-2, **(optimizer or {})},
                                    scheduler=scheduler or {"name": "cosine", "warmup_steps": 2})
    callbacks = [switch, OnPolicyGeneration(SamplingConfig(n=n, max_new_tokens=5)), StopAfter(stop_after)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1))
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=ckpt_dir is not None,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      accumulate_grad_batches=accumulate, gradient_clip_val=gradient_clip_val)
    loader = DataLoader([records] * (steps * accumulate), batch_size=None, collate_fn=lambda recs: make_batch(tok, recs))
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def optimizer_state(trainer) -> list[dict]:
    opt = trainer.optimizers[0]
    return [{k: v.clone() for k, v in opt.state[p].items()} for group in opt.param_groups for p in group["params"]]


def assert_same_training_state(a, b):
    (module_a, trainer_a), (module_b, trainer_b) = a, b
    for (name, pa), pb in zip(module_a.student.named_parameters(), module_b.student.parameters()):
        assert torch.equal(pa, pb), name
    for (name, ta), tb in zip(module_a.teacher.model.named_parameters(), module_b.teacher.model.parameters()):
        assert torch.equal(ta, tb), f"teacher {name}"
    for sa, sb in zip(optimizer_state(trainer_a), optimizer_state(trainer_b)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    sched_a, sched_b = (t.lr_scheduler_configs[0].scheduler for t in (trainer_a, trainer_b))
    assert sched_a.last_epoch == sched_b.last_epoch
    assert trainer_a.optimizers[0].param_groups[0]["lr"] == trainer_b.optimizers[0].param_groups[0]["lr"]


def test_empty_steps_leave_weights_optimizer_schedule_and_teacher_as_after_the_first(records):
    """AdamW would keep moving the weights on zero gradients (momentum): one step with signal then five steps
    whose every row is masked must leave everything exactly as after the first step."""
    one = run(records, 1, lambda step, i: True)
    six = run(records, 6, lambda step, i: step == 0)
    assert_same_training_state(one, six)
    assert six[0].empty_steps == 5 and one[0].empty_steps == 0
    assert float(six[1].callback_metrics["train/empty_steps"]) == 5
    assert six[0].diagnostics_summary()["empty_steps"] == 5


def test_grpo_groups_with_equal_rewards_are_empty_steps(records):
    """GRPO: every group's rewards equal -> every advantage is 0 -> no signal, no step (the mask still counts
    the tokens for the token mean of steps that do have signal)."""

    class Constant:
        name = "constant"

        def verify(self, record, completion):
            return Verdict(reward=1.0)

    loss = {"name": "grpo", "grpo_mix": 1.0, "template": "answer_hint"}
    before = load_model("tiny", seed=0)[0]
    module, trainer = run(records[:2], 3, lambda step, i: True, loss=loss, task=Constant(), n=2, teacher="frozen")
    for pa, pb in zip(before.parameters(), module.student.parameters()):
        assert torch.equal(pa, pb)
    assert module.empty_steps == 3
    assert float(trainer.callback_metrics["train/no_signal_rows"]) == 1.0


def test_accumulated_step_is_empty_only_when_every_micro_batch_is(records):
    never_after_first = run(records, 3, lambda step, i: step == 0, accumulate=2)
    assert_same_training_state(run(records, 1, lambda step, i: True, accumulate=2), never_after_first)
    assert never_after_first[0].empty_steps == 2
    partly = run(records, 2, lambda step, i: i % 2 == 0, accumulate=2)  # first micro-batch of each step has signal
    assert partly[0].empty_steps == 0


def test_a_resumed_run_counts_the_same_skips_and_ends_in_the_same_state(records, tmp_path):
    signal = lambda step, i: step in (0, 3)  # noqa: E731
    straight = run(records, 5, signal)
    run(records, 5, signal, ckpt_dir=tmp_path / "ckpt", stop_after=2)
    resumed = run(records, 5, signal, ckpt_dir=tmp_path / "ckpt", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert_same_training_state(straight, resumed)
    assert straight[0].empty_steps == resumed[0].empty_steps == 3


def test_step_diagnostics_are_logged(records):
    module, trainer = run(records, 1, lambda step, i: True,
                          loss={"name": "distill", "template": "answer_hint", "entry_clip": 0.01})
    logged = trainer.callback_metrics
    for key in ("truncated", "no_signal_rows", "teacher_advantage", "teacher_advantage_std", "clipped_teacher_mass",
                "empty_steps"):
        assert f"train/{key}" in logged, key
    assert float(logged["train/no_signal_rows"]) == 0.0
    assert 0.0 <= float(logged["train/clipped_teacher_mass"]) <= 1.0
    assert float(logged["train/teacher_advantage_std"]) > 0
    summary = module.diagnostics_summary()
    assert summary["truncated"] == float(logged["train/truncated"])
    assert summary["teacher_advantage"] == pytest.approx(float(logged["train/teacher_advantage"]))


def test_teacher_advantage_is_zero_for_a_live_teacher_with_the_students_prompt(records):
    module, trainer = run(records, 1, lambda step, i: True, teacher="live", context=lambda record, row: record["prompt"])
    assert float(trainer.callback_metrics["train/teacher_advantage"]) == 0.0
    assert float(trainer.callback_metrics["train/teacher_advantage_std"]) == 0.0


def test_truncation_warns_once_when_most_rollouts_are_cut(records):
    with pytest.warns(UserWarning, match="generation.max_new_tokens") as caught:
        run(records, 2, lambda step, i: True)  # 5 new tokens: every rollout is cut
    assert sum("generation.max_new_tokens" in str(w.message) for w in caught) == 1


def test_token_view_page_summarizes_the_steps_diagnostics(records, tmp_path):
    from lightning_sd.callbacks import TokenView

    model, tok = load_model("tiny", seed=0)
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"name": "distill", "template": "answer_hint",
                                                                        "entry_clip": 0.05})
    view = TokenView(every_n_steps=1, folder=str(tmp_path))
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=5)), view]).fit(
        module, DataLoader([records], batch_size=None, collate_fn=lambda recs: make_batch(tok, recs)))
    page = view.written[0].read_text()
    for text in ("cut 100%", "no-signal rows 0%", "teacher advantage", "teacher mass on clipped entries"):
        assert text in page, text
