"""The speed-motivated changes of the hot path keep every value: completion-only logits/hidden states and the
oneDNN packed linears used while decoding on CPU."""

from __future__ import annotations

import pytest
import torch

from lightning_sd.forward import completion_hidden, completion_logits
from lightning_sd.cpu_linear import onednn_available, onednn_linears
from lightning_sd.sampling import SamplingConfig, position_ids_from_mask, sample


def _batch(rows=3, p=9, c=5, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, vocab, (rows, p), generator=g)
    pmask = torch.ones(rows, p, dtype=torch.long)
    pmask[0, :4] = 0  # left padding
    pmask[1, :1] = 0
    comp = torch.randint(10, vocab, (rows, c), generator=g)
    cmask = torch.ones(rows, c, dtype=torch.long)
    cmask[2, c - 2:] = 0  # right padding after a stop token
    return prompt, pmask, comp, cmask


def _reference_logits(model, prompt, pmask, comp, cmask):
    ids, mask = torch.cat([prompt, comp], 1), torch.cat([pmask, cmask], 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    p, c = prompt.size(1), comp.size(1)
    return out.logits[:, p - 1 : p + c - 1], out


@pytest.mark.parametrize("c", [1, 5])
def test_completion_logits_match_full_forward(tiny, c):
    model, _ = tiny
    model.eval()
    prompt, pmask, comp, cmask = _batch(c=c)
    with torch.no_grad():
        ref, _ = _reference_logits(model, prompt, pmask, comp, cmask)
        got = completion_logits(model, prompt, pmask, comp, cmask)
    assert got.shape == (3, c, model.config.vocab_size)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_completion_hidden_match_full_forward(tiny):
    model, _ = tiny
    model.eval()
    prompt, pmask, comp, cmask = _batch(c=4)
    with torch.no_grad():
        ids, mask = torch.cat([prompt, comp], 1), torch.cat([pmask, cmask], 1)
        full = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                   use_cache=False).last_hidden_state
        got = completion_hidden(model, prompt, pmask, comp, cmask)
    p = prompt.size(1)
    torch.testing.assert_close(got, full[:, p - 1 : p + 3], rtol=1e-5, atol=1e-5)
    # and the output embedding of these states gives completion_logits
    with torch.no_grad():
        logits = completion_logits(model, prompt, pmask, comp, cmask)
    torch.testing.assert_close(model.get_output_embeddings()(got), logits, rtol=1e-5, atol=1e-5)


def test_completion_logits_gradient_unchanged(tiny):
    """Dropping the unused last token changes no gradient."""
    model, _ = tiny
    model.train()
    prompt, pmask, comp, cmask = _batch(c=4)
    ref, _ = _reference_logits(model, prompt, pmask, comp, cmask)
    g_ref = torch.autograd.grad(ref.float().log_softmax(-1).mean(), list(model.parameters()), allow_unused=True)
    got = completion_logits(model, prompt, pmask, comp, cmask)
    g_got = torch.autograd.grad(got.float().log_softmax(-1).mean(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g_ref, g_got):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@needs_onednn
@pytest.mark.parametrize("rows", [1, 8, 65])
def test_onednn_linears_same_outputs_and_restored(tiny, rows):
    """Every fp32 Linear (head included) is swapped inside the context and gives F.linear's values to fp32
    rounding, for decode-sized and prefill-sized inputs; the module forwards are restored afterwards."""
    model, _ = tiny
    model.eval()
    linears = _linears(model)
    ids = torch.randint(0, model.config.vocab_size, (rows, 3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        x = torch.randn(rows, 1, linears[0].in_features)
        ref_x = linears[0](x)
        with onednn_linears(model) as swapped:
            assert swapped == len(linears) and all("forward" in vars(m) for m in linears)
            got = model(input_ids=ids).logits
            got_x = linears[0](x)
    assert all("forward" not in vars(m) for m in linears)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got_x.shape == ref_x.shape
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linears_fall_back_with_grad_and_follow_bias(tiny):
    """With grad enabled the swapped forward is F.linear (gradients flow); a Linear with a bias keeps it."""
    model, _ = tiny
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = lin(x)
    with onednn_linears(lin) as swapped:
        assert swapped == 1
        with torch.no_grad():
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-6)
        out = lin(x)
        out.sum().backward()
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, x.sum(0).expand(5, 8))


def test_onednn_linears_restored_on_error_and_skipped_for_other_dtypes(tiny):
    model, _ = tiny
    linears = _linears(model)
    with pytest.raises(RuntimeError, match="boom"):
        with onednn_linears(model):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in linears)
    model.to(torch.float64)
    with onednn_linears(model) as swapped:
        assert swapped == 0 and all("forward" not in vars(m) for m in linears)  # only fp32 / bf16 weights are packed


@needs_onednn
def test_onednn_linears_pack_bf16_weights_where_the_cpu_has_bf16(tiny):
    from lightning_sd.cpu_linear import packable_dtypes

    model, _ = tiny
    model = model.to(torch.bfloat16).eval()
    linears = _linears(model)
    x = torch.randn(3, linears[0].in_features).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x, linears[0].weight, linears[0].bias)
    with torch.no_grad(), onednn_linears(model) as swapped:
        if torch.bfloat16 not in packable_dtypes():
            assert swapped == 0
            return
        assert swapped == len(linears)
        out = linears[0](x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7)  # bf16 rounding


def test_sampler_logprobs_agree_with_trainer_logits(tiny):
    """Greedy rollouts decoded with the KV cache and the oneDNN linears: the sampler's log-probs equal the
    training-side log-probs of the same tokens, and every token is the trainer's argmax."""
    model, tok = tiny
    model.eval()
    prompt, pmask, _, _ = _batch(rows=4, p=7)
    ro = sample(model, prompt, pmask, SamplingConfig(do_sample=False, max_new_tokens=6, fixed_length=True),
                pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id])
    with torch.no_grad():
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    valid = ro.completion_mask.bool()
    torch.testing.assert_close(picked[valid], ro.logprobs[valid], rtol=1e-4, atol=1e-4)
    assert torch.equal(logp.argmax(-1)[valid], ro.completion_ids[valid])
