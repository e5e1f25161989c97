"""The rollout sampler: stop-token masking, filters, explicit settings, and agreement of the sampler's
log-probs with the trainer's completion-aligned forward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch

from lightning_sd.forward import completion_logits
from lightning_sd.objectives import token_logprobs
from lightning_sd.sampling import SamplingConfig, filter_logits, sample


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose next token is fixed per row and step: row r emits `script[r][t]`."""

    def __init__(self, script: list[list[int]], vocab: int = 8):
        super().__init__()
        self.script = script
        self.vocab = vocab
        self.step = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0, **_):
        t = self.step
        self.step += 1
        logits = torch.full((input_ids.size(0), input_ids.size(1), self.vocab), -10.0)
        for r, row in enumerate(self.script):
            logits[r, -1, row[min(t, len(row) - 1)]] = 10.0
        return type("Out", (), {"logits": logits})()


def test_completion_masked_after_stop_token():
    eos, pad = 2, 0
    model = ScriptedLM([[5, 6, eos, 7, 7, 7], [5, 5, 5, 5, 5, 5], [eos, 6, 6, 6, 6, 6]])
    prompt = torch.tensor([[1, 3], [0, 3], [1, 4]])
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    out = sample(model, prompt, mask, SamplingConfig(do_sample=False, max_new_tokens=5), pad_token_id=pad,
                 stop_token_ids=[eos])
    assert out.completion_ids.tolist() == [[5, 6, eos, pad, pad], [5, 5, 5, 5, 5], [eos, pad, pad, pad, pad]]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.truncated.tolist() == [False, True, False]
    assert (out.logprobs[out.completion_mask == 0] == 0).all()


def test_decoding_stops_early_when_all_rows_finished():
    eos = 2
    model = ScriptedLM([[5, eos], [eos]])
    out = sample(model, torch.tensor([[1], [1]]), torch.ones(2, 1, dtype=torch.long),
                 SamplingConfig(do_sample=False, max_new_tokens=50), pad_token_id=0, stop_token_ids=[eos])
    assert out.completion_ids.size(1) == 2  # stopped after the step where every row hit EOS
    assert model.step == 2  # one prefill + one decode step, no wasted forwards


def test_fixed_length_decodes_every_step():
    eos = 2
    model = ScriptedLM([[eos]])
    out = sample(model, torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long),
                 SamplingConfig(do_sample=False, max_new_tokens=6, fixed_length=True), pad_token_id=0,
                 stop_token_ids=[eos])
    assert out.completion_ids.size(1) == 6 and out.completion_mask.tolist() == [[1, 0, 0, 0, 0, 0]]


def test_filters_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, 1.0, 0, 0.7)  # 0.5 < 0.7 -> keep 2nd; 0.8 >= 0.7 -> drop the rest
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    t = filter_logits(logits, 2.0, 0, 1.0)
    assert torch.allclose(t, logits / 2.0)


def test_n_samples_per_prompt_are_adjacent(tiny, records):
    model, tok = tiny
    batch = make_batch(tok, records[:2])
    out = sample(model, batch.prompt_ids, batch.prompt_mask, SamplingConfig(n=3, max_new_tokens=4),
                 pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id],
                 generator=torch.Generator().manual_seed(0))
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(out.prompt_ids[0], batch.prompt_ids[0]) and torch.equal(out.prompt_ids[3],
                                                                                  batch.prompt_ids[1])


def test_same_seed_same_samples(tiny, records):
    model, tok = tiny
    batch = make_batch(tok, records)
    cfg = SamplingConfig(n=2, max_new_tokens=6, temperature=1.3, top_k=20, top_p=0.9)
    runs = [sample(model, batch.prompt_ids, batch.prompt_mask, cfg, pad_token_id=tok.pad_token_id,
                   stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)


def test_sampler_logprobs_equal_trainer_logprobs(tiny, records):
    """The sampler (KV cache, left padding) and the trainer's forward score the same tokens identically:
    this pins prompt/completion alignment and position ids under left padding."""
    model, tok = tiny
    model.eval()
    batch = make_batch(tok, records)  # prompts of different lengths -> different left padding
    out = sample(model, batch.prompt_ids, batch.prompt_mask,  # temperature 1: the trainer's distribution
                 SamplingConfig(n=2, max_new_tokens=10, temperature=1.0), pad_token_id=tok.pad_token_id,
                 stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = completion_logits(model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    logp = token_logprobs(logits, out.completion_ids)
    valid = out.completion_mask.bool()
    assert torch.allclose(logp[valid], out.logprobs[valid], atol=1e-4)


def test_explicit_settings_ignore_model_generation_config(tiny, records):
    """A top_k/temperature on the model's generation_config must not leak into on-policy sampling."""
    model, tok = tiny
    batch = make_batch(tok, records)
    cfg = SamplingConfig(n=1, max_new_tokens=5)
    kw = dict(pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id])
    a = sample(model, batch.prompt_ids, batch.prompt_mask, cfg, generator=torch.Generator().manual_seed(3), **kw)
    model.generation_config.top_k = 1
    model.generation_config.temperature = 0.01
    b = sample(model, batch.prompt_ids, batch.prompt_mask, cfg, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)


@pytest.mark.parametrize("bad", [dict(n=0), dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0),
                                 dict(top_k=-1)])
def test_invalid_sampling_settings_name_the_option(bad):
    with pytest.raises(ValueError, match="generation." + next(iter(bad))):
        SamplingConfig(**bad).validate()


def test_sampled_tokens_follow_the_distribution():
    """Multinomial sampling with temperature: empirical frequencies match softmax(logits / T)."""

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, **_):
            logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(input_ids.size(0), input_ids.size(1), 4)
            return type("Out", (), {"logits": logits})()

    rows = 4000
    out = sample(Fixed(), torch.ones(rows, 1, dtype=torch.long), torch.ones(rows, 1, dtype=torch.long),
                 SamplingConfig(max_new_tokens=1, temperature=1.5), pad_token_id=0, stop_token_ids=[99],
                 generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.completion_ids[:, 0], minlength=4).float() / rows
    expected = (torch.tensor([0.0, 1.0, 2.0, -1.0]) / 1.5).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)
    assert math.isclose(float(out.logprobs[0, 0]), float(expected.log()[out.completion_ids[0, 0]]), rel_tol=1e-5)


