"""per_token_divergence against an independent float64 brute-force reference, plus pins.

The reference below uses plain Python loops and math.exp/math.log over every token and
vocabulary entry; it shares no code with lightning_sd.losses.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_sd.losses import MASKED_LOGIT, fused_full_kl, per_token_divergence

NEG_INF = float("-inf")
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
# (support, topk_from, tail)
SUPPORTS = (
    ("full", None, None),
    ("topk", "student", True),
    ("topk", "student", False),
    ("topk", "teacher", True),
    ("topk", "teacher", False),
)
TOP_K = 3


# ---------------------------------------------------------------- brute-force reference
def _ref_logprobs(xs: list[float]) -> list[float]:
    """log softmax with plain math; -inf logits give -inf."""
    m = max(xs)
    z = 0.0
    for x in xs:
        if x != NEG_INF:
            z += math.exp(x - m)
    lse = m + math.log(z)
    return [NEG_INF if x == NEG_INF else x - lse for x in xs]


def _ref_log(p: float) -> float:
    return math.log(p) if p > 0 else NEG_INF


def _p_log_ratio(p: float, lp: float, lq: float) -> float:
    """p * (log p - log q) with 0 log 0 = 0 and p log(p/0) = +inf."""
    if p == 0.0:
        return 0.0
    if lq == NEG_INF:
        return math.inf
    return p * (lp - lq)


def _ref_entry(ps: float, lps: float, pt: float, lpt: float, beta: float) -> float:
    if beta == 0.0:
        return _p_log_ratio(pt, lpt, lps)
    if beta == 1.0:
        return _p_log_ratio(ps, lps, lpt)
    pm = beta * pt + (1.0 - beta) * ps
    lpm = _ref_log(pm)
    return beta * _p_log_ratio(pt, lpt, lpm) + (1.0 - beta) * _p_log_ratio(ps, lps, lpm)


def ref_token(
    s_logits: list[float],
    t_logits: list[float],
    *,
    beta: float,
    support: str,
    top_k: int | None,
    topk_from: str | None,
    tail: bool | None,
    temperature: float,
    entry_clip: float | None,
    floor: bool = False,
) -> float:
    """Divergence of one token; floor=True mimics the documented -inf -> MASKED_LOGIT rule."""
    s = [x / temperature for x in s_logits]
    t = [x / temperature for x in t_logits]
    if floor:
        s = [max(x, MASKED_LOGIT) for x in s]
        t = [max(x, MASKED_LOGIT) for x in t]
    ls, lt = _ref_logprobs(s), _ref_logprobs(t)
    V = len(s)
    if support == "full":
        entries = [(math.exp(ls[v]), ls[v], math.exp(lt[v]), lt[v]) for v in range(V)]
    else:
        source = s if topk_from == "student" else t
        idx = sorted(range(V), key=lambda v: source[v], reverse=True)[:top_k]
        rest = [v for v in range(V) if v not in idx]
        ps = [math.exp(ls[v]) for v in idx]
        pt = [math.exp(lt[v]) for v in idx]
        if tail:
            entries = [(ps[i], ls[v], pt[i], lt[v]) for i, v in enumerate(idx)]
            # leftover mass = 1 - sum(support probs), summed directly over the complement
            ps_tail = sum(math.exp(ls[v]) for v in rest)
            pt_tail = sum(math.exp(lt[v]) for v in rest)
            entries.append((ps_tail, _ref_log(ps_tail), pt_tail, _ref_log(pt_tail)))
        else:
            zs, zt = sum(ps), sum(pt)
            entries = []
            for i, v in enumerate(idx):
                qs, qt = ps[i] / zs, pt[i] / zt
                # log of the renormalized probability, from logits (exact for tiny p)
                lqs = NEG_INF if ls[v] == NEG_INF else ls[v] - math.log(zs)
                lqt = NEG_INF if lt[v] == NEG_INF else lt[v] - math.log(zt)
                entries.append((qs, lqs, qt, lqt))
    total = 0.0
    for ps_, lps_, pt_, lpt_ in entries:
        term = _ref_entry(ps_, lps_, pt_, lpt_, beta)
        if entry_clip is not None:
            term = min(term, entry_clip)
        total += term
    return total


def _logits_with_masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 1.5
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 1.5
    s[0, 0, 6] = t[0, 0, 6] = NEG_INF  # masked in both
    t[0, 1, 2] = NEG_INF  # masked in the teacher only (reverse KL infinite there)
    s[1, 0, 4] = NEG_INF  # masked in the student only (forward KL infinite there)
    s[1, 2, 1] = t[1, 2, 1] = NEG_INF  # two entries masked in both
    s[1, 2, 3] = t[1, 2, 3] = NEG_INF
    return s, t


def _check_against_reference(s, t, call_kw, ref_kw):
    out = per_token_divergence(s, t, **call_kw)
    assert out.dtype == torch.float64 and out.shape == s.shape[:-1]
    assert torch.isfinite(out).all()
    for b, i in itertools.product(range(s.shape[0]), range(s.shape[1])):
        sl, tl = s[b, i].tolist(), t[b, i].tolist()
        ref = ref_token(sl, tl, **ref_kw)
        got = out[b, i].item()
        if math.isfinite(ref):
            assert got == pytest.approx(ref, abs=1e-6, rel=1e-6), (b, i, call_kw)
        else:  # mathematically infinite: the documented finite floor
            floored = ref_token(sl, tl, floor=True, **ref_kw)
            assert got > 100.0
            assert got == pytest.approx(floored, rel=1e-9), (b, i, call_kw)


@pytest.mark.parametrize("entry_clip", [None, 0.05])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("support,topk_from,tail", SUPPORTS)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_bruteforce_reference(beta, support, topk_from, tail, temperature, entry_clip):
    s, t = _logits_with_masks(seed=int(beta * 10) + (7 if temperature != 1.0 else 0))
    call_kw = dict(beta=beta, support=support, temperature=temperature, entry_clip=entry_clip)
    if support == "topk":
        call_kw.update(top_k=TOP_K, topk_from=topk_from, tail=tail)
    ref_kw = dict(call_kw, top_k=call_kw.get("top_k"), topk_from=topk_from, tail=tail)
    # the reference clamps each entry's term: the published ("value") clip
    _check_against_reference(s, t, dict(call_kw, entry_clip_mode="value"), ref_kw)


def test_reference_without_masks_float32_input():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 5, 11, generator=g)
    t = torch.randn(4, 5, 11, generator=g)
    out = per_token_divergence(
        s, t, beta=0.5, support="topk", top_k=4, temperature=1.1, entry_clip=0.05, entry_clip_mode="value"
    )
    assert out.dtype == torch.float32
    for b, i in itertools.product(range(4), range(5)):
        ref = ref_token(
            s[b, i].double().tolist(), t[b, i].double().tolist(), beta=0.5, support="topk", top_k=4,
            topk_from="student", tail=True, temperature=1.1, entry_clip=0.05,
        )  # fmt: skip
        assert out[b, i].item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("entry_clip", [None, 0.05])
def test_sampled_matches_reference_and_surrogate_gradient(temperature, entry_clip):
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 1.5
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    out = per_token_divergence(
        s, t, beta=1.0, support="sampled", tokens=tokens, temperature=temperature, entry_clip=entry_clip,
        entry_clip_mode="value",
    )  # fmt: skip
    for b, i in itertools.product(range(2), range(3)):
        y = tokens[b, i].item()
        ls = _ref_logprobs([x / temperature for x in s[b, i].tolist()])
        lt = _ref_logprobs([x / temperature for x in t[b, i].tolist()])
        ref = ls[y] - lt[y]
        if entry_clip is not None:
            ref = min(ref, entry_clip)
        assert out[b, i].item() == pytest.approx(ref, abs=1e-9)
    weights = torch.randn(2, 3, dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad((out * weights).sum(), s)
    log_s_y = torch.log_softmax(s / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    log_t_y = torch.log_softmax(t / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = log_s_y - log_t_y
    if entry_clip is not None:
        adv = adv.clamp(max=entry_clip)
    (expected,) = torch.autograd.grad((adv.detach() * log_s_y * weights).sum(), s)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_sampled_rejects_other_beta(beta):
    s = torch.randn(1, 2, 5)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"beta.*support|support.*beta"):
        per_token_divergence(s, s, beta=beta, support="sampled", tokens=tokens)


# ---------------------------------------------------------------- hand-computed pins
# T = (0.5, 0.3, 0.2), S = (0.2, 0.5, 0.3); logits are the log-probabilities.
# forward KL(T||S) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3)
#                  = 0.458145366 - 0.153247687 - 0.081093022 = 0.223804657
# reverse KL(S||T) = 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.2)
#                  = -0.183258146 + 0.255412812 + 0.121639532 = 0.193794198
# JSD(0.5), M = (0.35, 0.4, 0.25): 0.5 KL(T||M) + 0.5 KL(S||M) = 0.050874613
FORWARD_KL = 0.223804657
REVERSE_KL = 0.193794198
JSD_HALF = 0.050874613


def _hand_logits():
    t = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]], dtype=torch.float64)
    s = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    return s, t


def test_forward_kl_pinned_by_hand():
    s, t = _hand_logits()
    assert per_token_divergence(s, t, beta=0.0).item() == pytest.approx(FORWARD_KL, abs=1e-9)


def test_reverse_kl_pinned_by_hand():
    s, t = _hand_logits()
    assert per_token_divergence(s, t, beta=1.0).item() == pytest.approx(REVERSE_KL, abs=1e-9)


def test_jsd_pinned_by_hand():
    s, t = _hand_logits()
    assert per_token_divergence(s, t, beta=0.5).item() == pytest.approx(JSD_HALF, abs=1e-9)


def test_forward_kl_is_torch_kl_div_with_log_target():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    ref = F.kl_div(
        input=torch.log_softmax(s, -1), target=torch.log_softmax(t, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(per_token_divergence(s, t, beta=0.0), ref, rtol=1e-12, atol=1e-12)
    # and per token with reduction='sum'
    for b, i in itertools.product(range(3), range(4)):
        one = F.kl_div(
            input=torch.log_softmax(s[b, i], -1), target=torch.log_softmax(t[b, i], -1),
            log_target=True, reduction="sum",
        )  # fmt: skip
        assert per_token_divergence(s[b, i][None], t[b, i][None]).item() == pytest.approx(one.item(), abs=1e-12)


def test_clipped_forward_kl_can_be_negative():
    # T = (0.9, 0.1), S = (0.1, 0.9): entries 0.9 ln 9 = 1.977 -> clipped to 0.05, 0.1 ln(1/9) = -0.2197
    t = torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=torch.float64)
    s = torch.tensor([[math.log(0.1), math.log(0.9)]], dtype=torch.float64)
    out = per_token_divergence(s, t, beta=0.0, entry_clip=0.05, entry_clip_mode="value").item()
    assert out == pytest.approx(0.05 + 0.1 * math.log(0.1 / 0.9), abs=1e-12)


def test_documented_floor_for_student_masked_entry():
    # teacher puts mass 0.25 on an entry the student masks: KL is +inf, we return the floor value
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0, NEG_INF]], dtype=torch.float64, requires_grad=True)
    out = per_token_divergence(s, t, beta=0.0)
    # three entries: 0.25 ln(0.25 / (1/3)); masked entry: 0.25 (ln 0.25 - (MASKED_LOGIT - ln 3))
    expected = 3 * 0.25 * math.log(0.75) + 0.25 * (math.log(0.25) - (MASKED_LOGIT - math.log(3.0)))
    assert out.item() == pytest.approx(expected, rel=1e-12)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 3].item() == 0.0


# ---------------------------------------------------------------- robustness
def _extreme_inputs(dtype):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3, 4, 16, generator=g, dtype=torch.float64) * 1e4
    t = torch.randn(3, 4, 16, generator=g, dtype=torch.float64) * 1e4
    s[0, 0, :3] = NEG_INF  # student-only masks
    t[0, 1, 5:9] = NEG_INF  # teacher-only masks
    s[1, 0, 2] = t[1, 0, 2] = NEG_INF  # both
    s[1, 1] = 0.0  # all student mass on one token
    s[1, 1, 7] = 1e4
    t[1, 1] = -1e4
    t[1, 1, 3] = 1e4
    s[2, 0] = NEG_INF  # fully masked rows
    t[2, 1] = NEG_INF
    s[2, 2] = 0.0  # identical peaked rows: support holds ~all the mass
    s[2, 2, 0] = 1e4
    t[2, 2] = s[2, 2]
    return s.to(dtype), t.to(dtype)


MODES = [
    dict(beta=0.0),
    dict(beta=1.0),
    dict(beta=0.5),
    dict(beta=0.1, entry_clip=0.05, entry_clip_mode="value", temperature=1.1),
    dict(beta=0.1, entry_clip=0.05, entry_clip_mode="gradient", temperature=1.1),
    dict(beta=0.0, entry_clip=0.05, entry_clip_mode="gradient"),
    dict(beta=1.0, entry_clip=0.05, entry_clip_mode="gradient", temperature=1.1),
    dict(beta=0.0, support="topk", top_k=3),
    dict(beta=1.0, support="topk", top_k=3, topk_from="teacher"),
    dict(beta=0.5, support="topk", top_k=3, tail=False),
    dict(beta=0.9, support="topk", top_k=16, tail=True),
    dict(beta=0.0, support="topk", top_k=1, tail=True, entry_clip=0.05, entry_clip_mode="value"),
    dict(beta=0.5, support="topk", top_k=3, tail=False, entry_clip=0.05, entry_clip_mode="gradient"),
    dict(beta=1.0, support="sampled"),
    dict(beta=1.0, support="sampled", entry_clip=0.05, entry_clip_mode="gradient"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_extreme_inputs_finite_value_and_grad(mode, dtype):
    s, t = _extreme_inputs(dtype)
    s.requires_grad_(True)
    t.requires_grad_(True)
    tokens = torch.arange(12).reshape(3, 4) % 16
    out = per_token_divergence(s, t, tokens=tokens, **mode)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(s.grad.float()).all()
    assert t.grad is None  # the teacher never gets a gradient
    if mode.get("support") != "sampled":
        assert out[2, 2].abs().item() < 1e-6  # identical peaked distributions


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_teacher_gets_no_grad(mode):
    s = torch.randn(2, 3, 16, requires_grad=True)
    t = torch.randn(2, 3, 16, requires_grad=True)
    out = per_token_divergence(s, t, tokens=torch.zeros(2, 3, dtype=torch.long), **mode)
    assert not any(n is t for n in _graph_leaves(out))
    out.sum().backward()
    assert t.grad is None and s.grad is not None


def _graph_leaves(out):
    seen, stack, leaves = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def test_two_dim_input_and_dtypes():
    s = torch.randn(5, 9, dtype=torch.float16)
    t = torch.randn(5, 9, dtype=torch.bfloat16)
    out = per_token_divergence(s, t, beta=0.5)
    assert out.shape == (5,) and out.dtype == torch.float32
    out64 = per_token_divergence(s.double(), t.float(), beta=0.5)
    assert out64.dtype == torch.float64


# ---------------------------------------------------------------- gradcheck (float64)
GRAD_MODES = {
    "full-fkl": dict(beta=0.0),
    "full-rkl": dict(beta=1.0),
    "full-jsd": dict(beta=0.3),
    "topk-tail": dict(beta=0.5, support="topk", top_k=3, tail=True),
    "topk-notail": dict(beta=0.0, support="topk", top_k=3, tail=False),
    "topk-teacher-tail": dict(beta=1.0, support="topk", top_k=2, topk_from="teacher"),
    # the value clip is a function of the logits; the gradient clip is not a gradient of its value
    "clip": dict(beta=0.0, entry_clip=0.05, entry_clip_mode="value", temperature=1.1),
    "jsd-clip-topk": dict(beta=0.7, entry_clip=0.02, entry_clip_mode="value", support="topk", top_k=4),
}


@pytest.mark.parametrize("name", list(GRAD_MODES))
def test_gradcheck(name):
    g = torch.Generator().manual_seed(21)
    s = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    t[0, 0, 1] = NEG_INF
    t[1, 2, 5] = NEG_INF
    assert torch.autograd.gradcheck(lambda x: per_token_divergence(x, t, **GRAD_MODES[name]), (s,))


def test_gradcheck_masked_student_entries():
    g = torch.Generator().manual_seed(22)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64)
    s[0, 2] = NEG_INF
    s.requires_grad_(True)
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    t[0, 2] = NEG_INF
    for beta in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(lambda x: per_token_divergence(x, t, beta=beta), (s,))


@pytest.mark.parametrize("entry_clip", [None, 0.05])
def test_gradcheck_sampled_surrogate(entry_clip):
    """Sampled support: the gradient is that of adv.detach() * log S(y), not of the value.

    gradcheck is run on f(s) = out - out.detach() + (adv0 * log S(y; s)).detach()
    where adv0 is the (fixed) advantage at the base point: its numerical Jacobian is
    adv0 * d log S(y) / ds, its analytical one is our backward.
    """
    g = torch.Generator().manual_seed(23)
    s0 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 3), generator=g)
    kw = dict(beta=1.0, support="sampled", tokens=y, temperature=1.1, entry_clip=entry_clip, entry_clip_mode="value")
    adv0 = per_token_divergence(s0, t, **kw).detach()

    def ref_log_s_y(x):
        return torch.log_softmax(x / 1.1, -1).gather(-1, y[..., None]).squeeze(-1)

    def f(x):
        out = per_token_divergence(x, t, **kw)
        return out - out.detach() + (adv0 * ref_log_s_y(x)).detach()

    assert torch.autograd.gradcheck(f, (s0.clone().requires_grad_(True),))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(support="dense"), "unknown support"),
        (dict(support="topk"), "top_k"),
        (dict(support="topk", top_k=0), "top_k"),
        (dict(support="topk", top_k=6), "top_k"),
        (dict(support="topk", top_k=2, topk_from="both"), "topk_from"),
        (dict(beta=1.5), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(entry_clip=-1.0), "entry_clip"),
        (dict(entry_clip=0.05, entry_clip_mode="both"), r"entry_clip_mode.*'value', 'gradient'"),
        (dict(entry_clip_mode=None), "entry_clip_mode"),
        (dict(beta=1.0, support="sampled"), "tokens"),
    ],
)
def test_validation_errors(kwargs, match):
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=match):
        per_token_divergence(s, s.clone(), **kwargs)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 6\)"):
        per_token_divergence(torch.randn(2, 3, 5), torch.randn(2, 3, 6))


def test_sampled_tokens_shape_checked():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="tokens"):
        per_token_divergence(s, s, beta=1.0, support="sampled", tokens=torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- fused full-vocabulary KL
def _composed(s, t, beta, temperature):
    """The composed path (prepare -> log_softmax -> entry_terms -> sum) that fused_full_kl replaces."""
    from lightning_sd.losses import entry_terms
    from lightning_sd.losses.support import compute_dtype, prepare_logits

    dtype = compute_dtype(s, t)
    log_s = prepare_logits(s, dtype, temperature).log_softmax(-1)
    log_t = prepare_logits(t.detach(), dtype, temperature).log_softmax(-1)
    return entry_terms(log_s, log_t, beta).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_full_kl_equals_composed_path_over_several_row_chunks(beta, temperature, dtype, monkeypatch):
    """Value and gradient of fused_full_kl equal the composed path's, with masked (-inf) entries in either
    model, across row-chunk boundaries (chunks of 3 rows here)."""
    import lightning_sd.losses.fused as fused

    monkeypatch.setattr(fused, "CHUNK_ENTRIES", 3 * 11)
    g = torch.Generator().manual_seed(5)
    s0 = (torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 2).to(dtype)
    s0[0, 1, 3] = NEG_INF
    t[1, 4, 0] = NEG_INF
    s0[1, 2, 7] = NEG_INF
    t[1, 2, 7] = NEG_INF
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    s1, s2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    got = fused.fused_full_kl(s1, t, beta, temperature)
    ref = _composed(s2, t, beta, temperature)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == ref.dtype and got.shape == (2, 5)
    torch.testing.assert_close(got, ref, **tol)
    (got * w.to(got.dtype)).sum().backward()
    (ref * w.to(ref.dtype)).sum().backward()
    assert s1.grad.dtype == dtype
    torch.testing.assert_close(s1.grad, s2.grad, **tol)


@pytest.mark.parametrize("dtype, keeps_inputs", [(torch.float32, False), (torch.bfloat16, True)])
def test_fused_full_kl_keeps_the_logits_alive_only_when_they_are_smaller_than_its_derivative(dtype, keeps_inputs):
    """float32 student logits: the loss saves its [N, V] derivative, so once the caller drops the logits nothing
    holds them (the memory is free before backward); bf16 logits are saved as they are (half the size of a
    float32 derivative). Either way backward gives the composed path's gradient."""
    import weakref

    g = torch.Generator().manual_seed(3)
    leaf = torch.randn(3, 4, 64, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(3, 4, 64, generator=g).to(dtype)
    logits = leaf * 2  # a non-leaf, like the output layer's; the product keeps none of its output
    alive = weakref.ref(logits)
    value = fused_full_kl(logits, t, 0.0, 1.3)
    del logits
    assert (alive() is not None) == keeps_inputs
    value.sum().backward()
    ref_leaf = leaf.detach().clone().requires_grad_(True)
    _composed(ref_leaf * 2, t, 0.0, 1.3).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-5)


def test_fused_full_kl_of_identical_logits_is_exactly_zero():
    x = torch.randn(4, 9, 50)
    for beta in (0.0, 1.0):
        assert torch.count_nonzero(per_token_divergence(x, x.clone(), beta=beta)) == 0
