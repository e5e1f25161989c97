"""Rollout backends other than the built-in sampler (`lightning_sd.sampling.sample`, `generation.backend=hf`).

`vllm` (optional extra, `pip install 'lightning_sd[vllm]'`): rollouts from a colocated vLLM engine whose
weights are synced from the student before each optimizer step's rollouts; the sampler's own token log-probs
come back in `Rollout.logprobs`, so `loss.is_clip` applies the importance-weight correction. The pieces that
need no vLLM (weight-name mapping, LoRA merging, log-prob extraction, rollout assembly) are tested on CPU; the
engine itself has not been run by this project (see docs/scaling.md).
"""

from lightning_sd.rollout_backends.vllm import (VllmBackend, rollout_from_outputs, sampled_logprobs, student_weights,
                                                vllm_weight_name)

__all__ = ["VllmBackend", "rollout_from_outputs", "sampled_logprobs", "student_weights", "vllm_weight_name"]