def test_sample_categorical_draws_each_entry_at_its_probability_and_never_a_zero_one():
    from lightning_sd.sampling import filter_logits, sample_categorical

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    rows = 40_000
    logp = probs.log().expand(rows, -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_categorical(logp, g), minlength=5).double()
    expected = probs.double() * rows
    sigma = (rows * probs.double() * (1 - probs.double())).sqrt()
    assert counts[4] == 0
    assert ((counts[:4] - expected[:4]).abs() < 4 * sigma[:4]).all(), counts
    # filtered entries (-inf after top-k) are never drawn; the same generator seed gives the same draws
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    lp = filter_logits(logits, 1.0, 5, 1.0).log_softmax(-1)
    a = sample_categorical(lp, torch.Generator().manual_seed(3))
    b = sample_categorical(lp, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.isfinite(lp.gather(-1, a[:, None])).all()


def _sample_both_ways(model, tok, batch, **settings):
    """The same rollout with the prompts prefilled once per prompt (shared) and once per row (unshared)."""
    return [sample(model, batch.prompt_ids, batch.prompt_mask,
                   SamplingConfig(share_prefill=share, **settings), pad_token_id=tok.pad_token_id,
                   stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(5))
            for share in (True, False)]


def _assert_same_rollout(a, b):
    """Same tokens and masks; log-probs within 1e-6: the shared prefill multiplies B rows where the unshared one
    multiplies R, and a matmul kernel may sum in another order for another row count (on this CPU they are
    bitwise equal)."""
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=1.3, top_k=20, top_p=0.9),
                                      dict(do_sample=False)])
def test_shared_prefill_gives_the_unshared_samples(tiny, records, settings):
    """n=3 at a fixed seed, prompts of different lengths (different left padding): prefilling each prompt once
    and repeating its KV cache draws the same tokens with the same log-probs as prefilling every row."""
    model, tok = tiny
    model.eval()
    batch = make_batch(tok, records)
    assert len(set(batch.prompt_mask.sum(-1).tolist())) == len(records)  # every prompt padded differently
    shared, unshared = _sample_both_ways(model, tok, batch, n=3, max_new_tokens=12, **settings)
    assert shared.prompt_index.tolist() == [i for i in range(len(records)) for _ in range(3)]
    _assert_same_rollout(shared, unshared)


def _prefill_rows(model) -> list[int]:
    """Records the number of rows of every forward of `model` (first entry: the prefill)."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
    return rows


@pytest.mark.parametrize("n, prefill_rows", [(3, 2), (1, 2)])
def test_shared_prefill_runs_each_prompt_once(tiny, records, n, prefill_rows):
    """The prefill sees the B distinct prompts, the decode steps all R = B * n rows; with n = 1 both switch
    settings take the same path and give the same rollout."""
    model, tok = tiny
    model.eval()
    rows = _prefill_rows(model)
    batch = make_batch(tok, records[:2])
    # lean_decode off: the hook counts the model's own forwards, which the lean decode step does not call
    shared, unshared = _sample_both_ways(model, tok, batch, n=n, max_new_tokens=3, fixed_length=True,
                                         lean_decode=False)
    assert rows[:3] == [prefill_rows, 2 * n, 2 * n]  # shared: the prefill, then two decode steps
    assert rows[3:] == [2 * n] * 3  # unshared
    _assert_same_rollout(shared, unshared)


def test_cache_without_batch_repeat_is_not_shared():
    """A cache layer that cannot be repeated along the batch (e.g. linear-attention states) makes `sample`
    prefill every row instead."""
    from types import SimpleNamespace

    from lightning_sd.sampling import cache_expandable

    def repeatable():
        return SimpleNamespace(batch_repeat_interleave=lambda n: None)

    assert cache_expandable(SimpleNamespace(batch_repeat_interleave=None, layers=[repeatable(), repeatable()]))
    assert not cache_expandable(SimpleNamespace(batch_repeat_interleave=None, layers=[repeatable(), object()]))
    assert not cache_expandable(object())
