"""The contrastive teacher (`loss.contrast`): the target is the student moved by the difference between the
teacher with the real context and the teacher with a placebo context (the same template around another
record's fields)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from lightning_sd import LossConfig, OnPolicyGeneration, SamplingConfig, SelfDistillationModule, per_token_divergence
from lightning_sd.losses import contrastive_target_logits


def test_target_is_the_student_moved_by_the_context_difference_float64():
    g = torch.Generator().manual_seed(0)
    s, t, p = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 0.7
    q = contrastive_target_logits(s.requires_grad_(True), t, p, alpha)
    assert not q.requires_grad
    # Q(v) proportional to S(v) * (T(v) / P(v)) ** alpha
    expected = (s.detach().softmax(-1) * (t.softmax(-1) / p.softmax(-1)) ** alpha)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(q.softmax(-1), expected, rtol=1e-12, atol=1e-12)


def test_a_placebo_equal_to_the_real_context_gives_exactly_zero_loss_pure():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    target = contrastive_target_logits(s, t, t.clone(), alpha=2.0)
    assert torch.equal(target, s)
    for beta in (0.0, 1.0):  # forward and reverse KL of identical logits: exactly zero
        assert torch.all(per_token_divergence(s, target, beta=beta) == 0)
    assert per_token_divergence(s, target, beta=0.5).abs().max() < 1e-6  # the JSD's mixture rounds in log space


def _one_step_loss(tiny, records, contrast, template="self_critique_v3"):
    """(loss, batch) of one real training step through a Trainer."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen",
                                    loss={"name": "distill", "template": template, "contrast": contrast})
    seen = {}

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"], seen["batch"] = float(outputs["loss"]), batch

    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=6)), Keep()]).fit(
        module, DataLoader([records], batch_size=None, collate_fn=lambda recs: make_batch(tok, recs)))
    return seen["loss"], seen["batch"]


def test_a_placebo_equal_to_the_real_context_gives_exactly_zero_loss_in_the_module(tiny, records):
    """Every record of the batch the same: the placebo (the next record's solution) equals the real context."""
    same = [dict(records[1], id=str(i)) for i in range(3)]
    loss, batch = _one_step_loss(tiny, same, contrast=1.0)
    assert loss == 0.0
    assert torch.all(batch.loss_terms["per_token"] == 0)


def test_different_records_give_a_positive_loss_and_use_the_next_records_solution(tiny, records):
    loss, batch = _one_step_loss(tiny, records, contrast=1.0)
    assert loss > 0
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"name": "distill", "template": "answer_hint"})
    placebo = module.build_teacher_inputs(batch, placebo=True).texts
    assert placebo[0].startswith(records[0]["prompt"]) and records[1]["answer"] in placebo[0]


@pytest.mark.parametrize("bad,match", [
    ({"contrast": 0.0}, "loss.contrast must be > 0"),
    ({"contrast": 1.0, "chunk_size": 64}, "memory-bounded"),
    ({"contrast": 1.0, "name": "grpo", "grpo_mix": 1.0}, "loss.contrast=1.0 is an option of loss=distill"),
])
def test_bad_contrast_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        LossConfig.from_dict({"template": "answer_hint", **bad})
