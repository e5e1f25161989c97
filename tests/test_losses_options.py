"""The divergence options have one definition (`DivergenceOptions`): every function of the divergence library
takes exactly its fields, with its defaults, and checks them with the same messages; `LossConfig` hands over
the same set."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from lightning_sd import (
    DivergenceOptions,
    LossConfig,
    chunked_divergence,
    clipped_teacher_mass,
    per_token_divergence,
)

FIELDS = {f.name: f.default for f in dataclasses.fields(DivergenceOptions)}
V, H = 7, 4


def _options(fn) -> dict:
    """The keyword-only parameters of `fn` that are not its own data (tensors, chunking), with defaults."""
    own = {"tokens", "chunk_size", "student_bias", "teacher_bias"}
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in own}


def _per_token(**kw):
    return per_token_divergence(torch.randn(2, 3, V), torch.randn(2, 3, V), **kw)


def _chunked(**kw):
    return chunked_divergence(torch.randn(6, H), torch.randn(V, H), torch.randn(6, H), torch.randn(V, H),
                              chunk_size=4, **kw)


def _mass(**kw):
    return clipped_teacher_mass(torch.randn(2, 3, V), torch.randn(2, 3, V), **kw)


CALLS = {"per_token_divergence": _per_token, "chunked_divergence": _chunked, "clipped_teacher_mass": _mass}


def test_the_options_and_their_defaults_are_the_same_everywhere():
    assert FIELDS == {"beta": 0.0, "support": "full", "top_k": None, "topk_from": "student", "tail": True,
                      "temperature": 1.0, "entry_clip": None, "entry_clip_mode": "gradient"}
    for fn in (per_token_divergence, chunked_divergence, clipped_teacher_mass):
        assert _options(fn) == FIELDS, fn.__name__
        assert inspect.signature(fn).parameters["tokens"].default is None


@pytest.mark.parametrize("name", CALLS)
def test_every_option_is_accepted_and_an_unknown_one_is_named(name):
    set_all = dict(beta=0.5, support="topk", top_k=3, topk_from="teacher", tail=False, temperature=1.1,
                   entry_clip=0.05, entry_clip_mode="value")
    assert set(set_all) == set(FIELDS)
    assert torch.isfinite(CALLS[name](**set_all)).all()
    with pytest.raises(TypeError, match="top_kk"):
        CALLS[name](top_kk=3)


@pytest.mark.parametrize(
    "kwargs",
    [dict(support="dense"), dict(support="topk"), dict(support="topk", top_k=V + 1),
     dict(support="topk", top_k=2, topk_from="both"), dict(beta=1.5), dict(beta=0.5, support="sampled"),
     dict(temperature=0.0), dict(entry_clip=-1.0), dict(entry_clip=0.05, entry_clip_mode="both")],
)
def test_invalid_options_raise_the_same_message_everywhere(kwargs):
    messages = set()
    for call in CALLS.values():
        with pytest.raises(ValueError) as err:
            call(**kwargs)
        messages.add(str(err.value))
    assert len(messages) == 1, messages
    with pytest.raises(ValueError, match=re.escape(messages.pop())):
        DivergenceOptions(**kwargs).validate(V)


def test_the_loss_config_hands_over_exactly_the_options():
    cfg = LossConfig()
    assert cfg.divergence_kwargs() == FIELDS
    assert cfg.divergence_options() == DivergenceOptions()
    cfg = LossConfig(beta=1.0, support="topk", top_k=20, entry_clip=0.1, entry_clip_mode="value")
    assert cfg.divergence_options() == DivergenceOptions(beta=1.0, support="topk", top_k=20, entry_clip=0.1,
                                                         entry_clip_mode="value")
