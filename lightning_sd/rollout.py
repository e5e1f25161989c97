"""Sampling rollouts from a network inside a training run: `rollout_on` samples under the trainer's precision
context and in lock-step across ranks; `sampling_mode` sets eval mode, no grad and gradient checkpointing off
for the duration; `stop_ids` the tokens that end a completion; `derive_seed` a stable seed from integers;
`decode_completions` the completion texts of a `Rollout`.

Used by the rollout callback (`generation.OnPolicyGeneration`), the methods that sample (`methods/`),
evaluation and the rollout backends. The decode loop itself is `sampling.sample`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lightning_sd.data.tasks.base import safe_verify, stable_hash
from lightning_sd.models import checkpointing_prefix
from lightning_sd.sampling import Rollout, SamplingConfig, sample


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return stable_hash(",".join(str(int(p)) for p in parts), "little") & ((1 << 63) - 1)


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no grad, gradient checkpointing off; previous modes restored afterwards (also on error)."""
    was_training = model.training
    prefix = checkpointing_prefix(model)
    checkpointing = bool(getattr(model, f"is_{prefix}_checkpointing", False))
    try:
        if checkpointing:
            getattr(model, f"{prefix}_checkpointing_disable")()
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        if checkpointing:
            getattr(model, f"{prefix}_checkpointing_enable")()
        model.train(was_training)


def stop_ids(tokenizer, extra: list[int] | None = None) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS plus `extra`."""
    ids = list(extra or [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and generation.stop_token_ids is empty: set one so "
                         "completions can end")
    return sorted(set(ids))


def rollout_on(trainer, pl_module, network: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               config: SamplingConfig, seed: int, *, backend=None, gather: bool = True) -> Rollout:
    """Sample from `network` under the trainer's precision context (with `config.dtype` set: in that dtype, on
    a cast copy of the weights, without the precision context), in lock-step across ranks: every rank
    decodes until *all* ranks are done, so sharded forwards never wait on a rank that stopped.

    Under FSDP / DeepSpeed ZeRO-3 the weights of `network` are gathered once for the whole rollout
    (`gather=False`: fetched layer by layer at every decode step, for models too large for one device).
    `backend` (e.g. `rollout_backends.VllmBackend`) replaces the built-in sampler."""
    if backend is not None:
        return backend.rollout(trainer, pl_module, prompt_ids, prompt_mask, config, seed)
    from lightning_sd.distributed import gathered_for_generation

    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    strategy = trainer.strategy if trainer is not None else None

    def keep_going(local_done: bool) -> bool:
        if strategy is None or trainer.world_size == 1:
            return not local_done
        return not strategy.reduce_boolean_decision(local_done, all=True)

    # generation.dtype set: the rollout computes in that dtype (`sampling.compute_network`), outside the precision
    # plugin's context (its autocast or default dtype)
    own_precision = strategy is not None and config.dtype is None
    precision = strategy.precision_plugin.forward_context() if own_precision else _null()
    sync_every = 1 if prompt_ids.device.type == "cpu" else 8
    with sampling_mode(network), gathered_for_generation(trainer, network, enabled=gather) as net, precision:
        return sample(net, prompt_ids, prompt_mask, config, pad_token_id=pl_module.pad_token_id,
                      stop_token_ids=stop_ids(pl_module.tokenizer, list(config.stop_token_ids or [])),
                      generator=generator, keep_going=keep_going, sync_every=sync_every)


@contextmanager
def _null():
    yield


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """The completion text of every row of `rollout` (padding dropped, special tokens skipped)."""
    return tokenizer.batch_decode(
        [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)],
        skip_special_tokens=True)


def score_rollouts(task, records: list[dict], texts: list[str], prompt_index: torch.Tensor,
                   timeout_s: float | None = 10.0) -> tuple[list[float | None], list[str | None], int]:
    """Verify each completion: rewards (None where the verifier failed), feedback texts, failure count (the
    one place failures are counted; `FailureCounters` keeps the run's total from the batch's count)."""
    rewards, feedback, failures = [], [], 0
    for r, text in enumerate(texts):
        verdict = safe_verify(task, records[int(prompt_index[r])], text, timeout_s=timeout_s)
        if verdict is None:
            failures += 1
            rewards.append(None)
            feedback.append(None)
        else:
            rewards.append(float(verdict.reward))
            feedback.append(verdict.feedback)
    return rewards, feedback, failures


__all__ = ["derive_seed", "sampling_mode", "stop_ids", "rollout_on", "decode_completions", "score_rollouts"]
