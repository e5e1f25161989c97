"""`generation.backend=vllm`: rollouts from a colocated vLLM engine (one engine per rank, tensor parallel 1).

Per optimizer step: the student's weights (LoRA merged, wrapper prefixes stripped, gathered under FSDP /
ZeRO-3), cast to the engine's dtype, are reloaded into the engine in place, the prompts are sampled with
explicit `SamplingParams`, and the sampled token ids and their log-probs under the sampler's processed
distribution (temperature, top-k, top-p: `sampling.sampler_token_logprobs`) are returned as a `Rollout`. The
trainer recomputes log-probs; `loss.is_clip` weights each token by `min(exp(log S - log S_vllm), is_clip)`.

The engine runs in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), on the GPU, or on the CPU with
vLLM's CPU build (`make vllm`; docs/vllm.md).
"""

from __future__ import annotations

import os
import re
import time
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


ENGINE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}


class VllmError(RuntimeError):
    """The vLLM engine cannot serve this run (it did not start, or a prompt does not fit); the message says what
    to change. Raised before any training state changes."""


def repack_tied_head(model: nn.Module) -> None:
    """vLLM's CPU build packs each linear layer's weights for its GEMM kernels once they are loaded. An in-place
    reload repacks every layer it loads, but an output head tied to the input embedding is never loaded itself,
    so it would keep sampling from the old embedding: pack it again from the (reloaded) shared weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        if type(module).__name__.endswith("LMHead") and getattr(module, "cpu_linear", None) is not None:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class VllmBackend:
    """A colocated vLLM engine per rank. `rollout(...)` has the signature `rollout.rollout_on` calls.

    Args: `model_path` (a local Hugging Face folder with the student's architecture and tokenizer), `tokenizer`,
    `dtype` (the engine's: float32, bf16 or fp16), `gpu_memory_utilization` (on a GPU, the engine shares it
    with training), `max_prompt_length` (with the completion length it sets the engine's `max_model_len`),
    `cpu_kv_cache_gib` (on a CPU, the whole GiB of KV cache vLLM reserves, unless `VLLM_CPU_KVCACHE_SPACE` is set).
    """

    def __init__(self, model_path: str | None, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_prompt_length: int | None = None, cpu_kv_cache_gib: int = 1) -> None:
        if not model_path:
            raise VllmError("generation.backend=vllm needs a model folder vLLM can load: set model.name=hf "
                            "model.name_or_path=<folder>")
        if dtype not in ENGINE_DTYPES:
            raise VllmError(f"generation.backend=vllm: dtype {dtype!r} is not one of {sorted(ENGINE_DTYPES)}")
        self.model_path, self.tokenizer, self.dtype = model_path, tokenizer, ENGINE_DTYPES[dtype]
        self.gpu_memory_utilization, self.max_prompt_length = gpu_memory_utilization, max_prompt_length
        if int(cpu_kv_cache_gib) != cpu_kv_cache_gib or cpu_kv_cache_gib < 1:
            raise VllmError(f"the CPU engine's KV cache is a whole number of GiB >= 1, got {cpu_kv_cache_gib}")
        self.cpu_kv_cache_gib = int(cpu_kv_cache_gib)  # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer
        self._llm = None
        self._synced_step: int | None = None
        self.engine_start_seconds: float | None = None

    @property
    def on_cpu(self) -> bool:
        return not torch.cuda.is_available()

    def engine(self, max_new_tokens: int | None = None):
        """The engine, started on first use (in this process; on a CPU, eager mode: no graph compilation)."""
        if self._llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine in this process
            if self.on_cpu:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))
            try:
                import vllm
            except ImportError as err:
                raise ImportError("generation.backend=vllm needs vLLM: on a GPU `pip install vllm`, on a CPU `make "
                                  "vllm` (vLLM's CPU build in its own environment, docs/vllm.md); or use "
                                  "generation.backend=hf, the built-in sampler") from err
            max_model_len = (self.max_prompt_length + max_new_tokens
                             if self.max_prompt_length and max_new_tokens else None)
            kwargs = dict(model=self.model_path, dtype=self.dtype, enable_prefix_caching=False, seed=0,
                          max_model_len=max_model_len, logprobs_mode="processed_logprobs")
            if self.on_cpu:
                kwargs["enforce_eager"] = True
            else:
                kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            threads, set_threads = torch.get_num_threads(), torch.set_num_threads
            t0 = time.perf_counter()
            try:
                self._llm = vllm.LLM(**kwargs)
            except Exception as err:  # noqa: BLE001  (vLLM raises many kinds; each is reported with its message)
                raise VllmError(f"the vLLM engine did not start for {self.model_path} ({type(err).__name__}: "
                                f"{str(err).strip()[:800]}). If vLLM does not support this architecture or "
                                f"machine, use generation.backend=hf (the built-in sampler)") from err
            finally:
                # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process, and may lower
                # the threads for serving: the trainer's (and the user's) thread setting is given back
                torch.set_num_threads = set_threads
                torch.set_num_threads(threads)
            self.engine_start_seconds = time.perf_counter() - t0
        return self._llm

    @property
    def max_model_len(self) -> int:
        return int(self.engine().llm_engine.model_config.max_model_len)

    def sync_weights(self, student: nn.Module) -> None:
        """Reload the student's current weights into the engine in place, cast to the engine's dtype (call with
        full weights: see `rollout`)."""
        dtype = getattr(torch, self.dtype)
        weights = [(name, value.to(dtype)) for name, value in student_weights(student)]
        llm = self.engine()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.on_cpu:
            llm.apply_model(repack_tied_head)

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        limit = self.max_model_len
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > limit:
            raise VllmError(f"a prompt of {longest} tokens plus generation.max_new_tokens={max_new_tokens} exceeds "
                            f"the vLLM engine's max_model_len={limit}: lower data.max_prompt_length (prompts are "
                            f"truncated to it) or generation.max_new_tokens")

    def rollout(self, trainer, pl_module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: SamplingConfig,
                seed: int) -> Rollout:
        from lightning_sd.distributed import gathered_for_generation
        from lightning_sd.rollout import stop_ids

        self.engine(config.max_new_tokens)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        self.check_prompts(prompts, config.max_new_tokens)
        step = int(getattr(trainer, "global_step", 0)) if trainer is not None else 0
        if self._synced_step != step:  # once per optimizer step, on every rank (a collective under FSDP / ZeRO-3)
            with gathered_for_generation(trainer, pl_module.student) as student:
                self.sync_weights(student)
            self._synced_step = step
        from vllm import SamplingParams

        stops = stop_ids(pl_module.tokenizer, list(config.stop_token_ids or []))
        outputs = self.engine().generate([{"prompt_token_ids": p} for p in prompts],
                                         SamplingParams(**sampling_params_kwargs(config, seed, stops)), use_tqdm=False)
        rollout = rollout_from_outputs(outputs, prompt_ids, prompt_mask, config.n, pad_token_id=pl_module.pad_token_id,
                                       stop_token_ids=stops)
        rollout.sampling = config  # processed log-probs: the tempered, filtered distribution, as the built-in sampler
        return rollout
