"""`LeanDecoder`: one decode step of a Llama-family model (Llama, SmolLM, Qwen2, Mistral) for a rollout, the
same computation as the Hugging Face forward of one new token per row with a KV cache, in far fewer tensor
operations, with keys and values written in place into buffers sized for the whole rollout.

Why: a decode step of a small model on a few rows spends as long in the framework's per-operation overhead
(about 150 small operations per layer: norms in several steps, rotary embedding, mask building, cache
concatenation) as in reading the weights (measurements: docs/performance.md). Here a layer is about 25
operations: each norm is one fused `rms_norm`, the rotary embedding uses a sine with the sign of
`rotate_half` folded in (computed once per step, bit-identical to `rotate_half`), the new key and value are
copied into the preallocated cache (no concatenation), and attention runs on the key/value heads with the
query heads of a group packed as `[rows, kv_heads, group, head_dim]` (what Hugging Face does for one query
token). The projections are the model's own modules, so LoRA layers and `cpu_linear`'s oneDNN kernels apply.

Matches the Hugging Face step to the dtype's rounding (the fused norm sums in another order), not bit for bit.
Prefill stays Hugging Face's; `LeanDecoder.from_cache` takes over its cache. `supports(model)` says whether a
model qualifies; others decode with Hugging Face's forward.

`compiled=True` runs the step as one `torch.compile`d function of the weights (`decode_layers`): the small
operations between the projections become a few fused kernels, and the cache is attended over its full length
with the mask, so the shapes stay fixed through a rollout. The projections read the weights oneDNN packed for
the rollout where `cpu_linear.onednn_linears` packed them (`packed_weight`; fp32 on CPU, see
`compiled_reads_packed`), else they are `W @ x^T` on the weights as they are. Weights are inputs, not
constants: new weights after an optimizer step reuse the compiled code. Plain projections only (`compilable`);
its results differ from the eager step by the dtype's rounding, because fused kernels keep intermediates in
float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sd.cpu_linear import packed_linear, packed_weight

FAMILIES = ("llama", "qwen2", "mistral")
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (its LoRA layers in place), or `model` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def supports(model: nn.Module, total_length: int | None = None) -> bool:
    """Whether `model` is a causal LM of a supported family in the layout this step assumes: SiLU MLP,
    RMS norms, full attention over `total_length` positions (a sliding window at least that long is full
    attention), the default rotary embedding's module, unsharded weights (FSDP/ZeRO-3 gathered, or plain).
    A PEFT model qualifies when its base model does."""
    model = base_model(model)
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in FAMILIES:
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return False
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and (total_length is None or total_length > window):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])) and window is None:
        return False
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or \
            getattr(model, "lm_head", None) is None:
        return False
    for layer in inner.layers:
        parts = [_get(layer, p) for p in _LAYER_PARTS]
        if any(p is None for p in parts):
            return False
        attn = layer.self_attn
        if not all(hasattr(attn, a) for a in ("head_dim", "num_key_value_groups", "scaling")):
            return False
        for norm in parts[-2:]:
            if not isinstance(getattr(norm, "weight", None), torch.Tensor) or \
                    not hasattr(norm, "variance_epsilon") or norm.weight.numel() == 0:
                return False
    return all(p.numel() > 0 for p in model.parameters())


def compilable(model: nn.Module) -> bool:
    """Whether `model` (which `supports`) can decode through the compiled step: every projection and the
    output layer an exact `nn.Linear` with a plain CPU or CUDA weight (no LoRA layer, no sharded view)."""
    model = base_model(model)
    linears = [_get(layer, p) for layer in model.model.layers for p in _LAYER_PARTS[:7]] + [model.lm_head]
    return all(type(m) is nn.Linear and type(m.weight) in (nn.Parameter, torch.Tensor) for m in linears)


def compiled_reads_packed(dtype: torch.dtype) -> bool:
    """Whether the compiled step should read projections of this dtype packed by oneDNN: fp32, where `W @ x^T`
    reads the weights more slowly than the packed kernel; not bf16, which `W @ x^T` reads as fast (measured:
    docs/performance.md)."""
    return dtype == torch.float32


def _linear(x: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, int],
            bias: torch.Tensor | None) -> torch.Tensor:
    """`x [R, K] -> [R, N]`. `weight` a tensor `[N, K]`: as `(W @ x^T)^T`, which for a few rows reads the weight
    as fast as a packed kernel, the transpose folded into the fused kernel that reads the result. `weight` a pair
    `(oneDNN-packed weight, N)`: through `packed_linear`."""
    if isinstance(weight, tuple):
        return packed_linear(x, weight[0], bias, weight[1])
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


def _projection(linear: nn.Linear) -> torch.Tensor | tuple[torch.Tensor, int]:
    """What `_linear` reads for `linear`: its oneDNN-packed copy with the output size, if packed, else its weight."""
    packed = packed_weight(linear)
    return linear.weight if packed is None else (packed, linear.out_features)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's RMSNorm: normalize in float32, cast back, then scale by the weight
    return weight * F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.size(-1),), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of `x [R, H, hd]`, with `rotate_half`'s sign already folded into `sin`."""
    half = x.size(-1) // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def decode_layers(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, col: torch.Tensor,
                  layers: list[tuple], keys: list[torch.Tensor], values: list[torch.Tensor], final: tuple,
                  head: tuple, head_dim: int, scaling: float) -> torch.Tensor:
    """One decode step as a pure function of the weights: embeddings `h [R, D]`, rotary `cos`/`sin [R, 1, hd]`
    (`sin` with `rotate_half`'s sign folded in), `mask [R, 1, 1, L]` (additive, in the weights' dtype: 0 where
    attended, -inf elsewhere, over the cache's full length L),
    `col [1]` the column this token's key/value is written to in every `keys`/`values [R, KVH, L, hd]`.
    `layers`: per layer `(norm weight, eps, wq, bq, wk, bk, wv, bv, wo, norm weight, eps, w_gate, w_up, w_down)`;
    `final`: `(norm weight, eps)`; `head`: `(weight, bias)`. Each projection weight is a tensor or a pair
    `(oneDNN-packed weight, output size)` (`_linear`). Returns logits `[R, V]` in the weights' dtype."""
    rows = h.size(0)
    for (n1, e1, wq, bq, wk, bk, wv, bv, wo, n2, e2, wg, wu, wd), kb, vb in zip(layers, keys, values):
        x = _rms(h, n1, e1)
        q = _linear(x, wq, bq).reshape(rows, -1, head_dim)
        k = _linear(x, wk, bk).reshape(rows, -1, head_dim)
        v = _linear(x, wv, bv).reshape(rows, -1, head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kb.index_copy_(2, col, k[:, :, None])
        vb.index_copy_(2, col, v[:, :, None])
        kv_heads = k.size(1)
        out = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, -1, head_dim), kb, vb, attn_mask=mask,
                                             scale=scaling)
        h = h + _linear(out.reshape(rows, -1), wo, None)
        x = _rms(h, n2, e2)
        h = h + _linear(F.silu(_linear(x, wg, None)) * _linear(x, wu, None), wd, None)
    return _linear(_rms(h, *final), *head)


