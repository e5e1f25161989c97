"""`OnPolicyGeneration`: before each training step, sample completions from the *current* student for the
batch's prompts and put them into the batch (`batch["rollout"]`, `batch["completion_text"]`, and, when the
module has a task with a verifier, `batch["rewards"]` / `batch["feedback"]`).

Sampling runs in eval mode under `torch.no_grad()` with the KV cache on and gradient checkpointing off,
inside the precision plugin's forward context (so it sees the same precision as training), and restores
every mode in `finally`. Seeds derive from (seed, epoch, batch index, rank), so a resumed run samples the
same completions as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_sd.models import checkpointing_prefix
from lightning_sd.sampling import Rollout, SamplingConfig, sample


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    """Sample from `network` under the trainer's precision context, in lock-step across ranks: every rank
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

    precision = strategy.precision_plugin.forward_context() if strategy is not None else _null()
    sync_every = 1 if prompt_ids.device.type == "cpu" else 8
    with sampling_mode(network), gathered_for_generation(trainer, network, enabled=gather) as net, precision:
        return sample(net, prompt_ids, prompt_mask, config, pad_token_id=pl_module.pad_token_id,
                      stop_token_ids=stop_ids(pl_module.tokenizer, list(config.stop_token_ids or [])),
                      generator=generator, keep_going=keep_going, sync_every=sync_every)


@contextmanager
def _null():
    yield


def score_rollouts(task, records: list[dict], texts: list[str], prompt_index: torch.Tensor,
                   timeout_s: float | None = 10.0) -> tuple[list[float | None], list[str | None], int]:
    """Verify each completion: rewards (None where the verifier failed), feedback texts, failure count."""
    from lightning_sd.data.tasks.base import safe_verify

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


class OnPolicyGeneration(Callback):
    """Samples `config.n` completions per prompt from the current student before every training batch.

    Writes into the batch dict (the same object `training_step` receives):
    `rollout` (`Rollout`: prompt/completion ids and masks, sampler log-probs `[R, C]`, `truncated [R]`),
    `completion_text` (list of R strings), `gen_seconds`, and `rewards` / `feedback` / `verifier_failures`
    when the module has a `task`; `on_policy` (bool). Nothing is sampled (`on_policy=False`) when the module's
    `needs_rollouts` is False (SFT) or its `samples_batch(seed, global_step, batch_idx)` says no (on-policy KD
    with `loss.lmbda < 1`); the module then trains on the dataset's reference completions.
    """

    def __init__(self, config: SamplingConfig | dict | None = None, verifier_timeout_s: float | None = 10.0,
                 backend=None, gather_weights: bool = True) -> None:
        super().__init__()
        self.config = config if isinstance(config, SamplingConfig) else SamplingConfig(**(config or {}))
        self.config.validate()
        self.verifier_timeout_s = verifier_timeout_s
        self.backend = backend  # None: the built-in sampler; else e.g. rollout_backends.VllmBackend
        self.gather_weights = gather_weights  # FSDP / ZeRO-3: gather once per rollout (trainer.gather_for_generation)
        self.verifier_failures = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # SFT samples nothing; on-policy KD with lmbda < 1 skips some batches (same choice on every rank)
        decide = getattr(pl_module, "samples_batch", None)
        if not getattr(pl_module, "needs_rollouts", True) or (
                decide is not None and not decide(self.config.seed, trainer.global_step, batch_idx)):
            batch["on_policy"] = False
            return
        batch["on_policy"] = True
        seed = derive_seed(self.config.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        t0 = time.perf_counter()
        rollout = rollout_on(trainer, pl_module, pl_module.student, batch["prompt_ids"], batch["prompt_mask"],
                             self.config, seed, backend=self.backend, gather=self.gather_weights)
        batch["gen_seconds"] = time.perf_counter() - t0
        batch["rollout"] = rollout
        texts = pl_module.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)],
            skip_special_tokens=True)
        batch["completion_text"] = texts
        task = getattr(pl_module, "task", None)
        if task is not None:
            rewards, feedback, failures = score_rollouts(task, batch["records"], texts, rollout.prompt_index,
                                                         self.verifier_timeout_s)
            self.verifier_failures += failures
            batch["rewards"], batch["feedback"], batch["verifier_failures"] = rewards, feedback, failures

    def state_dict(self) -> dict:
        return {"verifier_failures": self.verifier_failures}

    def load_state_dict(self, state_dict: dict) -> None:
        self.verifier_failures = state_dict.get("verifier_failures", 0)
