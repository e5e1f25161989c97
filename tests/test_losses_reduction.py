"""Reductions, completion masks and importance weights."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sd.losses import completion_mask_skip_first, importance_weight, per_token_divergence, reduce_loss

B, T, D, V = 8, 6, 5, 11
LENGTHS = [6, 1, 3, 0, 5, 2, 6, 4]  # uneven rows, one empty; halves hold 10 and 17 tokens


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(torch.float64)
    weight = torch.randn(D, V, generator=g, dtype=torch.float64)
    return x, teacher, mask, weight


def _grad(mode, chunks, counts):
    x, teacher, mask, w0 = _batch()
    w = w0.clone().requires_grad_(True)  # a small linear "student"
    total = 0.0
    for sl in chunks:
        per_token = per_token_divergence(x[sl] @ w, teacher[sl], beta=0.5)
        loss = reduce_loss(per_token, mask[sl], mode, **counts)
        loss.backward()  # gradient accumulation
        total += loss.item()
    return total, w.grad.clone()


FULL = [slice(0, 8)]
HALVES = [slice(0, 4), slice(4, 8)]


@pytest.mark.parametrize(
    "mode,counts",
    [
        ("token_mean", dict(num_tokens=sum(LENGTHS))),
        ("token_mean", dict(num_tokens=torch.tensor(float(sum(LENGTHS))))),
        ("sequence_mean", dict(num_sequences=B)),
        ("sum", dict()),
    ],
)
def test_accumulated_halves_equal_full_batch(mode, counts):
    loss_full, grad_full = _grad(mode, FULL, counts)
    loss_halves, grad_halves = _grad(mode, HALVES, counts)
    assert grad_full.abs().max() > 1e-3  # non-trivial gradient
    assert loss_halves == pytest.approx(loss_full, abs=1e-6)
    torch.testing.assert_close(grad_halves, grad_full, rtol=1e-6, atol=1e-6)


def test_local_token_count_depends_on_the_split():
    # the TRL-style bug that the global count avoids
    _, grad_full = _grad("token_mean", FULL, {})
    _, grad_halves = _grad("token_mean", HALVES, {})
    assert not torch.allclose(grad_full, grad_halves, rtol=1e-3, atol=1e-6)


def test_token_mean_and_sequence_mean_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert reduce_loss(per_token, mask, "sum").item() == pytest.approx(7.0)
    assert reduce_loss(per_token, mask, "token_mean").item() == pytest.approx(7.0 / 3)
    assert reduce_loss(per_token, mask, "token_mean", num_tokens=10).item() == pytest.approx(0.7)
    # rows: mean(1, 2) = 1.5, mean(4) = 4, empty row -> 0; divided by B = 3
    assert reduce_loss(per_token, mask, "sequence_mean").item() == pytest.approx(5.5 / 3)
    assert reduce_loss(per_token, mask, "sequence_mean", num_sequences=11).item() == pytest.approx(0.5)
    # all-padding micro-batch: zero, not NaN
    empty = torch.zeros_like(mask)
    for mode in ("sum", "token_mean", "sequence_mean"):
        assert reduce_loss(per_token, empty, mode).item() == 0.0


def test_padding_garbage_does_not_leak():
    per_token = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    for mode in ("sum", "token_mean", "sequence_mean"):
        loss = reduce_loss(per_token, mask, mode)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, per_token)
        assert torch.isfinite(grad).all()
        assert grad[:, 1].abs().sum() == 0


def test_reduce_loss_validation():
    with pytest.raises(ValueError, match="mode"):
        reduce_loss(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        reduce_loss(torch.zeros(2, 3), torch.ones(2, 4), "sum")


def test_skip_first_rows_of_different_lengths():
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    out = completion_mask_skip_first(mask, 3)
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],  # n larger than the row
            [0, 0, 0, 0, 0, 0],  # n equal to the row
            [0, 0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(out, expected) and out.dtype == mask.dtype
    assert torch.equal(completion_mask_skip_first(mask, 0), mask)
    assert torch.equal(completion_mask_skip_first(mask, 1)[0], torch.tensor([0, 1, 1, 1, 1, 0]))
    bool_out = completion_mask_skip_first(mask.bool(), 3)
    assert bool_out.dtype == torch.bool and torch.equal(bool_out, expected.bool())
    assert torch.equal(completion_mask_skip_first(mask.float(), 100), torch.zeros(4, 6))
    assert torch.equal(mask[0], torch.tensor([1, 1, 1, 1, 1, 0]))  # input untouched
    with pytest.raises(ValueError, match="n"):
        completion_mask_skip_first(mask, -1)


def test_importance_weight():
    logp = torch.tensor([0.0, math.log(1.5), 1.0, 30.0, -30.0], requires_grad=True)
    behaviour = torch.zeros(5, requires_grad=True)
    w = importance_weight(logp, behaviour)
    assert not w.requires_grad and w.grad_fn is None
    expected = torch.tensor([1.0, 1.5, 2.0, 2.0, math.exp(-20.0)])
    torch.testing.assert_close(w, expected)
    unclipped = importance_weight(logp, behaviour, clip=None)
    torch.testing.assert_close(unclipped, torch.tensor([1.0, 1.5, math.e, math.exp(20.0), math.exp(-20.0)]))
    torch.testing.assert_close(importance_weight(logp, behaviour, clip=1.2)[:2], torch.tensor([1.0, 1.2]))
    with pytest.raises(ValueError, match="clip"):
        importance_weight(logp, behaviour, clip=0.0)
