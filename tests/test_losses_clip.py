"""The per-entry clip, `entry_clip` with `entry_clip_mode` "value" (OPSD's term clip) and "gradient".

"value" clamps each (token, entry) term from above before the vocabulary sum. "gradient" returns the
unclipped divergence and clamps, per token, its gradient w.r.t. the temperature-scaled student logits to
[-c, c]: no entry's gradient changes sign. The references below are float64 and built from the unclipped
divergence (itself checked against a brute-force loop in test_losses_divergence.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sd.losses import chunked_divergence, entry_terms, fused_full_kl, per_token_divergence
from lightning_sd.losses.support import full_support_logprobs, prepare_logits, topk_support_logprobs

NEG_INF = float("-inf")
CLIP = 0.05

# (support kwargs, betas it takes)
SUPPORTS = {
    "full": (dict(support="full"), (0.0, 1.0, 0.5)),
    "topk-student-tail": (dict(support="topk", top_k=3, topk_from="student", tail=True), (0.0, 1.0, 0.5)),
    "topk-student-notail": (dict(support="topk", top_k=3, topk_from="student", tail=False), (0.0, 1.0, 0.5)),
    "topk-teacher-tail": (dict(support="topk", top_k=4, topk_from="teacher", tail=True), (0.0, 1.0, 0.5)),
    "topk-teacher-notail": (dict(support="topk", top_k=4, topk_from="teacher", tail=False), (0.0, 1.0, 0.5)),
    "sampled": (dict(support="sampled"), (1.0,)),
}
CASES = [(name, beta) for name, (_, betas) in SUPPORTS.items() for beta in betas]


def _pair(seed: int, shape=(2, 3, 7), scale: float = 2.0, masks: bool = True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    if masks:
        s[0, 0, 6] = t[0, 0, 6] = NEG_INF  # masked in both
        t[1, 1, 2] = NEG_INF  # masked in the teacher only
    tokens = torch.randint(0, shape[-1] - 1, shape[:-1], generator=g)
    weights = torch.randn(*shape[:-1], generator=g, dtype=torch.float64) * 2  # non-uniform incoming gradient
    return s, t, tokens, weights


def _kwargs(name: str, beta: float, tokens: torch.Tensor) -> dict:
    kw = dict(SUPPORTS[name][0], beta=beta)
    if kw["support"] == "sampled":
        kw["tokens"] = tokens
    return kw


def _value_clip_reference(s, t, *, beta, support, temperature, clip, top_k=None, topk_from="student", tail=True):
    """Today's published clip from its building blocks: `entry_terms(...).clamp(max=c).sum(-1)`, float64."""
    x = prepare_logits(s, torch.float64, temperature)
    y = prepare_logits(t.detach(), torch.float64, temperature)
    if support == "full":
        log_s, log_t = full_support_logprobs(x), full_support_logprobs(y)
    else:
        index = torch.topk((x if topk_from == "student" else y).detach(), top_k, dim=-1, sorted=False).indices
        log_s, log_t = topk_support_logprobs(x, index, tail), topk_support_logprobs(y, index, tail)
    return entry_terms(log_s, log_t, beta).clamp(max=clip).sum(-1)


def _clipped_gradient_reference(s, t, weights, kw, temperature, clip):
    """Value of the unclipped divergence, and d/ds of `(out * weights).sum()` with each token's gradient
    w.r.t. the scaled logits x = s / temperature clamped to [-clip, clip] (then chained: / temperature)."""
    x = (s.detach() / temperature).requires_grad_(True)
    value = per_token_divergence(x, t / temperature, **kw)  # temperature 1 on pre-scaled logits
    (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), weights[..., None] * g.clamp(-clip, clip) / temperature


# ------------------------------------------------------------------------------------------ value mode
@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("name,beta", [c for c in CASES if c[0] != "sampled"])
def test_value_mode_is_exactly_the_published_term_clip(name, beta, temperature):
    s0, t, tokens, weights = _pair(seed=1)
    kw = _kwargs(name, beta, tokens)
    s1, s2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    out = per_token_divergence(s1, t, temperature=temperature, entry_clip=CLIP, entry_clip_mode="value", **kw)
    ref = _value_clip_reference(s2, t, temperature=temperature, clip=CLIP, **kw)
    assert torch.equal(out, ref)
    assert (out < per_token_divergence(s0, t, temperature=temperature, **kw) - 1e-6).any()  # the clip bites here
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-14)


