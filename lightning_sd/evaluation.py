"""Evaluation: the student's accuracy on held-out prompts and, beside it, the teacher's accuracy when it is
given its privileged context on the same prompts. Self-distillation can only transfer what the teacher
knows better, so the gap `teacher - student` is the first number to look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from lightning_sd.batch import StepBatch, as_step_batch
from lightning_sd.contexts import RowView
from lightning_sd.data.prompts import PromptEncoder
from lightning_sd.forward import completion_logits
from lightning_sd.rollout import decode_completions, rollout_on, sampling_mode, score_rollouts, stop_ids
from lightning_sd.sampling import SamplingConfig, sample


VERIFIER_TIMEOUT_S = 5.0  # seconds a verifier may take on one evaluation completion


@dataclass
class EvalResult:
    student_accuracy: float
    teacher_accuracy: float | None
    gap: float | None
    mean_completion_tokens: float
    n: int
    samples: list[dict] = field(default_factory=list)
    verifier_failures: int = 0  # completions whose verifier raised or timed out (counted as wrong, warned by row id)

    def as_dict(self) -> dict:
        return asdict(self)


def _generate(module, network, prompt_ids, prompt_mask, sampling: SamplingConfig):
    trainer = module._trainer if getattr(module, "_trainer", None) is not None else None
    if trainer is not None:
        return rollout_on(trainer, module, network, prompt_ids, prompt_mask, sampling, sampling.seed)
    generator = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)
    with sampling_mode(network):
        return sample(network, prompt_ids, prompt_mask, sampling, pad_token_id=module.pad_token_id,
                      stop_token_ids=stop_ids(module.tokenizer, list(sampling.stop_token_ids or [])),
                      generator=generator)


def generate_and_verify(module, batch: StepBatch, sampling: SamplingConfig, network=None, task=None) -> dict:
    """Sample from `network` (default: the student) for the batch's prompts and verify with `task` (default:
    `module.task`)."""
    rollout = _generate(module, network or module.student, batch.prompt_ids.to(module.device),
                        batch.prompt_mask.to(module.device), sampling)
    texts = decode_completions(module.tokenizer, rollout)
    correct, failures = [], 0
    task = module.task if task is None else task
    if task is not None:
        rewards, _, failures = score_rollouts(task, batch.records, texts, rollout.prompt_index,
                                              timeout_s=VERIFIER_TIMEOUT_S)
        correct = [float(reward is not None and reward >= 1.0) for reward in rewards]
    lengths = rollout.completion_mask.sum(-1).float().tolist()
    return {"texts": texts, "correct": correct, "lengths": lengths, "prompt_index": rollout.prompt_index.tolist(),
            "failures": failures}


def teacher_prompts(module, records: list[dict]) -> tuple[list[str], list[bool]]:
    """The teacher's privileged prompt for each record (no rollout known: an empty `RowView`), chat-formatted;
    and whether each has one (else the student's prompt)."""
    texts, ok = [], []
    for rec in records:
        text = module.teacher_prompts.context(rec, RowView())
        ok.append(text is not None)
        texts.append(module.prompts.format(text if text is not None else rec["prompt"], rec))
    return texts, ok


@torch.no_grad()
def evaluate(module, batches, sampling: SamplingConfig | None = None, *, with_teacher: bool = True,
             keep_samples: int = 8, progress: Callable[[int, int], None] | None = None, task=None) -> EvalResult:
    """Accuracy of the student and of the teacher-with-context over `batches` (an iterable of data-module
    batches), verified by `task` (default: `module.task`). Greedy by default. `progress(prompts, tokens)` is
    called after each generation (student, then teacher) with the prompts it covered and the tokens it
    generated."""
    sampling = sampling or module.eval_sampling
    student_correct, teacher_correct, lengths, samples = [], [], [], []
    failures = 0
    for batch in map(as_step_batch, batches):
        out = generate_and_verify(module, batch, sampling, task=task)
        student_correct += out["correct"]
        lengths += out["lengths"]
        failures += out["failures"]
        if progress is not None:
            progress(len(batch.records), int(sum(out["lengths"])))
        if with_teacher:
            texts, ok = teacher_prompts(module, batch.records)
            enc = module.prompts.encode(texts, formatted=True)
            with module.teacher.sampling_network(module.student) as net:
                teacher_batch = StepBatch(records=batch.records, prompt_ids=enc.ids, prompt_mask=enc.mask,
                                          prompt_text=texts)
                t_out = generate_and_verify(module, teacher_batch, sampling, network=net, task=task)
            teacher_correct += [c for c, r in zip(t_out["correct"], [ok[i] for i in t_out["prompt_index"]]) if r]
            failures += t_out["failures"]
            if progress is not None:
                progress(len(batch.records), int(sum(t_out["lengths"])))
        for i, text in enumerate(out["texts"][: max(0, keep_samples - len(samples))]):
            rec = batch.records[out["prompt_index"][i]]
            samples.append({"prompt": rec["prompt"], "completion": text,
                            "correct": out["correct"][i] if out["correct"] else None})
    n = len(student_correct)
    student_acc = sum(student_correct) / n if n else float("nan")
    teacher_acc = sum(teacher_correct) / len(teacher_correct) if teacher_correct else None
    return EvalResult(student_accuracy=student_acc, teacher_accuracy=teacher_acc,
                      gap=None if teacher_acc is None else teacher_acc - student_acc,
                      mean_completion_tokens=sum(lengths) / max(len(lengths), 1), n=n, samples=samples,
                      verifier_failures=failures)


def evaluate_probes(module, datamodule, keep_samples: int = 2) -> dict[str, dict]:
    """The student's greedy accuracy on each probe of `datamodule` (`data.probes`: tasks only evaluated, never
    trained), each verified by its own task: `{label: EvalResult.as_dict()}`; empty without probes."""
    return {label: evaluate(module, datamodule.eval_dataloader(label), with_teacher=False, keep_samples=keep_samples,
                            task=datamodule.probe_task(label)).as_dict()
            for label in getattr(datamodule, "probe_labels", [])}


def evaluate_sampled(module, batches, samples: int, temperature: float, seed: int) -> EvalResult:
    """The student's sampled accuracy over `batches`: `samples` completions per prompt at `temperature` (no
    top-p/top-k), `module.eval_sampling.max_new_tokens` long, drawn from sampler seed `seed`; no teacher."""
    sampling = SamplingConfig(n=samples, do_sample=True, temperature=temperature,
                              max_new_tokens=module.eval_sampling.max_new_tokens, seed=seed)
    return evaluate(module, batches, sampling, with_teacher=False, keep_samples=0)


# General prompts on which drift from the base model is measured (`kl_from_reference`), in two disjoint parts as
# every evaluation here: "val" for searches (the 16 an earlier recipe search used), "eval" for reported numbers.
GENERAL_PROMPTS: dict[str, tuple[str, ...]] = {
    "val": (
        "Write a short poem about the sea.", "Explain what photosynthesis is in two sentences.",
        "Give me three tips for sleeping better.", "What is the difference between weather and climate?",
        "Describe a cat to someone who has never seen one.", "How do I boil an egg?",
        "Why is the sky blue?", "Write a friendly email inviting a colleague to lunch.",
        "What are the primary colors?", "Summarize the story of Little Red Riding Hood.",
        "Name three benefits of regular exercise.", "What does a librarian do?",
        "How many days are there in a leap year, and why?", "Suggest a name for a small bakery.",
        "What is a prime number? Give an example.", "Translate 'good morning' into French and Spanish.",
    ),
    "eval": (
        "Write a haiku about autumn leaves.", "Explain how a rainbow forms.",
        "Give me two ideas for a rainy afternoon.", "What is the difference between a frog and a toad?",
        "Describe the taste of a lemon.", "How do I make a cup of tea?",
        "Why do we have seasons?", "Write a short thank-you note to a neighbour who watered my plants.",
        "What are the three states of matter?", "Summarize the story of Cinderella.",
        "Name three ways to save water at home.", "What does a firefighter do?",
        "Why do leaves change colour in the fall?", "Suggest a name for a pet goldfish.",
        "What is an even number? Give an example.", "How do you say 'thank you' in German?",
    ),
}


@torch.no_grad()
def evaluate_run(module, datamodule, *, with_teacher: bool, samples: int = 0, temperature: float = 1.0, seed: int = 0,
                 keep_samples: int = 8, probes: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """One evaluation as every run driver records it (`train.py`, the experiments): the greedy accuracy of the
    student, and of the teacher with its context when `with_teacher` (`EvalResult.as_dict()`); with `samples`,
    the student's sampled accuracy under `sampled` (`samples` per prompt at `temperature`, sampler seed
    1000 + `seed`); the probes' accuracies under `probes` (when the data has probes and `probes`); `seconds`, all
    included."""
    t0 = time.perf_counter()
    result = evaluate(module, datamodule.val_dataloader(), with_teacher=with_teacher, keep_samples=keep_samples,
                      progress=progress)
    record = result.as_dict()
    if samples and result.n:
        s = evaluate_sampled(module, datamodule.val_dataloader(), samples, temperature, 1000 + int(seed))
        record["sampled"] = {"student_accuracy": s.student_accuracy, "n": s.n, "samples_per_prompt": samples,
                             "temperature": temperature, "mean_completion_tokens": s.mean_completion_tokens}
    by_probe = evaluate_probes(module, datamodule) if probes else {}
    if by_probe:
        record["probes"] = by_probe
    record["seconds"] = time.perf_counter() - t0
    return record


def kl_from_reference(model, reference, tokenizer, prompts: list[str] | tuple[str, ...] | None = None, *,
                      max_new_tokens: int = 48, pad_token_id: int | None = None, system_prompt: str | None = None,
                      batch_size: int = 16) -> dict:
    """How far `model` has drifted from `reference` (e.g. the base model) on general prompts (default: the test
    part, `GENERAL_PROMPTS["eval"]`): `model` writes greedy completions of the chat-formatted `prompts`, and the
    per-token KL(model || reference) = sum_v M(v) (log M(v) - log R(v)) is averaged over all completion tokens
    (mean) and per prompt.

    Returns `{"kl_mean": float, "kl_per_prompt": [float], "tokens": int}`; 0 when the two models are equal."""
    from lightning_sd.losses import per_token_divergence

    prompts = GENERAL_PROMPTS["eval"] if prompts is None else prompts
    encoder = PromptEncoder(tokenizer, system_prompt, pad_token_id=tokenizer.pad_token_id if pad_token_id is None
                            else pad_token_id)
    pad = encoder.pad_token_id
    device, ref_device = next(model.parameters()).device, next(reference.parameters()).device
    per_prompt, total, count = [], 0.0, 0
    with sampling_mode(model), sampling_mode(reference):
        for i in range(0, len(prompts), batch_size):
            enc = encoder.encode(list(prompts[i:i + batch_size]))
            ids, mask = enc.ids.to(device), enc.mask.to(device)
            roll = sample(model, ids, mask, SamplingConfig(do_sample=False, max_new_tokens=max_new_tokens),
                          pad_token_id=pad, stop_token_ids=stop_ids(tokenizer))
            m_logits = completion_logits(model, ids, mask, roll.completion_ids, roll.completion_mask).double()
            r_logits = completion_logits(reference, ids.to(ref_device), mask.to(ref_device),
                                         roll.completion_ids.to(ref_device), roll.completion_mask.to(ref_device))
            kl = per_token_divergence(m_logits, r_logits.double().to(device), beta=1.0)  # S=model, T=reference
            cmask = roll.completion_mask.to(kl.dtype)
            per_prompt += [float((kl[r] * cmask[r]).sum() / cmask[r].sum().clamp(min=1.0)) for r in range(kl.size(0))]
            total += float((kl * cmask).sum())
            count += int(cmask.sum())
    return {"kl_mean": total / max(count, 1), "kl_per_prompt": per_prompt, "tokens": count}
