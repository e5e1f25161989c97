"""`generation.backend=vllm`: rollouts from a colocated vLLM engine (one engine per rank, tensor parallel 1).

Per optimizer step: the student's weights (LoRA merged, wrapper prefixes stripped, gathered under FSDP /
ZeRO-3) are loaded into the engine, the prompts are sampled with explicit `SamplingParams`, and the sampled
token ids and their log-probs under the sampler's processed distribution are returned as a `Rollout`.
The trainer recomputes log-probs; `loss.is_clip` weights each token by `min(exp(log S - log S_vllm), is_clip)`.

Unverified: vLLM cannot be installed on this project's machines; everything but `VllmBackend` is tested on CPU.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from lightning_sd.sampling import Rollout, SamplingConfig

# wrapper prefixes that never appear in a Hugging Face checkpoint: FSDP1, activation checkpointing,
# torch.compile, DDP/DeepSpeed `module.`, PEFT's `base_model.model.`
_WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def vllm_weight_name(name: str) -> str | None:
    """The checkpoint name vLLM's `load_weights` expects for a student parameter name, or None for a parameter
    that is not a base weight (LoRA `lora_A` / `lora_B` / embeddings of any adapter).

    >>> vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    while True:
        stripped = _WRAPPERS.sub(r"\1", name)
        if stripped == name:
            break
        name = stripped
    if re.search(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.", name):
        return None
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def student_weights(student: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(checkpoint name, tensor)` for every base weight of the student, with the active LoRA adapter merged
    (`W + scaling * B @ A`, computed on the fly: the student is not modified). Call with full (gathered)
    weights under FSDP / ZeRO-3. A tied output embedding comes once, under the input embedding's name (vLLM
    ties it itself)."""
    deltas: dict[int, torch.Tensor] = {}
    for module in student.modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not module.disable_adapters:
            delta = None
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[id(module.base_layer.weight)] = delta
    for name, p in student.named_parameters():  # shared (tied) parameters once
        target = vllm_weight_name(name)
        if target is None:
            continue
        value = p.detach()
        if id(p) in deltas:
            value = value + deltas[id(p)].to(value.dtype)
        yield target, value


def sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """Log-prob of each sampled token from a vLLM `CompletionOutput.logprobs` (one entry per position: a dict
    `{token_id: Logprob(logprob=...)}` or `{token_id: float}`), requested with `SamplingParams(logprobs=0)`."""
    if logprobs is None:
        raise ValueError("vLLM returned no log-probs: the backend must sample with SamplingParams(logprobs=0)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned {len(logprobs)} log-prob entries for {len(token_ids)} tokens")
    out = []
    for t, (tok, entry) in enumerate(zip(token_ids, logprobs)):
        if tok not in entry:
            raise ValueError(f"vLLM log-probs at position {t} do not contain the sampled token {tok}")
        value = entry[tok]
        out.append(float(getattr(value, "logprob", value)))
    return out


def rollout_from_outputs(outputs: Sequence[Any], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, *,
                         pad_token_id: int, stop_token_ids: Iterable[int]) -> Rollout:
    """A `Rollout` (R = B * n rows, rows of one prompt adjacent) from vLLM `RequestOutput`s, one per prompt, each
    with `n` `CompletionOutput`s (`token_ids`, `logprobs`). Completions are right-padded with `pad_token_id`;
    the mask covers tokens up to and including the first stop token (as `sampling.sample` does)."""
    if len(outputs) != prompt_ids.size(0):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {prompt_ids.size(0)} prompts")
    rows_ids, rows_lp = [], []
    for i, request in enumerate(outputs):
        if len(request.outputs) != n:
            raise ValueError(f"prompt {i}: vLLM returned {len(request.outputs)} completions, expected n={n}")
        for completion in request.outputs:
            ids = list(completion.token_ids)
            rows_ids.append(ids)
            rows_lp.append(sampled_logprobs(ids, completion.logprobs))
    width = max(1, max(len(r) for r in rows_ids))
    rows = len(rows_ids)
    completion = torch.full((rows, width), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(rows, width, dtype=torch.float32)
    for r, (ids, lp) in enumerate(zip(rows_ids, rows_lp)):
        completion[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[r, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    lengths = torch.tensor([len(r) for r in rows_ids])
    in_range = torch.arange(width)[None, :] < lengths[:, None]
    stop = torch.tensor(sorted(set(int(s) for s in stop_token_ids)), dtype=torch.long)
    is_stop = torch.isin(completion, stop) & in_range
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()
    mask = ((stops_before == 0) & in_range).long()
    completion = completion.masked_fill(mask == 0, pad_token_id)
    logprobs = logprobs.masked_fill(mask == 0, 0.0)
    device = prompt_ids.device
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(n, dim=0), prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
                   completion_ids=completion.to(device), completion_mask=mask.to(device), logprobs=logprobs.to(device),
                   truncated=(~is_stop.any(-1)).to(device),
                   prompt_index=torch.arange(prompt_ids.size(0), device=device).repeat_interleave(n))


def sampling_params_kwargs(config: SamplingConfig, seed: int, stop_token_ids: Sequence[int]) -> dict:
    """`vllm.SamplingParams` keyword arguments equal to our `SamplingConfig` (nothing left to vLLM's defaults)."""
    return dict(n=config.n, max_tokens=config.max_new_tokens, temperature=config.temperature if config.do_sample else 0.0,
                top_p=config.top_p, top_k=config.top_k if config.top_k > 0 else -1, seed=int(seed) % (2**31),
                logprobs=0, stop_token_ids=[] if config.fixed_length else list(stop_token_ids),
                ignore_eos=bool(config.fixed_length), skip_special_tokens=False, detokenize=False)


class VllmBackend:
    """A colocated vLLM engine per rank. `rollout(...)` has the signature `rollout.rollout_on` calls.

    Args: `model_path` (a local Hugging Face folder with the student's architecture and tokenizer), `tokenizer`,
    `dtype`, `gpu_memory_utilization` (the engine shares the GPU with training), `max_model_len`.
    """

    def __init__(self, model_path: str | None, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, max_prompt_length: int | None = None) -> None:
        if not model_path:
            raise ValueError("generation.backend=vllm needs a model folder vLLM can load: set model.name=hf "
                             "model.name_or_path=<folder>")
        self.model_path, self.tokenizer, self.dtype = model_path, tokenizer, dtype
        self.gpu_memory_utilization, self.max_model_len = gpu_memory_utilization, max_model_len
        self.max_prompt_length = max_prompt_length
        self._llm = None
        self._synced_step: int | None = None

    def engine(self):
        if self._llm is None:
            try:
                import vllm
            except ImportError as err:
                raise ImportError("generation.backend=vllm needs vLLM on a CUDA machine: pip install "
                                  "'lightning_sd[vllm]' (or use generation.backend=hf, the default)") from err
            dtype = {"float32": "float32", "fp32": "float32"}.get(self.dtype, "bfloat16")
            kwargs = dict(model=self.model_path, dtype=dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                          enable_prefix_caching=False, max_model_len=self.max_model_len)
            try:  # log-probs of the processed (temperature/top-k/top-p) distribution, like sampling.sample returns
                self._llm = vllm.LLM(**kwargs, logprobs_mode="processed_logprobs")
            except TypeError:
                self._llm = vllm.LLM(**kwargs)
        return self._llm

    def sync_weights(self, student: nn.Module) -> None:
        """Load the student's current weights into the engine (call with full weights: see `rollout`)."""
        weights = list(student_weights(student))
        llm = self.engine()
        if hasattr(llm, "apply_model"):
            llm.apply_model(lambda model: model.load_weights(weights))
        else:  # older vLLM: the in-process model runner
            llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def rollout(self, trainer, pl_module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: SamplingConfig,
                seed: int) -> Rollout:
        from lightning_sd.distributed import gathered_for_generation
        from lightning_sd.rollout import stop_ids

        step = int(getattr(trainer, "global_step", 0)) if trainer is not None else 0
        if self._synced_step != step:  # once per optimizer step, on every rank (a collective under FSDP / ZeRO-3)
            with gathered_for_generation(trainer, pl_module.student) as student:
                self.sync_weights(student)
            self._synced_step = step
        from vllm import SamplingParams

        stops = stop_ids(pl_module.tokenizer, list(config.stop_token_ids or []))
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        outputs = self.engine().generate(prompts, SamplingParams(**sampling_params_kwargs(config, seed, stops)),
                                         use_tqdm=False)
        rollout = rollout_from_outputs(outputs, prompt_ids, prompt_mask, config.n, pad_token_id=pl_module.pad_token_id,
                                       stop_token_ids=stops)
        rollout.sampling = config  # processed log-probs: the tempered, filtered distribution, as the built-in sampler
        return rollout
