"""The lean decode step (`lightning_sd.lean_decode`): the same tokens and log-probs as the Hugging Face forward
with its dynamic cache, for fp32 and bf16 rollouts, shared prefill, left padding, LoRA students; unsupported
models keep the Hugging Face step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch

from lightning_sd.lean_decode import LeanDecoder, supports
from lightning_sd.sampling import (
    SamplingConfig,
    _cache_kwarg,
    _forward_last,
    _make_cache,
    position_ids_from_mask,
    sample,
)


def rollout(model, tok, batch, lean: bool, **settings):
    config = SamplingConfig(lean_decode=lean, seed=0, **settings)
    return sample(model, batch.prompt_ids, batch.prompt_mask, config, pad_token_id=tok.pad_token_id,
                  stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(7))


@pytest.fixture
def lean_steps(monkeypatch):
    """How many decode steps ran through `LeanDecoder.step`."""
    calls = [0]
    step = LeanDecoder.step

    def counted(self, *args):
        calls[0] += 1
        return step(self, *args)

    monkeypatch.setattr(LeanDecoder, "step", counted)
    return calls


@pytest.mark.parametrize("settings", [dict(n=1, temperature=1.0), dict(n=3, temperature=1.3, top_k=20, top_p=0.9),
                                      dict(n=2, do_sample=False), dict(n=3, temperature=1.0, dtype="bf16"),
                                      dict(n=2, temperature=1.0, share_prefill=False)])
def test_the_lean_step_draws_the_hugging_face_steps_samples(tiny, records, settings, lean_steps):
    """At a fixed seed, prompts padded differently: the same tokens and masks, log-probs within the dtype's
    rounding (on this CPU they are bitwise equal), and the lean step really ran."""
    model, tok = tiny
    model.eval()
    batch = make_batch(tok, records)
    assert len(set(batch.prompt_mask.sum(-1).tolist())) > 1
    hf = rollout(model, tok, batch, False, max_new_tokens=16, fixed_length=True, **settings)
    assert lean_steps[0] == 0
    lean = rollout(model, tok, batch, True, max_new_tokens=16, fixed_length=True, **settings)
    assert lean_steps[0] == 15  # the first token comes from the prefill
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert torch.equal(hf.completion_mask, lean.completion_mask)
    atol = 2e-2 if settings.get("dtype") == "bf16" else 1e-5
    assert torch.allclose(hf.logprobs, lean.logprobs, atol=atol, rtol=0)


def test_each_lean_step_gives_the_hugging_face_logits(tiny, records):
    """Teacher-forced: the same tokens fed to both steps for 10 positions, logits compared every step (fp32)."""
    model, tok = tiny
    model.eval()
    batch = make_batch(tok, records)
    mask = batch.prompt_mask.long()
    tokens = torch.randint(3, 200, (mask.size(0), 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [_make_cache(model), _make_cache(model)]
        arg = _cache_kwarg(model)
        pos = position_ids_from_mask(mask)
        for cache in caches:
            _forward_last(model, batch.prompt_ids, mask, pos, cache, arg)
        decoder = LeanDecoder.from_cache(model, caches[1], mask.size(1), tokens.size(1))
        attn, nxt = mask, pos[:, -1] + 1
        for t in range(tokens.size(1)):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            ref = _forward_last(model, tokens[:, t:t + 1], attn, nxt[:, None], caches[0], arg)
            got = decoder.step(tokens[:, t], attn, nxt)
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (t, (got - ref).abs().max())
            nxt = nxt + 1


def test_a_lora_student_decodes_through_its_adapters(tiny, records, lean_steps):
    pytest.importorskip("peft")
    from lightning_sd.lora import apply_lora

    model, tok = tiny
    student = apply_lora(copy.deepcopy(model), {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj",
                                                                                         "down_proj"]})
    with torch.no_grad():  # a trained adapter: B is zero at initialization
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    student.eval()
    assert supports(student, 64)
    batch = make_batch(tok, records)
    hf = rollout(student, tok, batch, False, n=2, max_new_tokens=12, temperature=1.0, fixed_length=True)
    lean = rollout(student, tok, batch, True, n=2, max_new_tokens=12, temperature=1.0, fixed_length=True)
    plain = rollout(model.eval(), tok, batch, True, n=2, max_new_tokens=12, temperature=1.0, fixed_length=True)
    assert lean_steps[0] == 22
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert torch.allclose(hf.logprobs, lean.logprobs, atol=1e-5, rtol=0)
    assert not torch.allclose(lean.logprobs, plain.logprobs, atol=1e-3)  # the adapters did change the step


def test_models_outside_the_layout_keep_the_hugging_face_step(tiny, records, lean_steps):
    model, tok = tiny
    assert supports(model, 10_000)
    for key, value in (("hidden_act", "gelu"), ("model_type", "gpt2"), ("sliding_window", 32)):
        other = copy.copy(model)
        other.config = copy.deepcopy(model.config)
        setattr(other.config, key, value)
        assert not supports(other, 64), key
    windowed = copy.copy(model)
    windowed.config = copy.deepcopy(model.config)
    windowed.config.sliding_window = 4096
    assert supports(windowed, 1024) and not supports(windowed, 5000)
    gelu = copy.deepcopy(model)
    gelu.config.hidden_act = "gelu"  # the layout check only: the modules still compute SiLU
    gelu.eval()
    rollout(gelu, tok, make_batch(tok, records), True, max_new_tokens=6, fixed_length=True)
    assert lean_steps[0] == 0


def test_one_new_token_needs_no_decoder(tiny, records, lean_steps):
    model, tok = tiny
    model.eval()
    out = rollout(model, tok, make_batch(tok, records), True, max_new_tokens=1)
    assert out.completion_ids.shape[1] == 1 and lean_steps[0] == 0
