"""Rollout backends other than the built-in sampler (`lightning_sd.sampling.sample`, `generation.backend=hf`).

`vllm` (on a GPU `pip install vllm`; on a CPU `make vllm`, docs/vllm.md): rollouts from a colocated vLLM engine
whose weights are reloaded from the student before each optimizer step's rollouts; the sampler's own token
log-probs come back in `Rollout.logprobs`, so `loss.is_clip` applies the importance-weight correction. The
pieces that need no vLLM (weight-name mapping, LoRA merging, log-prob extraction, rollout assembly) are tested
everywhere; the engine itself by `tests/test_vllm.py` wherever vLLM is importable.
"""

from lightning_sd.rollout_backends.vllm import (VllmBackend, VllmError, rollout_from_outputs, sampled_logprobs,
                                                student_weights, vllm_weight_name)

__all__ = ["VllmBackend", "VllmError", "rollout_from_outputs", "sampled_logprobs", "student_weights",
           "vllm_weight_name"]
