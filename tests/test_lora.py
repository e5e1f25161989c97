"""LoRA students: frozen teacher = adapters off (no copy), EMA teacher = a second adapter (no copy)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from lightning_sd.lora import adapter_active, adapter_parameters, apply_lora, ema_adapter_update_  # noqa: E402
from lightning_sd.models import load_model  # noqa: E402

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def _ids(tok):
    return torch.tensor([tok.encode("What is 2 + 3? The answer is 5.")])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_student(seed=0):
    torch.manual_seed(0)
    base, tok = load_model("tiny", seed=seed)
    return apply_lora(base, LORA), tok


def _set_adapter(model, adapter, scale):
    with torch.no_grad():
        for i, (_, p) in enumerate(adapter_parameters(model, adapter)):
            p.copy_(torch.linspace(-scale, scale, p.numel()).reshape(p.shape) * (1 + 0.1 * i))


def test_frozen_teacher_is_base_model_with_adapters_off():
    from lightning_sd.teachers import build_teacher

    reference, tok = load_model("tiny", seed=0)
    student, _ = _lora_student()
    _set_adapter(student, "default", 0.3)  # make the adapter matter
    ids = _ids(tok)
    base_logits = _logits(reference, ids)
    assert (_logits(student, ids) - base_logits).abs().max() > 1e-3
    teacher = build_teacher("frozen", student)
    assert teacher.model is None
    t_logits = teacher.score(student, lambda net: net(input_ids=ids).logits)
    torch.testing.assert_close(t_logits, base_logits, rtol=0, atol=1e-6)
    assert (_logits(student, ids) - base_logits).abs().max() > 1e-3  # adapters back on afterwards


def count_parameters(module) -> int:
    """Distinct parameter elements (`parameters()` yields a shared/tied parameter once)."""
    return sum(p.numel() for p in module.parameters())


def test_no_second_copy_of_base_weights():
    from lightning_sd.module import SelfDistillationModule

    base, tok = load_model("tiny", seed=0)
    n_base = count_parameters(base)
    student, _ = _lora_student()
    n_adapter = sum(p.numel() for _, p in adapter_parameters(student, "default"))
    assert n_adapter > 0
    frozen = SelfDistillationModule(student, tok, teacher="frozen")
    assert count_parameters(frozen) == n_base + n_adapter
    student2, _ = _lora_student()
    ema = SelfDistillationModule(student2, tok, teacher="ema", teacher_kwargs={"rate": 0.1})
    assert count_parameters(ema) == n_base + 2 * n_adapter  # the EMA teacher is one more adapter, nothing else
    full = SelfDistillationModule(load_model("tiny", seed=0)[0], tok, teacher="ema", teacher_kwargs={"rate": 0.1})
    assert count_parameters(full) == 2 * n_base  # without LoRA an EMA teacher is a full copy
    trainable = [p for p in ema.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == n_adapter  # only the `default` adapter trains


def test_ema_adapter_update_matches_hand_computation():
    from lightning_sd.teachers import build_teacher

    student, tok = _lora_student()
    teacher = build_teacher("ema", student, rate=0.2)
    _set_adapter(student, "default", 0.3)
    _set_adapter(student, "ema", -0.1)
    s = [p.detach().clone() for _, p in adapter_parameters(student, "default")]
    e = [p.detach().clone() for _, p in adapter_parameters(student, "ema")]
    teacher.after_optimizer_step(student)
    for (name, p), s0, e0 in zip(adapter_parameters(student, "ema"), s, e):
        torch.testing.assert_close(p, 0.8 * e0 + 0.2 * s0, rtol=0, atol=1e-7, msg=name)
    for (_, p), s0 in zip(adapter_parameters(student, "default"), s):
        assert torch.equal(p, s0)


def test_ema_adapter_starts_as_student_and_scores_with_its_own_weights():
    from lightning_sd.teachers import build_teacher

    student, tok = _lora_student()
    _set_adapter(student, "default", 0.3)
    ids = _ids(tok)
    before = _logits(student, ids)
    teacher = build_teacher("ema", student, rate=0.5)
    run = lambda net: net(input_ids=ids).logits  # noqa: E731
    torch.testing.assert_close(teacher.score(student, run), before, rtol=0, atol=1e-6)
    grads = {n: p.requires_grad for n, p in student.named_parameters()}
    _set_adapter(student, "default", 0.6)  # the student moves; the teacher keeps its adapter
    torch.testing.assert_close(teacher.score(student, run), before, rtol=0, atol=1e-6)
    assert (_logits(student, ids) - before).abs().max() > 1e-3
    assert {n: p.requires_grad for n, p in student.named_parameters()} == grads  # switching never touches grads
    with adapter_active(student, "ema"):
        torch.testing.assert_close(_logits(student, ids), before, rtol=0, atol=1e-6)


def test_lora_ema_training_step_updates_adapter_only_and_ema_follows():
    from lightning.pytorch import Callback, Trainer

    from lightning_sd.module import SelfDistillationModule
    from test_distributed_ddp import RECORDS, _batch, _fixed_rollout, _loader

    student, tok = _lora_student()
    module = SelfDistillationModule(student, tok, teacher="ema", teacher_kwargs={"rate": 0.25},
                                    loss={"name": "distill", "template": "answer_hint"},
                                    optimizer={"name": "sgd", "lr": 1.0})
    base0 = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    default0 = [p.detach().clone() for _, p in adapter_parameters(student, "default")]
    loader = _loader([_batch(tok, RECORDS[2:6])])

    class Fixed(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch.rollout = _fixed_rollout(tok, batch)

    Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Fixed()]).fit(module, loader)
    for n, p in student.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base0[n]), n
    default1 = [p.detach() for _, p in adapter_parameters(student, "default")]
    assert max(float((a - b).abs().max()) for a, b in zip(default1, default0)) > 1e-4
    for (_, e), d0, d1 in zip(adapter_parameters(student, "ema"), default0, default1):
        torch.testing.assert_close(e, 0.75 * d0 + 0.25 * d1, rtol=0, atol=1e-7)
    assert any(".ema." in k for k in module.state_dict())  # the EMA adapter is saved with the student


def test_apply_lora_config_errors():
    base, _ = load_model("tiny", seed=0)
    with pytest.raises(ValueError, match="model.lora: unknown key"):
        apply_lora(base, {"r": 4, "rank": 8})
    with pytest.raises(ValueError, match="model.lora.r"):
        apply_lora(base, {"r": 0})
    assert apply_lora(base, None) is base


def test_ema_adapter_update_plain_tensors():
    student, _ = _lora_student()
    from lightning_sd.lora import add_ema_adapter

    add_ema_adapter(student, name="slow")
    _set_adapter(student, "default", 1.0)
    slow0 = [p.detach().clone() for _, p in adapter_parameters(student, "slow")]
    ema_adapter_update_(student, 1.0, target="slow")
    for (_, p), (_, d) in zip(adapter_parameters(student, "slow"), adapter_parameters(student, "default")):
        assert torch.equal(p, d)
    assert any((a != b).any() for a, (_, b) in zip(slow0, adapter_parameters(student, "slow")))
