"""chunked_divergence against the naive full-logits path."""

from __future__ import annotations

import pytest
import torch

from lightning_sd.losses import chunked_divergence, per_token_divergence

N, H, H_T, V = 23, 8, 6, 37

MODES = {
    "fkl": dict(beta=0.0),
    "rkl": dict(beta=1.0),
    "jsd": dict(beta=0.5),
    "fkl-clip-temp": dict(beta=0.0, entry_clip=0.05, entry_clip_mode="value", temperature=1.1),
    "fkl-gradclip-temp": dict(beta=0.0, entry_clip=0.05, entry_clip_mode="gradient", temperature=1.1),
    "rkl-gradclip": dict(beta=1.0, entry_clip=0.02, entry_clip_mode="gradient"),
    "jsd-topk-gradclip": dict(beta=0.5, support="topk", top_k=5, entry_clip=0.01, entry_clip_mode="gradient"),
    "jsd-topk-student-tail": dict(beta=0.5, support="topk", top_k=5),
    "rkl-topk-teacher-tail": dict(beta=1.0, support="topk", top_k=4, topk_from="teacher"),
    "fkl-topk-notail-clip": dict(beta=0.0, support="topk", top_k=6, tail=False, entry_clip=0.05,
                                 entry_clip_mode="value"),  # fmt: skip
    "jsd-0.9-topk-teacher-notail-temp": dict(beta=0.9, support="topk", top_k=3, topk_from="teacher", tail=False,
                                             temperature=1.1),  # fmt: skip
    "sampled": dict(beta=1.0, support="sampled"),
    "sampled-clip": dict(beta=1.0, support="sampled", entry_clip=0.05, entry_clip_mode="value", temperature=1.1),
    "sampled-gradclip": dict(beta=1.0, support="sampled", entry_clip=0.05, entry_clip_mode="gradient",
                             temperature=1.1),  # fmt: skip
}


def _inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    th = torch.randn(N, H_T, generator=g, dtype=dtype)
    tw = torch.randn(V, H_T, generator=g, dtype=dtype)
    tb = torch.randn(V, generator=g, dtype=dtype) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g)
    return h, w, b, th, tw, tb, tokens


def _close(got, ref, rel=1e-5):
    """fp32 relative 1e-5, measured against the tensor's scale.

    Gradient entries near 0 come from cancelling sums over the vocabulary, so their
    elementwise relative error is fp32 noise; the absolute slack is rel * max|ref|.
    """
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * max(ref.abs().max().item(), 1e-1))


def _leaves(*xs):
    return [None if x is None else x.clone().requires_grad_(True) for x in xs]


@pytest.mark.parametrize("chunk_size", [5, 7, 64])
@pytest.mark.parametrize("name", list(MODES))
def test_matches_naive_value_and_grads(name, chunk_size):
    kw = dict(MODES[name])
    h0, w0, b0, th0, tw0, tb0, tokens = _inputs(bias=chunk_size != 7)
    if kw.get("support") == "sampled":
        kw["tokens"] = tokens
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(N, generator=g)  # a non-uniform incoming gradient

    h, w, b, th, tw, tb = _leaves(h0, w0, b0, th0, tw0, tb0)
    s_logits = h @ w.T + (0 if b is None else b)
    t_logits = th @ tw.T + (0 if tb is None else tb)
    naive = per_token_divergence(s_logits, t_logits, **kw)
    (naive * upstream).sum().backward()

    h2, w2, b2, th2, tw2, tb2 = _leaves(h0, w0, b0, th0, tw0, tb0)
    out = chunked_divergence(h2, w2, th2, tw2, chunk_size=chunk_size, student_bias=b2, teacher_bias=tb2, **kw)
    (out * upstream).sum().backward()

    assert out.shape == (N,) and out.dtype == torch.float32
    _close(out, naive)
    _close(h2.grad, h.grad)
    _close(w2.grad, w.grad)
    if b is not None:
        _close(b2.grad, b.grad)
    for teacher in (th2, tw2, tb2):
        assert teacher is None or teacher.grad is None


@pytest.mark.parametrize("name", ["fkl", "jsd-topk-student-tail", "fkl-topk-notail-clip", "rkl-topk-teacher-tail"])
def test_gradcheck_chunked_function(name):
    g = torch.Generator().manual_seed(2)
    n, hd, v = 7, 4, 9
    h = torch.randn(n, hd, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, hd, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, 3, generator=g, dtype=torch.float64)
    tw = torch.randn(v, 3, generator=g, dtype=torch.float64)
    kw = dict(MODES[name])
    if kw.get("top_k"):
        kw["top_k"] = min(kw["top_k"], v)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: chunked_divergence(h_, w_, th, tw, student_bias=b_, chunk_size=3, **kw), (h, w, b)
    )


