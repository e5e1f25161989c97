"""On-policy sampling: a small explicit decode loop over any Hugging Face causal LM with a KV cache.

Why not `model.generate`: every sampling setting here is explicit (nothing is inherited from the model's
`generation_config`), the sampler's own log-probs come out at O(rows x vocab) memory, and decoding can be
kept in lock-step across ranks (`keep_going` hook) so sharded models never deadlock when one rank's
completions stop early.

Conventions: prompts are LEFT-padded `[R, P]`; completions are RIGHT-padded `[R, C]` with `pad_token_id`;
`completion_mask` is 1 for every generated token up to and including the first stop token.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lightning_sd.cpu_linear import onednn_linears
from lightning_sd.lean_decode import LeanDecoder, base_model, compilable, compiled_reads_packed
from lightning_sd.lean_decode import supports as supports_lean
from lightning_sd.losses.support import compute_dtype
from lightning_sd.models import DTYPES


@dataclass
class SamplingConfig:
    """Every setting of the rollout sampler. `top_k=0` and `top_p=1.0` switch those filters off;
    `do_sample=False` is greedy decoding. `fixed_length=True` always decodes `max_new_tokens` steps (stop
    tokens still end the *mask*): used by benchmarks so that runs do the same work. `share_prefill=True` (with
    n > 1) prefills each distinct prompt once and repeats its KV cache n ways instead of prefilling all R rows;
    the samples are the same either way (False: the benchmarks' baseline). `dtype` (`bf16`, `fp16`, `fp32`;
    None: the model's own dtype under the caller's autocast, if any) runs the rollout without autocast on a copy
    of the weights cast to that dtype, made once per rollout (`compute_network`); the log-probs it returns are
    the copy's, so `loss.is_clip` can weight the difference to the trainer.
    `lean_decode=True` decodes Llama-family models (Llama, SmolLM, Qwen2, Mistral) with `lean_decode.LeanDecoder`,
    the same computation in fewer operations with an in-place KV cache; False, or another family: the model's
    own forward each step. `compile_decode=True` runs that step through `torch.compile` (`LeanDecoder`'s
    `compiled`; plain projections only, LoRA students keep the eager step): compiled once per process, then
    reused for new weights. The defaults are those of
    the `generation` group's default option (conf/generation/default.yaml), whose schema derives from this."""

    n: int = 1
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    stop_token_ids: list[int] | None = None
    fixed_length: bool = False
    seed: int = 0
    share_prefill: bool = True
    dtype: str | None = None
    lean_decode: bool = True
    compile_decode: bool = False

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"generation.dtype={self.dtype!r} is not one of null, bf16, fp16, fp32")
        if self.n < 1:
            raise ValueError(f"generation.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.compile_decode and not self.lean_decode:
            raise ValueError("generation.compile_decode=true compiles the lean decode step: set "
                             "generation.lean_decode=true, or generation.compile_decode=false")


@dataclass
class Rollout:
    """Completions for R = B * n rows (rows of one prompt are adjacent: row r belongs to prompt r // n)."""

    prompt_ids: torch.Tensor  # [R, P] left-padded
    prompt_mask: torch.Tensor  # [R, P]
    completion_ids: torch.Tensor  # [R, C] right-padded with pad id
    completion_mask: torch.Tensor  # [R, C] 1 up to and including the first stop token
    logprobs: torch.Tensor  # [R, C] log-prob of each sampled token under the sampler's (processed) distribution
    truncated: torch.Tensor  # [R] bool: no stop token within max_new_tokens
    prompt_index: torch.Tensor  # [R] long: index of the prompt in the batch
    extras: dict = field(default_factory=dict)  # e.g. "rollout_copy_bytes": size of a `generation.dtype` copy
    sampling: SamplingConfig | None = None  # the distribution `logprobs` come from; None: not sampled (dataset)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: `[B, L]` mask -> `[B, L]` positions (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) to `[R, V]` logits; filtered entries become -inf.
    Float32 out (float64 for float64 logits)."""
    logits = logits.to(compute_dtype(logits)) / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (always keeps the first)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampler_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, config: SamplingConfig,
                           chunk_rows: int = 64) -> torch.Tensor:
    """Log-probs `[...]` of `tokens` `[...]` under exactly the distribution `sample` drew them from, given
    logits `[..., V]` of the same weights: temperature, then top-k, then top-p (`filter_logits`); greedy
    decoding records the untempered, unfiltered log-softmax, and so does this. A token outside the filtered
    support gets -inf. No grad; float32 (float64 for float64 logits); `chunk_rows` rows of `V` at a time (top-p
    sorts each row)."""
    with torch.no_grad():
        flat = logits.detach().reshape(-1, logits.size(-1))
        ids = tokens.reshape(-1, 1)
        out = torch.empty(flat.size(0), dtype=compute_dtype(flat), device=flat.device)
        for a in range(0, flat.size(0), chunk_rows):
            block = flat[a:a + chunk_rows]
            if config.do_sample:
                block = filter_logits(block, config.temperature, config.top_k, config.top_p)
            out[a:a + chunk_rows] = block.to(out.dtype).log_softmax(-1).gather(-1, ids[a:a + chunk_rows]).squeeze(-1)
        return out.view(tokens.shape)


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: `cache` in transformers >= 5.2x, `past_key_values` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _make_cache(model):
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    except TypeError:  # older transformers
        return DynamicCache()


def sample_categorical(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from the distribution `exp(logp)`, `logp` `[R, V]` (normalized log-probs, -inf allowed)
    -> `[R]` long. Inverse CDF with one uniform per row (cumulative sums in float64), cheaper than
    `torch.multinomial`, which draws V exponentials per row (measurements: docs/performance.md). An entry of
    probability 0 is never drawn: u is in (0, 1], and the first index whose cumulative sum reaches u * total
    has mass > 0."""
    cdf = logp.exp().cumsum(-1, dtype=torch.float64)
    u = 1.0 - torch.rand(cdf.size(0), 1, generator=generator, dtype=torch.float64, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=cdf.size(-1) - 1)


def floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of `model` (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """A copy of `model` whose floating-point parameters and buffers are new `dtype` tensors (parameters without
    grad), cast as `model.to(dtype)` would, and the bytes of those new tensors. `model` is left as it was, and
    no full-precision copy is made on the way: each tensor is cast straight from the original. Other tensors
    are shared with `model`; tied weights stay tied (one cast per tensor)."""
    memo: dict[int, torch.Tensor] = {}
    size = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        if not t.is_floating_point():
            memo[id(t)] = t
            continue
        cast = t.detach().to(dtype=dtype, copy=True)
        memo[id(t)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cast
        size += cast.numel() * cast.element_size()
    return copy.deepcopy(model, memo), size


@contextmanager
def compute_network(model: torch.nn.Module, dtype: str | None) -> Iterator[tuple[torch.nn.Module, int]]:
    """`(network, copy bytes)` for a rollout in `dtype` (a `models.DTYPES` name). None: `model` itself, under
    whatever autocast the caller set. Else autocast is off inside, and the network is `model` when that is its
    dtype already, or a `cast_copy` of it (dropped on exit)."""
    if dtype is None:
        yield model, 0
        return
    target = DTYPES[dtype]
    net, size = (model, 0) if floating_dtype(model) in (target, None) else cast_copy(model, target)
    device = next(model.parameters(), torch.empty(0)).device
    with torch.autocast(device.type, enabled=False):
        yield net, size


def cache_expandable(cache) -> bool:
    """Whether every layer of `cache` can be repeated along its batch dimension (`batch_repeat_interleave`):
    true for the dynamic full-attention and sliding-window layers, false for e.g. linear-attention states."""
    return hasattr(cache, "batch_repeat_interleave") and all(
        hasattr(layer, "batch_repeat_interleave") for layer in getattr(cache, "layers", []))


def _forward_last(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                  cache_arg: str) -> torch.Tensor:
    """One cached forward of `ids` `[rows, L]`; returns the last position's logits `[rows, V]`."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_arg: cache}, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1]


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, cache, cache_arg: str,
            share: bool) -> torch.Tensor:
    """Fill `cache` with the prompts `[B, P]` (left-padded) for R = B * n rows; returns the logits `[R, V]` of the
    first completion token. `share`: run the B distinct prompts once, then repeat the cache and the logits n
    ways (rows of one prompt adjacent); else run all R rows. Both give the same cache and logits."""
    mask = prompt_mask.long()
    if share and n > 1:
        logits = _forward_last(model, prompt_ids, mask, position_ids_from_mask(mask), cache, cache_arg)
        cache.batch_repeat_interleave(n)
        return logits.repeat_interleave(n, dim=0)
    ids, mask = prompt_ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    return _forward_last(model, ids, mask, position_ids_from_mask(mask), cache, cache_arg)


def draw(logits: torch.Tensor, config: SamplingConfig,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token `[R]` of every row from logits `[R, V]` and its log-prob `[R]` under the distribution it
    was drawn from (processed by temperature, top-k, top-p; greedy: the raw log-softmax). One uniform per row
    is drawn from `generator` when sampling, none when greedy."""
    if config.do_sample:
        logp_all = filter_logits(logits, config.temperature, config.top_k, config.top_p).log_softmax(-1)
        tok = sample_categorical(logp_all, generator)
    else:
        logp_all = logits.to(compute_dtype(logits)).log_softmax(-1)
        tok = logp_all.argmax(-1)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1)


def stop_masked(completion: torch.Tensor, logprobs: torch.Tensor, stop: torch.Tensor,
                pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completions `[R, C]` and log-probs `[R, C]` cut after the first stop token of each row: returns
    `(completion, completion_mask, logprobs, truncated [R])`, padding where the mask is 0."""
    is_stop = torch.isin(completion, stop)
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()
    completion_mask = (stops_before == 0).long()
    truncated = ~is_stop.any(-1)
    completion = completion.masked_fill(completion_mask == 0, pad_token_id)
    logprobs = logprobs.masked_fill(completion_mask == 0, 0.0)
    return completion, completion_mask, logprobs, truncated


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    generator: torch.Generator | None = None,
    keep_going: Callable[[bool], bool] | None = None,
    sync_every: int = 1,
) -> Rollout:
    """Sample `config.n` completions per prompt from `model` (call under eval mode; no grad is taken here).

    `prompt_ids`/`prompt_mask`: `[B, P]` left-padded. `keep_going(local_done) -> bool` lets the caller combine
    the "all rows finished" flag across ranks (all ranks must run the same number of forward passes under
    FSDP / ZeRO-3); it is called every `sync_every` steps. Returns a `Rollout` with R = B * n rows.
    With `config.share_prefill` and n > 1 the B prompts are prefilled once and their KV cache repeated n ways
    (same tokens and log-probs as prefilling all R rows: the draws consume `generator` identically).
    """
    config.validate()
    with compute_network(model, config.dtype) as (net, copy_bytes):
        compiled = _compiled_decode(net, config, prompt_ids.size(1))
        # a compiled step on bf16 weights reads them unpacked: only the output layer is packed then, for the
        # prefill's last position (a [R, 1, D] view that F.linear would multiply against R expanded copies of it)
        head_only = compiled and not compiled_reads_packed(next(net.parameters()).dtype)
        with onednn_linears(net, rows_hint=prompt_ids.size(0) * config.n,
                            only=[base_model(net).lm_head] if head_only else None):
            rollout = _sample_rows(net, prompt_ids, prompt_mask, config, pad_token_id, stop_token_ids, generator,
                                   keep_going, sync_every, compiled)
    if copy_bytes:
        rollout.extras["rollout_copy_bytes"] = copy_bytes
    return rollout


def _compiled_decode(model: torch.nn.Module, config: SamplingConfig, prompt_length: int) -> bool:
    """Whether this rollout decodes with the compiled lean step (`config.compile_decode`)."""
    return (config.lean_decode and config.compile_decode and config.max_new_tokens > 1
            and supports_lean(model, prompt_length + config.max_new_tokens) and compilable(model))


def _sample_rows(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 config: SamplingConfig, pad_token_id: int, stop_token_ids: Sequence[int],
                 generator: torch.Generator | None, keep_going: Callable[[bool], bool] | None,
                 sync_every: int, compiled: bool = False) -> Rollout:
    """Prefill and decode: prompts `[B, P]` -> a `Rollout` of R = B * n rows (`sample`); `compiled`: decode with
    the compiled lean step (`_compiled_decode` said so)."""
    n = config.n
    device = prompt_ids.device
    ids = prompt_ids.repeat_interleave(n, dim=0)
    mask = prompt_mask.repeat_interleave(n, dim=0).long()
    stop = torch.tensor(list(stop_token_ids), device=device, dtype=torch.long)
    cache = _make_cache(model)
    cache_arg = _cache_kwarg(model)
    logits = prefill(model, prompt_ids, prompt_mask, n, cache, cache_arg,
                     share=config.share_prefill and cache_expandable(cache))

    if config.lean_decode and config.max_new_tokens > 1 and supports_lean(model, mask.size(1) + config.max_new_tokens):
        step = LeanDecoder.from_cache(model, cache, mask.size(1), config.max_new_tokens - 1,
                                      compiled=compiled).step
        del cache  # its columns live on in the decoder's buffers
    else:
        def step(tok: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return _forward_last(model, tok[:, None], attn, pos[:, None], cache, cache_arg)

    tokens, logps = decode(step, logits, mask, config, stop, pad_token_id, generator, keep_going, sync_every)
    completion, completion_mask, logprobs, truncated = stop_masked(tokens, logps, stop, pad_token_id)
    return Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=completion, completion_mask=completion_mask,
                   logprobs=logprobs, truncated=truncated, sampling=config,
                   prompt_index=torch.arange(prompt_ids.size(0), device=device).repeat_interleave(n))


def decode(step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
           mask: torch.Tensor, config: SamplingConfig, stop: torch.Tensor, pad_token_id: int,
           generator: torch.Generator | None, keep_going: Callable[[bool], bool] | None,
           sync_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to `config.max_new_tokens` tokens per row, starting from the first token's logits `[R, V]` and
    the prompt mask `[R, P]`; `step(tokens [R], attention mask [R, L], positions [R]) -> logits [R, V]` runs
    one cached forward. Returns tokens and their log-probs `[R, C]` (pad id and 0 after a row's stop token)."""
    rows = logits.size(0)
    next_pos = position_ids_from_mask(mask)[:, -1] + 1
    tokens, logps = [], []
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    attn = mask
    for t in range(config.max_new_tokens):
        tok, logp = draw(logits, config, generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        logps.append(torch.where(done, torch.zeros_like(logp), logp))
        done = done | torch.isin(tok, stop)
        if t == config.max_new_tokens - 1:
            break
        if not config.fixed_length and (t + 1) % sync_every == 0:
            local_done = bool(done.all())
            if not (keep_going(local_done) if keep_going else not local_done):
                break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        logits = step(tok, attn, next_pos)
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)
