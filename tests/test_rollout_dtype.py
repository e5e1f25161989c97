"""Rollouts in a compute dtype (`generation.dtype`): the rollout runs on a cast copy of the student, made once per
rollout, without autocast; its log-probs are the copy's, so `loss.is_clip` weights the difference to the trainer.
The student itself is never cast."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from lightning_sd import SelfDistillationModule
from lightning_sd.forward import completion_logits
from lightning_sd.objectives import token_logprobs
from lightning_sd.sampling import SamplingConfig, cast_copy, sample

# bf16 keeps 8 significant bits (unit roundoff 2^-9): the logits of the tiny model (|logit| < 1) pass through a
# few such roundings in two layers, in a different order in the cached decode and in the trainer's full
# forward, so their log-probs (about -5.5) agree to a few 2^-9 at most; 2^-6 leaves room and still fails on
# any misaligned token (those differ by ~0.1 and more).
BF16_ATOL = 2 ** -6


def bf16_rollout(model, tok, records, **settings):
    batch = make_batch(tok, records)
    model.eval()
    return sample(model, batch.prompt_ids, batch.prompt_mask,
                  SamplingConfig(n=2, max_new_tokens=12, temperature=1.0, dtype="bf16", **settings),
                  pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id],
                  generator=torch.Generator().manual_seed(0))


def trainer_logprobs(model, ro, autocast: bool) -> torch.Tensor:
    """`[R, C]` log-probs of the rollout's tokens from the trainer's full-sequence forward of `model` (float32
    log-softmax), under bf16 autocast (trainer.precision=bf16-mixed) or not."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    return token_logprobs(logits.float(), ro.completion_ids)


def test_bf16_rollout_logprobs_match_the_trainers_bf16_forward(tiny, records):
    model, tok = tiny
    ro = bf16_rollout(model, tok, records)
    valid = ro.completion_mask.bool()
    assert valid.sum() > 20
    mixed = trainer_logprobs(model, ro, autocast=True)
    torch.testing.assert_close(ro.logprobs[valid], mixed[valid], rtol=0, atol=BF16_ATOL)
    # they are the bf16 copy's log-probs: nearer a bf16 forward (the weights cast) than the fp32 one
    fp32 = trainer_logprobs(model, ro, autocast=False)
    bf16 = trainer_logprobs(cast_copy(model, torch.bfloat16)[0], ro, autocast=False)
    assert not torch.equal(ro.logprobs[valid], fp32[valid])
    assert (ro.logprobs - bf16)[valid].abs().mean() < (ro.logprobs - fp32)[valid].abs().mean()


def test_the_fp32_student_is_untouched(tiny, records):
    """No in-place cast: the student's tensors keep their dtype, storage, values and grad flags."""
    model, tok = tiny
    before = {name: (p.dtype, p.data_ptr(), p.detach().clone(), p.requires_grad)
              for name, p in model.named_parameters()}
    buffers = {name: (b.dtype, b.clone()) for name, b in model.named_buffers()}
    ro = bf16_rollout(model, tok, records)
    for name, p in model.named_parameters():
        dtype, ptr, value, grad = before[name]
        assert (p.dtype, p.data_ptr(), p.requires_grad) == (dtype, ptr, grad), name
        assert torch.equal(p, value), name
    for name, b in model.named_buffers():
        assert b.dtype == buffers[name][0] and torch.equal(b, buffers[name][1]), name
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert ro.extras["rollout_copy_bytes"] == sum(t.numel() for t in floats) * 2  # the copy: 2 bytes a value


def test_cast_copy_keeps_tied_weights_tied(tiny):
    model, _ = tiny
    model.config.tie_word_embeddings = True
    model.tie_weights()
    copy, _ = cast_copy(model, torch.bfloat16)
    assert copy.lm_head.weight is copy.get_input_embeddings().weight
    assert copy.lm_head.weight.dtype == torch.bfloat16 and not copy.lm_head.weight.requires_grad


def test_importance_weights_cover_every_row_when_dtypes_differ(tiny, records):
    """A bf16 rollout of an fp32 student: with `loss.is_clip` every sampled row gets weights, and they are not
    the 1 an exact sampler gives."""
    model, tok = tiny
    ro = bf16_rollout(model, tok, records)
    module = SelfDistillationModule(model, tok, teacher="frozen",
                                    loss={"name": "distill", "template": "answer_hint", "is_clip": 2.0})
    with torch.no_grad():
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    w = module.scorer.importance_weights(logits, ro)
    valid = ro.completion_mask.bool()
    assert w is not None and w.shape == ro.completion_ids.shape
    assert torch.isfinite(w).all() and (w[valid] > 0).all() and (w[~valid] == 1).all()
    for r in range(w.size(0)):
        assert (w[r][valid[r]] != 1).any(), f"row {r}: no mismatch seen"
    torch.testing.assert_close(w[valid], torch.ones_like(w[valid]), rtol=0, atol=4 * BF16_ATOL)
    assert ro.extras["importance_weight"] == pytest.approx(float(w[valid].mean()))  # train/importance_weight