def test_gradcheck_chunked_sampled_surrogate():
    g = torch.Generator().manual_seed(3)
    n, hd, v = 7, 4, 9
    h0 = torch.randn(n, hd, generator=g, dtype=torch.float64)
    w = torch.randn(v, hd, generator=g, dtype=torch.float64)
    th = torch.randn(n, 3, generator=g, dtype=torch.float64)
    tw = torch.randn(v, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(beta=1.0, support="sampled", tokens=y, chunk_size=3)
    adv0 = chunked_divergence(h0, w, th, tw, **kw).detach()

    def f(x):
        out = chunked_divergence(x, w, th, tw, **kw)
        log_s_y = torch.log_softmax(x @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
        return out - out.detach() + (adv0 * log_s_y).detach()

    assert torch.autograd.gradcheck(f, (h0.clone().requires_grad_(True),))


def test_leading_dims_and_no_student_grad_needed():
    h, w, b, th, tw, tb, tokens = _inputs(bias=False)
    out = chunked_divergence(h.reshape(1, N, H), w, th.reshape(1, N, H_T), tw, chunk_size=4, beta=0.5)
    assert out.shape == (1, N)
    torch.testing.assert_close(out[0], per_token_divergence(h @ w.T, th @ tw.T, beta=0.5), rtol=1e-5, atol=1e-6)
    wl = w.clone().requires_grad_(True)  # only the LM head trains
    chunked_divergence(h, wl, th, tw, chunk_size=4).sum().backward()
    assert wl.grad is not None and torch.isfinite(wl.grad).all()


def test_bfloat16_weights_finite():
    h, w, b, th, tw, tb, tokens = _inputs(dtype=torch.bfloat16)
    h.requires_grad_(True)
    w.requires_grad_(True)
    out = chunked_divergence(h, w, th, tw, chunk_size=8, student_bias=b, teacher_bias=tb, beta=0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(tw=torch.randn(V + 1, H_T)), "vocabulary mismatch"),
        (dict(th=torch.randn(N + 1, H_T)), "same tokens"),
        (dict(w=torch.randn(V, H + 1)), "hidden size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(support="topk"), "top_k"),
        (dict(support="sampled"), "tokens"),
        (dict(support="sampled", beta=0.5), "beta"),
        (dict(entry_clip=0.05, entry_clip_mode="values"), "entry_clip_mode"),
    ],
)
def test_validation(change, match):
    h, w, b, th, tw, tb, tokens = _inputs(bias=False)
    args = dict(h=h, w=w, th=th, tw=tw)
    kwargs = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    if kwargs.get("support") == "sampled" and "beta" not in kwargs:
        kwargs["beta"] = 1.0
    with pytest.raises(ValueError, match=match):
        chunked_divergence(args["h"], args["w"], args["th"], args["tw"], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fkl", "jsd-topk-student-tail", "fkl-clip-temp", "fkl-gradclip-temp",
                                  "jsd-topk-gradclip", "sampled"])
def test_cuda_matches_naive_and_cpu(name):
    kw = dict(MODES[name])
    h0, w0, b0, th0, tw0, tb0, tokens = _inputs(dtype=torch.float64)
    if kw.get("support") == "sampled":
        kw["tokens"] = tokens.cuda()
    cpu_kw = dict(kw, tokens=tokens) if "tokens" in kw else kw
    cpu = chunked_divergence(h0, w0, th0, tw0, chunk_size=5, student_bias=b0, teacher_bias=tb0, **cpu_kw)
    h, w, b = _leaves(h0.cuda(), w0.cuda(), b0.cuda())
    naive = per_token_divergence(h @ w.T + b, th0.cuda() @ tw0.cuda().T + tb0.cuda(), **kw)
    naive.sum().backward()
    h2, w2, b2 = _leaves(h0.cuda(), w0.cuda(), b0.cuda())
    out = chunked_divergence(h2, w2, th0.cuda(), tw0.cuda(), chunk_size=5, student_bias=b2, teacher_bias=tb0.cuda(), **kw)
    out.sum().backward()
    torch.testing.assert_close(out, naive, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-9, atol=1e-9)
    for got, ref in ((h2.grad, h.grad), (w2.grad, w.grad), (b2.grad, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
