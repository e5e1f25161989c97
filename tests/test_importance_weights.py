"""Importance weights against the sampler's real distribution: the trainer-side log-prob of each sampled token
is taken under the same temperature and top-k/top-p filter the sampler drew from, in every loss path (full,
top-k, sampled, chunked, GRPO). With the exact sampler the weight is 1; with a perturbed one it is the
analytic ratio."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch

from lightning_sd import SamplingConfig, SelfDistillationModule
from lightning_sd.batch import TeacherInputs
from lightning_sd.data.tasks.base import Verdict
from lightning_sd.forward import completion_hidden, completion_logits
from lightning_sd.rollout import decode_completions
from lightning_sd.sampling import filter_logits, sample

SETTINGS = [  # (temperature, top_k, top_p)
    (0.7, 0, 1.0), (1.0, 0, 1.0), (1.3, 0, 1.0),
    (0.7, 8, 1.0), (1.0, 0, 0.9), (1.3, 8, 0.95),
]


def rollout_from(model, tok, records, temperature, top_k, top_p, n=2, seed=0):
    batch = make_batch(tok, records)
    model.eval()
    ro = sample(model, batch.prompt_ids, batch.prompt_mask,
                SamplingConfig(n=n, max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p),
                pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id],
                generator=torch.Generator().manual_seed(seed))
    return batch, ro


def module_for(model, tok, **loss):
    return SelfDistillationModule(model, tok, teacher="frozen",
                                  loss={"name": "distill", "template": "answer_hint", "is_clip": 1e6, **loss})


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked"])
def test_exact_sampler_gives_weight_one(tiny, records, temperature, top_k, top_p, chunked):
    model, tok = tiny
    _, ro = rollout_from(model, tok, records, temperature, top_k, top_p)
    module = module_for(model, tok, chunk_size=5 if chunked else None)
    run = completion_hidden if chunked else completion_logits
    with torch.no_grad():
        out = run(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    w = module.scorer.importance_weights(out, ro)
    valid = ro.completion_mask.bool()
    assert valid.sum() > 10
    torch.testing.assert_close(w[valid], torch.ones_like(w[valid]), rtol=0, atol=1e-5)
    assert torch.all(w[~valid] == 1)


def _analytic_logprobs(model, ro, temperature, top_k, top_p) -> torch.Tensor:
    with torch.no_grad():
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    filtered = filter_logits(logits.reshape(-1, logits.size(-1)), temperature, top_k, top_p).double()
    return filtered.log_softmax(-1).gather(-1, ro.completion_ids.reshape(-1, 1)).view(ro.completion_ids.shape)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 8, 1.0), (1.3, 0, 1.0), (1.0, 0, 0.95)])
def test_perturbed_sampler_gives_the_analytic_weight(tiny, records, temperature, top_k, top_p):
    """The sampler runs perturbed weights (as a stale or lower-precision inference engine would): the weight is
    exp(log p_trainer(y) - log p_sampler(y)) with both distributions tempered and filtered alike."""
    model, tok = tiny
    sampler = copy.deepcopy(model)
    with torch.no_grad():
        sampler.lm_head.weight.add_(0.05 * torch.randn(sampler.lm_head.weight.shape, generator=torch.Generator()
                                                       .manual_seed(5)))
    _, ro = rollout_from(sampler, tok, records, temperature, top_k, top_p)
    module = module_for(model, tok)
    with torch.no_grad():
        logits = completion_logits(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    w = module.scorer.importance_weights(logits, ro)
    expected = (_analytic_logprobs(model, ro, temperature, top_k, top_p)
                - _analytic_logprobs(sampler, ro, temperature, top_k, top_p)).clamp(-20, 20).exp()
    valid = ro.completion_mask.bool()
    assert (expected[valid] - 1).abs().max() > 0.01  # the perturbation is visible
    torch.testing.assert_close(w[valid].double(), expected[valid].double(), rtol=1e-4, atol=1e-6)


class _Alternating:
    name = "alternating"

    def verify(self, record, completion):
        return Verdict(reward=float(len(completion) % 2))


@pytest.mark.parametrize("loss", [
    {"beta": 0.0, "support": "full"},
    {"beta": 0.5, "support": "topk", "top_k": 5},
    {"beta": 1.0, "support": "sampled"},
    {"beta": 0.0, "support": "full", "chunk_size": 5},
    {"name": "grpo", "grpo_mix": 1.0},
], ids=["full", "topk", "sampled", "chunked", "grpo"])
def test_every_loss_path_is_unchanged_by_weights_of_an_exact_sampler(tiny, records, loss):
    """T=0.7 with top-k and top-p: the IS-weighted loss equals the unweighted one (the weights are 1). Before the
    weights matched the sampler's distribution, every path here was off by the ratio of a tempered, filtered
    distribution to the untempered one."""
    model, tok = tiny
    batch, ro = rollout_from(model, tok, records, 0.7, 8, 0.95)
    batch.rollout = ro
    batch.completion_text = decode_completions(tok, ro)
    batch.rewards = [float(len(t) % 2) for t in batch.completion_text]
    values = []
    for is_clip in (None, 1e6):
        cfg = {"name": "distill", "template": "answer_hint", **loss, "is_clip": is_clip}
        module = SelfDistillationModule(model, tok, teacher="frozen", loss=cfg, task=_Alternating())
        module.teacher.model.load_state_dict(model.state_dict())
        teacher_inputs = module.build_teacher_inputs(batch) if module.needs_teacher else TeacherInputs.without_teacher(ro)
        with torch.no_grad():
            teacher_out = module.teacher_forward(batch, teacher_inputs) if module.needs_teacher else None
            student_out = module.student_forward(batch)
            values.append(module.compute_loss(student_out, teacher_out, batch, teacher_inputs).per_token)
    valid = ro.completion_mask.bool()
    assert values[0][valid].abs().max() > 0
    torch.testing.assert_close(values[1][valid], values[0][valid], rtol=1e-4, atol=1e-6)