def test_value_mode_gradient_on_a_clipped_forward_kl_entry_is_student_prob_times_unclipped_teacher_mass():
    """Through the softmax, the unclipped terms give a clipped entry's logit the gradient S_j * M (M = teacher
    mass on unclipped entries): positive, so gradient descent pushes the clipped entries down."""
    s0, t, _, _ = _pair(seed=2, shape=(64, 9), masks=False)
    s = s0.clone().requires_grad_(True)
    out = per_token_divergence(s, t, beta=0.0, entry_clip=CLIP, entry_clip_mode="value")
    out.sum().backward()
    log_s, log_t = torch.log_softmax(s0, -1), torch.log_softmax(t, -1)
    clipped = torch.exp(log_t) * (log_t - log_s) > CLIP
    mass = (torch.exp(log_t) * ~clipped).sum(-1, keepdim=True)
    expected = torch.exp(log_s) * mass
    assert clipped.sum() > 20
    torch.testing.assert_close(s.grad[clipped], expected.expand_as(s0)[clipped], rtol=1e-10, atol=1e-14)
    assert (s.grad[clipped] > 0).all()


# --------------------------------------------------------------------------------------- gradient mode
@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("name,beta", CASES)
def test_gradient_mode_keeps_the_value_and_clamps_the_gradient(name, beta, temperature):
    s0, t, tokens, weights = _pair(seed=3)
    kw = _kwargs(name, beta, tokens)
    s = s0.clone().requires_grad_(True)
    out = per_token_divergence(s, t, temperature=temperature, entry_clip=CLIP, entry_clip_mode="gradient", **kw)
    value, grad = _clipped_gradient_reference(s0, t, weights, kw, temperature, CLIP)
    assert torch.equal(out.detach(), per_token_divergence(s0, t, temperature=temperature, **kw))
    torch.testing.assert_close(out.detach(), value, rtol=1e-12, atol=1e-12)
    (out * weights).sum().backward()
    torch.testing.assert_close(s.grad, grad, rtol=1e-10, atol=1e-13)
    assert torch.isfinite(s.grad).all()
    # the clip bites: some entries are bounded, so the gradient differs from the unclipped one
    x = (s0 / temperature).requires_grad_(True)
    (g,) = torch.autograd.grad(per_token_divergence(x, t / temperature, **kw).sum(), x)
    assert (g.abs() > CLIP).any()


def test_gradient_mode_is_the_default():
    s0, t, _, weights = _pair(seed=4)
    grads = []
    for extra in ({}, {"entry_clip_mode": "gradient"}):
        s = s0.clone().requires_grad_(True)
        (per_token_divergence(s, t, beta=0.5, entry_clip=CLIP, **extra) * weights).sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_and_composed_gradient_clip_agree(beta, temperature, dtype, monkeypatch):
    """`support="full"` with beta 0/1 runs through fused_full_kl(grad_clip=c); top-k with k = V and a tail
    bucket is the same divergence through the composed surrogate. Several row chunks, masked entries."""
    import lightning_sd.losses.fused as fused

    monkeypatch.setattr(fused, "CHUNK_ENTRIES", 3 * 11)
    s0, t, _, weights = _pair(seed=5, shape=(2, 5, 11))
    s0, t = s0.to(dtype), t.to(dtype)
    s0[1, 2, 4] = NEG_INF  # student-only mask
    kw = dict(beta=beta, temperature=temperature, entry_clip=CLIP, entry_clip_mode="gradient")
    s1, s2, s3 = (s0.clone().requires_grad_(True) for _ in range(3))
    via_route = per_token_divergence(s1, t, **kw)
    via_fused = fused_full_kl(s2, t, beta, temperature, grad_clip=CLIP)
    composed = per_token_divergence(s3, t, support="topk", top_k=11, tail=True, **kw)
    assert via_route.grad_fn is not None and "Fused" in type(via_route.grad_fn).__name__
    assert "Fused" not in type(composed.grad_fn).__name__
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_route, composed, **tol)
    torch.testing.assert_close(via_fused, via_route, rtol=0, atol=0)
    for out, s in ((via_route, s1), (via_fused, s2), (composed, s3)):
        (out * weights.to(out.dtype)).sum().backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    torch.testing.assert_close(s1.grad, s3.grad, **tol)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)
    assert s1.grad[1, 2, 4].item() == 0.0  # the masked logit gets no gradient
    assert s1.grad.float().abs().max().item() <= CLIP / temperature * max(weights.abs().max().item(), 1) + 1e-3


