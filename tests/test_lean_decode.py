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


def _teacher_forced(model, batch, tokens, compiled: bool) -> torch.Tensor:
    """Logits `[R, T, V]` of the lean step (eager or compiled) fed `tokens [R, T]` after the prompt's prefill."""
    mask = batch.prompt_mask.long()
    with torch.no_grad():
        cache, arg = _make_cache(model), _cache_kwarg(model)
        pos = position_ids_from_mask(mask)
        _forward_last(model, batch.prompt_ids, mask, pos, cache, arg)
        decoder = LeanDecoder.from_cache(model, cache, mask.size(1), tokens.size(1), compiled=compiled)
        attn, nxt, out = mask, pos[:, -1] + 1, []
        for t in range(tokens.size(1)):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out.append(decoder.step(tokens[:, t], attn, nxt))
            nxt = nxt + 1
    return torch.stack(out, dim=1)


def _grouped_query(model):
    """A copy of `model` with 2 key/value heads for its 4 query heads (grouped-query attention), random."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    config.num_key_value_heads = 2
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "onednn-packed"])
def test_the_compiled_step_gives_the_eager_steps_logits(tiny, records, dtype, packed):
    """`compiled=True`, teacher-forced for 8 positions, with grouped-query attention and left padding: the
    compiled step's logits match the eager step's (fp32: to 1e-4; bf16: to bf16's rounding, since fused kernels
    keep intermediates in float32), with the weights as they are and with the projections packed by oneDNN
    (read through `packed_linear` inside the compiled code)."""
    from contextlib import nullcontext

    from lightning_sd.cpu_linear import onednn_available, onednn_linears, packable_dtypes
    from lightning_sd.lean_decode import compilable

    if packed and not (onednn_available() and dtype in packable_dtypes()):
        pytest.skip(f"oneDNN does not pack {dtype} weights here")
    model, tok = tiny
    model = _grouped_query(model).to(dtype)
    assert compilable(model)
    batch = make_batch(tok, records)
    tokens = torch.randint(3, 200, (batch.prompt_ids.size(0), 8), generator=torch.Generator().manual_seed(0))
    eager = _teacher_forced(model, batch, tokens, compiled=False).float()
    with onednn_linears(model) if packed else nullcontext(0) as swapped:
        assert swapped == (7 * model.config.num_hidden_layers + 1 if packed else 0)
        compiled = _teacher_forced(model, batch, tokens, compiled=True).float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert compiled.shape == eager.shape
    assert torch.allclose(compiled, eager, atol=tol, rtol=0), (compiled - eager).abs().max()
    if dtype == torch.bfloat16:  # the same distributions to bf16's rounding
        p, q = eager.log_softmax(-1), compiled.log_softmax(-1)
        assert (p.exp() * (p - q)).sum(-1).max() < 1e-3


def test_compiled_rollouts_reuse_their_code_for_new_weights(tiny, records):
    """Two compiled rollouts with different weights of the same shapes (an optimizer step between them): no new
    graph is compiled, and each draws the eager step's tokens for its own weights (fp32, same seed). Fewer rows
    and a shorter prompt after that still draw the eager step's tokens."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    model = copy.deepcopy(model).eval()
    batch = make_batch(tok, records)
    settings = dict(n=2, max_new_tokens=10, temperature=1.0, fixed_length=True)

    def both():
        eager = rollout(model, tok, batch, True, **settings)
        compiled = rollout(model, tok, batch, True, compile_decode=True, **settings)
        assert torch.equal(eager.completion_ids, compiled.completion_ids)
        assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-4, rtol=0)
        return compiled

    first = both()
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    second = both()
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.allclose(first.logprobs, second.logprobs, atol=1e-3)  # the new weights did change the step
    for other in (records[:2], records[2:3]):  # fewer rows, then a shorter prompt: recompiled, still exact
        batch = make_batch(tok, other)
        both()


def test_a_lora_student_keeps_the_eager_step_when_compile_is_asked(tiny, records, lean_steps, monkeypatch):
    pytest.importorskip("peft")
    import lightning_sd.lean_decode as lean_decode
    from lightning_sd.lean_decode import compilable
    from lightning_sd.lora import apply_lora

    def never():
        raise AssertionError("a LoRA student must not reach the compiled step")

    monkeypatch.setattr(lean_decode, "compiled_decode_layers", never)
    model, tok = tiny
    student = apply_lora(copy.deepcopy(model), {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}).eval()
    assert supports(student, 64) and not compilable(student) and compilable(model)
    batch = make_batch(tok, records)
    eager = rollout(student, tok, batch, True, max_new_tokens=6, fixed_length=True)
    asked = rollout(student, tok, batch, True, max_new_tokens=6, fixed_length=True, compile_decode=True)
    assert lean_steps[0] == 10
    assert torch.equal(eager.completion_ids, asked.completion_ids)
    assert torch.equal(eager.logprobs, asked.logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_the_compiled_step_packs(tiny, records, monkeypatch, dtype):
    """The eager steps pack every linear layer for oneDNN once per rollout. The compiled step on fp32 weights
    reads those packed copies too; on bf16 weights it reads them unpacked, so only the output layer is packed
    (for the prefill's last position)."""
    from contextlib import contextmanager

    import lightning_sd.lean_decode as lean_decode
    import lightning_sd.sampling as sampling
    from lightning_sd.cpu_linear import onednn_available, packable_dtypes

    if not (onednn_available() and dtype in packable_dtypes()):
        pytest.skip(f"oneDNN does not pack {dtype} weights here")
    swapped, real = [], sampling.onednn_linears
    read, compiled_step = [], lean_decode.compiled_decode_layers

    @contextmanager
    def counting(*args, **kwargs):
        with real(*args, **kwargs) as n:
            swapped.append(n)
            yield n

    def recording():
        step = compiled_step()

        def run(h, cos, sin, mask, col, layers, *rest):
            read.append(sum(isinstance(w, tuple) for w in layers[0]))  # projections read packed, first layer
            return step(h, cos, sin, mask, col, layers, *rest)
        return run

    monkeypatch.setattr(sampling, "onednn_linears", counting)
    monkeypatch.setattr(lean_decode, "compiled_decode_layers", recording)
    model, tok = tiny
    model = copy.deepcopy(model).to(dtype).eval()
    batch = make_batch(tok, records)
    eager = rollout(model, tok, batch, True, max_new_tokens=6, fixed_length=True)
    compiled = rollout(model, tok, batch, True, max_new_tokens=6, fixed_length=True, compile_decode=True)
    every = 7 * model.config.num_hidden_layers + 1
    if dtype == torch.float32:
        assert swapped == [every, every] and read == [7] * 5
        assert torch.equal(eager.completion_ids, compiled.completion_ids)
    else:
        assert swapped == [every, 1] and read == [0] * 5
