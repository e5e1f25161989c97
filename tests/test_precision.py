"""Precision: trainer.precision validation, and bf16-mixed training with a live teacher (the student must still
receive gradients after a no-grad teacher forward on the same weights; GPU run: experiments/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lightning_sd.config import ConfigError, TrainerConfig, validate_trainer


def _tr(**kw) -> TrainerConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), kw))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_cpu_precisions_accepted(precision):
    validate_trainer(_tr(accelerator="cpu", precision=precision))


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp8"}, "trainer.precision='fp8' is not one of"),
    ({"accelerator": "cpu", "precision": "16-mixed"}, "needs a GPU"),
    ({"accelerator": "cpu", "strategy": "fsdp"}, "trainer.strategy=fsdp needs trainer.accelerator=gpu"),
    ({"accelerator": "cpu", "strategy": "deepspeed_zero3"}, "needs trainer.accelerator=gpu"),
    ({"accelerator": "gpu", "strategy": "ddp", "sharding_strategy": "FULL_SHARD"}, "applies to trainer.strategy=fsdp"),
    ({"accelerator": "gpu", "strategy": "fsdp", "sharding_strategy": "EVERYTHING"}, "is not one of"),
    ({"accelerator": "gpu", "strategy": "ddp", "offload": True}, "trainer.offload=true needs"),
    ({"accelerator": "gpu", "strategy": "auto", "fsdp_wrap": ["LlamaMLP"]}, "trainer.fsdp_wrap applies"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be >= 1"),
    ({"profiler": "fast"}, "trainer.profiler='fast' is not one of simple, advanced, pytorch"),
])
def test_invalid_trainer_options_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        validate_trainer(_tr(**kw))


def test_gpu_precisions_and_strategies_validate_anywhere():
    for precision in ("16-mixed", "bf16-mixed", "bf16-true", "32-true"):
        for strategy in ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
            validate_trainer(_tr(accelerator="gpu", precision=precision, strategy=strategy))


def _one_step_grads(precision: str) -> torch.Tensor:
    from lightning.pytorch import Callback, Trainer
    from test_distributed_ddp import RECORDS, _batch, _fixed_rollout, _loader

    from lightning_sd.models import load_model
    from lightning_sd.module import SelfDistillationModule

    student, tok = load_model("tiny", seed=0)
    module = SelfDistillationModule(student, tok, teacher="live", loss={"name": "distill", "template": "answer_hint"},
                                    optimizer={"name": "sgd", "lr": 0.0})
    grads = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch.rollout = _fixed_rollout(tok, batch)

        def on_after_backward(self, trainer, pl_module):
            grads["g"] = torch.cat([p.grad.detach().float().flatten() for p in pl_module.student.parameters()
                                    if p.grad is not None])

    Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()]).fit(
        module, _loader([_batch(tok, RECORDS[:4])]))
    return grads["g"]


def test_bf16_mixed_live_teacher_student_gets_gradients():
    g32 = _one_step_grads("32-true")
    g16 = _one_step_grads("bf16-mixed")
    assert torch.isfinite(g16).all()
    assert float(g16.abs().max()) > 1e-4
    cos = torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0)
    assert cos > 0.95, f"bf16-mixed gradient direction differs from fp32 (cosine {float(cos):.3f})"


def test_generation_runs_under_the_training_precision():
    """The callback samples inside the precision plugin's forward context (autocast for bf16-mixed)."""
    from lightning.pytorch import Callback, Trainer
    from test_distributed_ddp import RECORDS, _batch, _loader

    from lightning_sd.callbacks.generation import OnPolicyGeneration
    from lightning_sd.models import load_model
    from lightning_sd.module import SelfDistillationModule

    student, tok = load_model("tiny", seed=0)
    seen = []
    student.lm_head.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), o.dtype)))
    module = SelfDistillationModule(student, tok, teacher="live", loss={"name": "distill", "template": "answer_hint"})
    marks = []

    class Mark(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks.append(len(seen))  # forward calls before this point belong to generation (callback order)

    gen = OnPolicyGeneration({"max_new_tokens": 3, "do_sample": False})
    Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[gen, Mark()]).fit(
        module, _loader([_batch(tok, RECORDS[:2])]))
    generation = seen[: marks[0]]
    assert len(generation) >= 1
    assert all(not grad and autocast and dtype == torch.bfloat16 for grad, autocast, dtype in generation)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_gradients_for_the_fused_optimizer(algorithm):
    """bf16 mixed precision has no loss scaler, so clipping works with the fused AdamW that `optimizer.fused=null`
    picks (Lightning refuses that pair, a rule meant for fp16's scaler): the step runs, the optimizer is fused,
    and the gradients it receives are clipped to `gradient_clip_val`."""
    from lightning.pytorch import Callback, Trainer
    from test_distributed_ddp import RECORDS, _batch, _fixed_rollout, _loader

    from lightning_sd.models import load_model
    from lightning_sd.module import SelfDistillationModule

    student, tok = load_model("tiny", seed=0)
    module = SelfDistillationModule(student, tok, teacher="live", loss={"name": "distill", "template": "answer_hint"},
                                    optimizer={"name": "adamw", "lr": 1e-3})
    seen = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch.rollout = _fixed_rollout(tok, batch)

        def on_after_backward(self, trainer, pl_module):
            seen["raw"] = torch.cat([p.grad.detach().flatten() for p in pl_module.student.parameters()
                                     if p.grad is not None])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["fused"] = optimizer.param_groups[0]["fused"]

    clip = 1e-3
    optimizer_step = torch.optim.AdamW.step

    def step(self, closure=None):  # Lightning's closure runs forward, backward and clipping inside the step
        loss = closure() if closure is not None else None
        seen["clipped"] = torch.cat([p.grad.detach().flatten() for g in self.param_groups for p in g["params"]
                                     if p.grad is not None])
        optimizer_step(self)
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                gradient_clip_val=clip, gradient_clip_algorithm=algorithm, callbacks=[Capture()]).fit(
            module, _loader([_batch(tok, RECORDS[:4])]))
    assert seen["fused"] is True
    raw, clipped = seen["raw"].double(), seen["clipped"].double()
    if algorithm == "norm":
        assert float(raw.norm()) > 10 * clip
        assert float(clipped.norm()) == pytest.approx(clip, rel=1e-3)
    else:
        assert float(raw.abs().max()) > 10 * clip
        assert float(clipped.abs().max()) <= clip * (1 + 1e-6)