_COMPILED: list = []


def compiled_decode_layers():
    """`decode_layers` under `torch.compile`, made once per process (the compiled code is reused for new
    weights of the same shapes; a new number of rows or cache length compiles once more, and that size is
    symbolic after that)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(decode_layers))
    return _COMPILED[0]


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # older transformers


class LeanDecoder:
    """The decode step over a prefilled cache. `step(tokens [R], attention mask [R, L], positions [R])` ->
    logits `[R, V]` of the next token, where `L` counts the prompt's columns and every token fed so far
    including this one (the mask `sampling.decode` keeps); the new key/value goes to column `L - 1`."""

    def __init__(self, model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
                 compiled: bool = False) -> None:
        model = base_model(model)
        self.model = model
        inner = model.model
        self.embed, self.final_norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, \
            model.lm_head
        self.layers = list(inner.layers)
        self.keys, self.values = keys, values
        self.compiled = compiled
        if compiled:
            if not compilable(model):
                raise ValueError("the compiled decode step needs plain nn.Linear projections (see `compilable`)")
            self._weights = [self._layer_weights(layer) for layer in self.layers]
            self._final = (self.final_norm.weight, self.final_norm.variance_epsilon)
            self._head = (_projection(self.head), self.head.bias)
            self._mask: torch.Tensor | None = None

    @staticmethod
    def _layer_weights(layer: nn.Module) -> tuple:
        a, m = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        w = _projection
        return (n1.weight, n1.variance_epsilon, w(a.q_proj), a.q_proj.bias, w(a.k_proj), a.k_proj.bias,
                w(a.v_proj), a.v_proj.bias, w(a.o_proj), n2.weight, n2.variance_epsilon, w(m.gate_proj),
                w(m.up_proj), w(m.down_proj))

    @classmethod
    def from_cache(cls, model: nn.Module, cache, prefilled: int, max_new_tokens: int,
                   compiled: bool = False) -> LeanDecoder:
        """Copy a Hugging Face cache holding `prefilled` columns into buffers with room for `max_new_tokens`
        more (`[R, kv_heads, prefilled + max_new_tokens, head_dim]` per layer, keys and values). `compiled`:
        decode with `compiled_decode_layers` (the buffers' free columns are zeroed: it attends over all)."""
        model = base_model(model)
        keys, values = [], []
        for i in range(len(model.model.layers)):
            k, v = _layer_kv(cache, i)
            if k.size(2) != prefilled:
                raise ValueError(f"the cache holds {k.size(2)} columns, expected {prefilled}")
            size = (k.size(0), k.size(1), prefilled + max_new_tokens, k.size(3))
            kb, vb = (k.new_zeros(size), v.new_zeros(size)) if compiled else (k.new_empty(size), v.new_empty(size))
            kb[:, :, :prefilled].copy_(k)
            vb[:, :, :prefilled].copy_(v)
            keys.append(kb)
            values.append(vb)
        return cls(model, keys, values, compiled)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return _rms(x, norm.weight, norm.variance_epsilon)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        col = attention_mask.size(1) - 1
        rows = tokens.size(0)
        h = self.embed(tokens[:, None])  # [R, 1, D]
        cos, sin = self.rotary(h, positions[:, None])  # [R, 1, hd], broadcast over the heads of [R, H, hd]
        half = cos.size(-1) // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign folded in
        if self.compiled:
            return self._compiled_step(h[:, 0], cos, sin, attention_mask)
        mask = attention_mask[:, None, None, :].bool()  # [R, 1, 1, L]: the rows' left padding
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            hd, groups = attn.head_dim, attn.num_key_value_groups
            x = self._norm(h, layer.input_layernorm)
            q = attn.q_proj(x).view(rows, -1, hd)  # [R, H, hd]
            k = attn.k_proj(x).view(rows, -1, hd)  # [R, KVH, hd]
            v = attn.v_proj(x).view(rows, -1, hd)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.keys[i][:, :, col].copy_(k)
            self.values[i][:, :, col].copy_(v)
            kv_heads = k.size(1)
            out = F.scaled_dot_product_attention(
                q.view(rows, kv_heads, groups, hd), self.keys[i][:, :, :col + 1], self.values[i][:, :, :col + 1],
                attn_mask=mask, scale=attn.scaling)  # [R, KVH, G, hd]: one query per head of each group
            h = h + attn.o_proj(out.reshape(rows, 1, kv_heads * groups * hd))
            x = self._norm(h, layer.post_attention_layernorm)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.head(self._norm(h, self.final_norm))[:, -1]

    def _compiled_step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        col = attention_mask.size(1) - 1
        full = self.keys[0].size(2)
        if self._mask is None:  # [R, 1, 1, full], additive: the prompt's columns, then one column per token fed
            self._mask = torch.full((h.size(0), 1, 1, full), float("-inf"), dtype=h.dtype, device=h.device)
            self._mask[:, 0, 0, :col + 1].masked_fill_(attention_mask.bool(), 0.0)
        else:
            self._mask[:, 0, 0, col].masked_fill_(attention_mask[:, col].bool(), 0.0)
        attn = self.layers[0].self_attn
        index = torch.tensor([col], device=h.device)
        return compiled_decode_layers()(h, cos, sin, self._mask, index, self._weights, self.keys, self.values,
                                        self._final, self._head, attn.head_dim, attn.scaling)
