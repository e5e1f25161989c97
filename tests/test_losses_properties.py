"""Hypothesis properties of per_token_divergence (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sd.losses import per_token_divergence

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

finite_logit = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False)


@st.composite
def logit_pair(draw, min_v: int = 2, max_v: int = 10, masks: bool = True):
    """Student and teacher logits [N, V]; optionally -inf at shared entries."""
    n = draw(st.integers(1, 3))
    v = draw(st.integers(min_v, max_v))
    s = torch.tensor(draw(st.lists(finite_logit, min_size=n * v, max_size=n * v)), dtype=torch.float64)
    t = torch.tensor(draw(st.lists(finite_logit, min_size=n * v, max_size=n * v)), dtype=torch.float64)
    s, t = s.reshape(n, v), t.reshape(n, v)
    if masks and v > 2:
        masked = draw(st.lists(st.integers(0, v - 1), max_size=v - 2, unique=True))
        s[:, masked] = float("-inf")
        t[:, masked] = float("-inf")
    return s, t


betas = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)
clips = st.sampled_from([None, 0.05, 0.5])
clip_modes = st.sampled_from(["value", "gradient"])
temperatures = st.sampled_from([1.0, 1.1, 0.7])


@st.composite
def support_kwargs(draw, vocab: int):
    support = draw(st.sampled_from(["full", "topk"]))
    if support == "full":
        return {"support": "full"}
    return {
        "support": "topk",
        "top_k": draw(st.integers(1, vocab)),
        "topk_from": draw(st.sampled_from(["student", "teacher"])),
        "tail": draw(st.booleans()),
    }


@SETTINGS
@given(data=st.data(), pair=logit_pair(), beta=betas, clip=clips, mode=clip_modes, temperature=temperatures)
def test_divergence_of_identical_distributions_is_zero(data, pair, beta, clip, mode, temperature):
    s, _ = pair
    kw = data.draw(support_kwargs(s.shape[-1]))
    out = per_token_divergence(
        s, s.clone(), beta=beta, entry_clip=clip, entry_clip_mode=mode, temperature=temperature, **kw
    )
    assert out.abs().max().item() < 1e-9


@SETTINGS
@given(data=st.data(), pair=logit_pair(), beta=betas, temperature=temperatures)
def test_non_negative_without_clip(data, pair, beta, temperature):
    s, t = pair
    kw = data.draw(support_kwargs(s.shape[-1]))
    out = per_token_divergence(s, t, beta=beta, temperature=temperature, **kw)
    assert out.min().item() >= -1e-9


@SETTINGS
@given(data=st.data(), pair=logit_pair(), beta=st.floats(0.01, 0.99), clip=st.sampled_from([0.05, 0.5]))
def test_clipped_jsd_non_negative(data, pair, beta, clip):
    # every JSD entry beta T log(T/M) + (1-beta) S log(S/M) is >= 0 (log-sum inequality),
    # so clamping entries from above keeps the sum >= 0 and <= the unclipped JSD.
    s, t = pair
    kw = data.draw(support_kwargs(s.shape[-1]))
    clipped = per_token_divergence(s, t, beta=beta, entry_clip=clip, entry_clip_mode="value", **kw)
    plain = per_token_divergence(s, t, beta=beta, **kw)
    assert clipped.min().item() >= -1e-9
    assert (clipped <= plain + 1e-9).all()
    assert (clipped <= clip * (s.shape[-1] + 1) + 1e-9).all()


@SETTINGS
@given(data=st.data(), pair=logit_pair(), beta=st.sampled_from([0.0, 1.0]), clip=st.sampled_from([0.05, 0.5]))
def test_clipped_kl_bounds(data, pair, beta, clip):
    # KL entries can be negative (they only sum to >= 0), so a clipped KL can dip below 0;
    # it is bounded by the unclipped KL above and by the sum of negative entries below.
    s, t = pair
    kw = data.draw(support_kwargs(s.shape[-1]))
    clipped = per_token_divergence(s, t, beta=beta, entry_clip=clip, entry_clip_mode="value", **kw)
    plain = per_token_divergence(s, t, beta=beta, **kw)
    assert (clipped <= plain + 1e-9).all()
    assert (clipped >= -1.0 - 1e-9).all()  # sum_v min(p log(p/q), 0) >= -sum_v q  >= -1


@SETTINGS
@given(
    pair=logit_pair(),
    beta=betas,
    clip=clips,
    mode=clip_modes,
    temperature=temperatures,
    tail=st.booleans(),
    topk_from=st.sampled_from(["student", "teacher"]),
)
def test_topk_with_k_equal_vocab_is_full(pair, beta, clip, mode, temperature, tail, topk_from):
    s, t = pair
    common = dict(beta=beta, entry_clip=clip, entry_clip_mode=mode, temperature=temperature)
    full = per_token_divergence(s, t, **common)
    topk = per_token_divergence(s, t, support="topk", top_k=s.shape[-1], tail=tail, topk_from=topk_from, **common)
    torch.testing.assert_close(topk, full, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(pair=logit_pair(masks=False), temperature=temperatures)
def test_forward_kl_equals_kl_div_log_target(pair, temperature):
    s, t = pair
    ls, lt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    expected = torch.stack([F.kl_div(input=a, target=b, log_target=True, reduction="sum") for a, b in zip(ls, lt)])
    out = per_token_divergence(s, t, beta=0.0, temperature=temperature)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # and the reverse KL is the same call with the arguments swapped
    rev = per_token_divergence(s, t, beta=1.0, temperature=temperature)
    expected_rev = torch.stack([F.kl_div(input=b, target=a, log_target=True, reduction="sum") for a, b in zip(ls, lt)])
    torch.testing.assert_close(rev, expected_rev, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(pair=logit_pair(), beta=st.floats(0.01, 0.99))
def test_jsd_is_symmetric_under_swap_of_beta(pair, beta):
    # JSD_beta(T, S) with roles swapped equals JSD_{1-beta}(S, T)
    s, t = pair
    a = per_token_divergence(s, t, beta=beta)
    b = per_token_divergence(t, s, beta=1.0 - beta)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(
    pair=logit_pair(min_v=2, max_v=8),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    beta=betas,
    data=st.data(),
)
def test_large_magnitudes_finite_value_and_grad(pair, scale, beta, data):
    s, t = pair
    s = (s * scale / 30.0).requires_grad_(True)
    t = t * scale / 30.0
    kw = data.draw(support_kwargs(s.shape[-1]))
    out = per_token_divergence(s.float(), t.float(), beta=beta, **kw)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