def test_fused_grad_clip_validation():
    s = torch.randn(2, 5)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="grad_clip"):
            fused_full_kl(s, s, 0.0, grad_clip=bad)


@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("name,beta", [("full", 0.0), ("full", 1.0), ("full", 0.5), ("topk-student-tail", 0.5),
                                       ("topk-teacher-notail", 0.0), ("sampled", 1.0)])
def test_chunked_gradient_clip_matches_the_unchunked_path(name, beta, chunk_size):
    g = torch.Generator().manual_seed(6)
    n, hd, hd_t, v = 10, 5, 4, 9
    h0 = torch.randn(n, hd, generator=g, dtype=torch.float64) * 2
    w0 = torch.randn(v, hd, generator=g, dtype=torch.float64)
    b0 = torch.randn(v, generator=g, dtype=torch.float64)
    th = torch.randn(n, hd_t, generator=g, dtype=torch.float64) * 2
    tw = torch.randn(v, hd_t, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,), generator=g)
    weights = torch.randn(n, generator=g, dtype=torch.float64)
    kw = dict(_kwargs(name, beta, tokens), temperature=1.1, entry_clip=CLIP, entry_clip_mode="gradient")

    h, w, b = (x.clone().requires_grad_(True) for x in (h0, w0, b0))
    naive = per_token_divergence(h @ w.T + b, th @ tw.T, **kw)
    (naive * weights).sum().backward()
    h2, w2, b2 = (x.clone().requires_grad_(True) for x in (h0, w0, b0))
    out = chunked_divergence(h2, w2, th, tw, chunk_size=chunk_size, student_bias=b2, **kw)
    (out * weights).sum().backward()

    torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
    for got, ref in ((h2.grad, h.grad), (w2.grad, w.grad), (b2.grad, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # and it is the clipped gradient, not the unclipped one
    h3 = h0.clone().requires_grad_(True)
    (chunked_divergence(h3, w0, th, tw, chunk_size=chunk_size, **dict(kw, entry_clip=None)) * weights).sum().backward()
    h4 = h0.clone().requires_grad_(True)
    (chunked_divergence(h4, w0, th, tw, chunk_size=chunk_size, **kw) * weights).sum().backward()
    assert not torch.allclose(h3.grad, h4.grad)


def test_chunked_rejects_an_unknown_clip_mode():
    h = torch.randn(3, 4)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"entry_clip_mode.*'value', 'gradient'"):
        chunked_divergence(h, w, h, w, entry_clip=0.1, entry_clip_mode="term")


# --------------------------------------------------------------------------------- sign of the gradient
def _random_pair(g: torch.Generator):
    """One student/teacher pair, vocabulary 2-50, each model flat or peaked (float64 logits)."""
    v = int(torch.randint(2, 51, (1,), generator=g))

    def logits():
        kind = int(torch.randint(0, 3, (1,), generator=g))
        z = torch.randn(v, generator=g, dtype=torch.float64)
        if kind == 0:  # flat
            return z * 0.1
        if kind == 1:  # spread
            return z * 2.0
        z[int(torch.randint(0, v, (1,), generator=g))] += 4.0 + 4.0 * float(torch.rand(1, generator=g))  # peaked
        return z

    return logits(), logits()


def _grad(s, t, **kw):
    x = s.clone()[None].requires_grad_(True)
    (g,) = torch.autograd.grad(per_token_divergence(x, t[None], **kw).sum(), x)
    return g[0]


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("support", ["full", "topk"])
def test_gradient_mode_never_reverses_an_entry_over_a_random_sweep(beta, support):
    g = torch.Generator().manual_seed(7)
    bounded = 0
    for _ in range(150):
        s, t = _random_pair(g)
        clip = float(torch.empty(1).uniform_(0.01, 0.3, generator=g))
        kw = dict(beta=beta)
        if support == "topk":
            kw.update(support="topk", top_k=max(1, s.numel() // 2), tail=bool(torch.rand(1, generator=g) < 0.5))
        plain = _grad(s, t, **kw)
        clipped = _grad(s, t, entry_clip=clip, entry_clip_mode="gradient", **kw)
        assert (clipped * plain >= 0).all()  # same sign, or zero
        assert (clipped.abs() <= clip).all()
        torch.testing.assert_close(clipped, plain.clamp(-clip, clip), rtol=1e-10, atol=1e-14)
        bounded += int((plain.abs() > clip).sum())
    assert bounded > 20  # the sweep does reach the clip


def test_value_mode_reverses_entries_somewhere_in_the_same_sweep():
    g = torch.Generator().manual_seed(7)
    reversed_ = 0
    for _ in range(150):
        s, t = _random_pair(g)
        clip = float(torch.empty(1).uniform_(0.01, 0.3, generator=g))
        plain = _grad(s, t, beta=0.0)
        value = _grad(s, t, beta=0.0, entry_clip=clip, entry_clip_mode="value")
        reversed_ += int(((value * plain) < -1e-15).sum())
    assert reversed_ > 10


# T = (0.9, 0.05, 0.05), S = (0.2, 0.4, 0.4), clip 0.05, forward KL. Entry 0's term 0.9 ln 4.5 = 1.354 is clipped;
# the others, 0.05 ln(0.125) = -0.104, are not, so M = 0.1 and the value-clip gradient on logit 0 is
# S_0 * M = +0.02 (pushed down) while the teacher prefers it (T_0 > S_0); the unclipped gradient is S_0 - T_0 = -0.7.
HAND_T = (0.9, 0.05, 0.05)
HAND_S = (0.2, 0.4, 0.4)


def _hand():
    return (torch.tensor(HAND_S, dtype=torch.float64).log(), torch.tensor(HAND_T, dtype=torch.float64).log())


def test_hand_made_value_clip_pushes_the_teacher_preferred_entry_down_and_gradient_clip_does_not():
    s, t = _hand()
    value = _grad(s, t, beta=0.0, entry_clip=CLIP, entry_clip_mode="value")
    assert value[0].item() == pytest.approx(0.2 * 0.1, abs=1e-12)  # > 0 although T_0 > S_0
    assert value[1].item() == pytest.approx(-0.05 + 0.4 * 0.1, abs=1e-12)
    gradient = _grad(s, t, beta=0.0, entry_clip=CLIP, entry_clip_mode="gradient")
    torch.testing.assert_close(gradient, torch.tensor([-CLIP, CLIP, CLIP], dtype=torch.float64))
    # the value clip's loss is negative; the gradient clip logs the (positive) unclipped KL
    value_loss = per_token_divergence(s[None], t[None], beta=0.0, entry_clip=CLIP, entry_clip_mode="value").item()
    assert value_loss == pytest.approx(CLIP + 2 * 0.05 * math.log(0.05 / 0.4), abs=1e-12)
    assert value_loss < 0
    kl = 0.9 * math.log(0.9 / 0.2) + 2 * 0.05 * math.log(0.05 / 0.4)
    assert per_token_divergence(s[None], t[None], beta=0.0, entry_clip=CLIP).item() == pytest.approx(kl, abs=1e-12)


# ------------------------------------------------------- one step on the teacher's argmax entry (forward KL)
def _step_prob(s: torch.Tensor, t: torch.Tensor, entry: int, eta: float, **kw) -> tuple[float, float]:
    """S(entry) before and after one gradient-descent step of size eta on the logits (temperature 1)."""
    grad = _grad(s, t, beta=0.0, **kw)
    before = torch.softmax(s, -1)[entry].item()
    after = torch.softmax(s - eta * grad, -1)[entry].item()
    return before, after


@pytest.mark.parametrize("clip", [0.05, 0.2])
def test_gradient_clip_step_never_lowers_the_teacher_argmax_when_its_surplus_reaches_the_clip(clip):
    """If a = argmax T has T_a - S_a >= c, its gradient S_a - T_a is clamped to -c <= every other clamped
    entry, so E_S[g] >= g_a and d log S_a = -eta (g_a - E_S[g]) >= 0: a small step never lowers S_a."""
    g = torch.Generator().manual_seed(8)
    in_regime = value_lowers = 0
    for _ in range(400):
        s, t = _random_pair(g)
        ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
        a = int(pt.argmax())
        if pt[a] - ps[a] < clip:
            continue
        in_regime += 1
        grad = _grad(s, t, beta=0.0, entry_clip=clip, entry_clip_mode="gradient")
        assert grad[a].item() == pytest.approx(-clip, abs=1e-15) and (grad >= grad[a]).all()
        assert -(grad[a] - (ps * grad).sum()).item() >= 0  # first-order change of log S_a, per unit step
        for eta in (1e-3, 1e-1, 1.0):
            before, after = _step_prob(s, t, a, eta, entry_clip=clip, entry_clip_mode="gradient")
            assert after >= before, (eta, ps, pt)
        before, after = _step_prob(s, t, a, 1e-2, entry_clip=clip, entry_clip_mode="value")
        value_lowers += after < before
    assert in_regime > 60
    assert value_lowers > 0  # the value clip does lower S_a on some of the same pairs


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_gradient_clip_step_never_lowers_an_entry_at_the_lower_bound_for_any_divergence(beta):
    """The argument above uses only g_k = -c = min(g): after z' = z - eta g, entry k's logit rose by eta c and
    no other logit rose by more, so S_k cannot fall, for any step size."""
    g = torch.Generator().manual_seed(9)
    at_bound = 0
    for _ in range(200):
        s, t = _random_pair(g)
        clip = 0.02
        grad = _grad(s, t, beta=beta, entry_clip=clip, entry_clip_mode="gradient")
        for k in (grad <= -clip).nonzero().flatten().tolist():
            at_bound += 1
            for eta in (1e-2, 1.0, 10.0):
                assert torch.softmax(s - eta * grad, -1)[k] >= torch.softmax(s, -1)[k] * (1 - 1e-12)
    assert at_bound > 30


def test_value_clip_step_lowers_the_teacher_argmax_on_the_hand_made_pair():
    s, t = _hand()  # a = 0, T_0 - S_0 = 0.7 >= c
    before, after = _step_prob(s, t, 0, 1e-2, entry_clip=CLIP, entry_clip_mode="value")
    assert after < before
    before, after = _step_prob(s, t, 0, 1e-2, entry_clip=CLIP, entry_clip_mode="gradient")
    assert after > before


def test_even_the_exact_kl_can_lower_the_teacher_argmax_that_the_student_underweights():
    """The literal property "a step never lowers S(argmax T) when T gives it more mass than S" fails for the
    unclipped forward KL itself: entry 0 has the larger surplus (0.406 - 0.306), takes mass, and S_2 falls
    although T_2 > S_2. Its surplus (0.017) is below the clip, so the gradient clip behaves the same."""
    t = torch.tensor([0.406, 0.005, 0.588], dtype=torch.float64).log()
    s = torch.tensor([0.306, 0.123, 0.571], dtype=torch.float64).log()
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    assert int(pt.argmax()) == 2 and pt[2] > ps[2]
    for kw in ({}, dict(entry_clip=CLIP, entry_clip_mode="gradient")):
        for eta in (1e-3, 1e-1):
            before, after = _step_prob(s, t, 2, eta, **kw)
            assert after < before, kw


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("mode", ["gradient", "value"])
def test_clipped_teacher_mass_counts_the_teachers_mass_on_bounded_entries(beta, mode):
    """The diagnostic against a float64 reference: gradient mode counts entries whose unclipped gradient on the
    student logit exceeds c in magnitude (closed form for beta 0/1, autograd otherwise); value mode entries
    whose term exceeds c."""
    from lightning_sd.losses import clipped_teacher_mass

    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 2)
    t = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 2)
    c = 0.03
    mass = clipped_teacher_mass(s, t, beta=beta, entry_clip=c, entry_clip_mode=mode)
    p_t = t.softmax(-1)
    if mode == "gradient":
        z = s.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(per_token_divergence(z, t, beta=beta).sum(), z)
        expected = (p_t * (grad.abs() > c)).sum(-1)
    else:
        expected = (p_t * (entry_terms(s.log_softmax(-1), t.log_softmax(-1), beta) > c)).sum(-1)
    torch.testing.assert_close(mass, expected)
    assert 0 < float(mass.mean()) < 1
    assert torch.all(clipped_teacher_mass(s, t, beta=beta, entry_clip=None) == 0)