def test_no_autocast_inside_the_rollout(tiny, records):
    """With a dtype set, an autocast around the call changes nothing (the decode loop runs without it); with
    fp32 on an fp32 student no copy is made."""
    model, tok = tiny
    outside = bf16_rollout(model, tok, records)
    with torch.autocast("cpu", dtype=torch.float16):
        inside = bf16_rollout(model, tok, records)
    assert torch.equal(outside.completion_ids, inside.completion_ids)
    assert torch.equal(outside.logprobs, inside.logprobs)
    batch = make_batch(tok, records[:2])
    kw = dict(pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id])
    plain = sample(model, batch.prompt_ids, batch.prompt_mask, SamplingConfig(max_new_tokens=6),
                   generator=torch.Generator().manual_seed(1), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = sample(model, batch.prompt_ids, batch.prompt_mask, SamplingConfig(max_new_tokens=6, dtype="fp32"),
                      generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain.completion_ids, fp32.completion_ids) and torch.equal(plain.logprobs, fp32.logprobs)
    assert "rollout_copy_bytes" not in fp32.extras


def test_lora_student_rolls_out_with_its_adapter(tiny, records):
    """A LoRA student: the bf16 copy carries the adapter (no merge), and the student keeps its fp32 trainable
    adapter."""
    pytest.importorskip("peft")
    from lightning_sd.lora import apply_lora

    model, tok = tiny
    student = apply_lora(model, {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    ro = bf16_rollout(student, tok, records)
    valid = ro.completion_mask.bool()
    with_adapter = trainer_logprobs(student, ro, autocast=True)
    with student.disable_adapter():
        without = trainer_logprobs(student, ro, autocast=True)
    assert (with_adapter - without)[valid].abs().max() > 10 * BF16_ATOL  # the adapter matters
    torch.testing.assert_close(ro.logprobs[valid], with_adapter[valid], rtol=0, atol=BF16_ATOL)
    assert {name for name, p in student.named_parameters() if p.requires_grad} == trainable
    assert all(p.dtype == torch.float32 for p in student.parameters())


@pytest.mark.parametrize("overrides,message", [
    ("generation.dtype=bf17", r"generation\.dtype='bf17' is not one of null, bf16, fp16, fp32"),
    ("generation.dtype=bf16", r"generation\.dtype=bf16 samples from a bf16 copy.*set loss\.is_clip"),
    ("generation.dtype=bf16 loss.is_clip=2.0 trainer.accelerator=gpu trainer.strategy=fsdp",
     r"generation\.dtype=bf16 is not supported with trainer\.strategy=fsdp"),
])
def test_config_refuses_a_generation_dtype_it_cannot_honour(overrides, message):
    from test_config import TINY, compose_cfg

    from lightning_sd.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(TINY + ["loss=distill"] + overrides.split()))


@pytest.mark.parametrize("overrides", ["generation.dtype=bf16 loss.is_clip=2.0",
                                       "generation.dtype=fp32", "generation.dtype=bf16 trainer.precision=bf16-true",
                                       "generation.dtype=fp16 model.dtype=float16"])
def test_config_accepts_a_generation_dtype(overrides):
    """Accepted: with `loss.is_clip`, or without it when the rollout runs in the dtype the student trains in."""
    from test_config import TINY, compose_cfg

    from lightning_sd.build import build_sampling
    from lightning_sd.config import validate_config

    typed = validate_config(compose_cfg(TINY + ["loss=distill"] + overrides.split()))
    assert build_sampling(typed["generation"]).dtype == overrides.split()[0].split("=")[1]


def test_training_rollouts_in_bf16_under_bf16_mixed(tiny, records):
    """Through a real Trainer (bf16-mixed): the callback's rollout is the plain bf16 `sample` of the initial
    student at the step's seed, its copy size is logged, and the student trains in fp32."""
    import copy

    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_sd import OnPolicyGeneration
    from lightning_sd.rollout import derive_seed

    model, tok = tiny
    initial = copy.deepcopy(model)
    config = SamplingConfig(n=2, max_new_tokens=6, temperature=1.0, dtype="bf16")
    module = SelfDistillationModule(model, tok, teacher="frozen",
                                    loss={"name": "distill", "template": "answer_hint", "is_clip": 2.0})
    seen = []

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch.rollout)

    trainer = Trainer(max_steps=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[OnPolicyGeneration(config), Keep()])
    trainer.fit(module, DataLoader([records], batch_size=None, collate_fn=lambda recs: make_batch(tok, recs)))
    batch = make_batch(tok, records)
    initial.eval()
    expected = sample(initial, batch.prompt_ids, batch.prompt_mask, config, pad_token_id=tok.pad_token_id,
                      stop_token_ids=[tok.eos_token_id],
                      generator=torch.Generator().manual_seed(derive_seed(config.seed, 0, 0, 0)))
    assert torch.equal(seen[0].completion_ids, expected.completion_ids)
    assert torch.equal(seen[0].logprobs, expected.logprobs)
    assert float(trainer.callback_metrics["train/rollout_copy_bytes"]) == expected.extras["rollout_copy_bytes"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
