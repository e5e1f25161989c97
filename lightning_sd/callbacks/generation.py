"""`OnPolicyGeneration`: before each training step, sample completions from the *current* student for the
batch's prompts and put them into the batch (`batch.rollout`, `batch.completion_text`, and, when the
module has a task with a verifier, `batch.rewards` / `batch.feedback`).

Sampling runs in eval mode under `torch.no_grad()` with the KV cache on and gradient checkpointing off,
inside the precision plugin's forward context (so it sees the same precision as training), and restores
every mode in `finally`. Seeds derive from (seed, epoch, batch index, rank), so a resumed run samples the
same completions as an uninterrupted one.
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback

from lightning_sd.batch import StepBatch
from lightning_sd.rollout import decode_completions, derive_seed, rollout_on, score_rollouts
from lightning_sd.sampling import SamplingConfig


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

    def on_train_batch_start(self, trainer, pl_module, batch: StepBatch, batch_idx) -> None:
        # SFT samples nothing; on-policy KD with lmbda < 1 skips some batches (same choice on every rank)
        decide = getattr(pl_module, "samples_batch", None)
        if not getattr(pl_module, "needs_rollouts", True) or (
                decide is not None and not decide(self.config.seed, trainer.global_step, batch_idx)):
            batch.on_policy = False
            return
        batch.on_policy = True
        seed = derive_seed(self.config.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        t0 = time.perf_counter()
        rollout = rollout_on(trainer, pl_module, pl_module.student, batch.prompt_ids, batch.prompt_mask,
                             self.config, seed, backend=self.backend, gather=self.gather_weights)
        batch.gen_seconds = time.perf_counter() - t0
        batch.rollout = rollout
        texts = decode_completions(pl_module.tokenizer, rollout)
        batch.completion_text = texts
        task = getattr(pl_module, "task", None)
        if task is not None:
            rewards, feedback, failures = score_rollouts(task, batch.records, texts, rollout.prompt_index,
                                                         self.verifier_timeout_s)
            batch.rewards, batch.feedback, batch.verifier_failures = rewards, feedback, failures
