"""`onednn_linears`: while a rollout decodes on CPU, run every fp32 (and, on CPUs with native bf16, every bf16)
`nn.Linear` of the model through oneDNN with its weight reordered once into oneDNN's blocked layout.

Why: a decode step multiplies a few rows (one new token per sequence) by every weight matrix, so it is bound by
reading the weights, and oneDNN's packed kernel reads them faster than MKL's fp32 GEMM, which `F.linear` calls
(measurements: docs/performance.md). The weights stay fixed during one rollout, so the reorder is paid once
per rollout, not per token. The packed copies are dropped when the
context exits; the module's own `forward` is restored.

Inside the context `packed_weight(module)` returns the packed copy, and `packed_linear(x, packed, bias, n)` is
the packed kernel as a custom operator that `torch.compile` calls as it is (the compiled decode step uses it
for fp32 weights).

Only exact `nn.Linear` modules with a plain 2-D fp32 or bf16 CPU weight are swapped (sharded FSDP/DTensor views,
other dtypes and subclasses keep their own forward), and each call falls back to `F.linear` when grad is
enabled, under CPU autocast, or for an input of another dtype than the weight. Results are matmuls with a
different summation order: they match `F.linear` to the dtype's rounding, not bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and most ARM CPU wheels do)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs here: fp32, and bf16 where the CPU has native bf16 (AVX512-BF16, AMX)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


def _packable(module: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    if type(module) is not nn.Linear or "forward" in vars(module):
        return False
    w = module.weight
    return (type(w) is nn.Parameter and w.device.type == "cpu" and w.dtype in dtypes and w.dim() == 2
            and w.is_contiguous() and (module.bias is None or module.bias.dtype == w.dtype))


@torch.library.custom_op("lightning_sd::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """`x [..., K] -> [..., out_features]` through oneDNN with a weight packed by `onednn_linears`
    (`packed_weight`). An operator `torch.compile` leaves as it is: inductor cannot trace the packed layout."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                         out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _packed_forward(module: nn.Linear, packed: torch.Tensor):
    weight, bias = module.weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu"):
            return nn.functional.linear(x, weight, bias)
        # the kernel itself, not the `packed_linear` operator: a dispatch less on each of ~200 calls a step
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    forward.packed = packed
    return forward


def packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The oneDNN copy of `module.weight` while `onednn_linears` has swapped it in, else None."""
    return getattr(vars(module).get("forward"), "packed", None)


@contextmanager
def onednn_linears(model: nn.Module, rows_hint: int = 8, only: list[nn.Module] | None = None) -> Iterator[int]:
    """Swap the `forward` of every packable `nn.Linear` in `model` (or in `only`, those modules) for oneDNN's
    packed kernel; yields how many were swapped (0 where oneDNN is missing or nothing qualifies). Weights must
    not change inside the context (call it around one rollout, under `torch.no_grad()`). `rows_hint`: the
    expected rows per call."""
    if not onednn_available():
        yield 0
        return
    swapped: list[nn.Linear] = []
    try:
        dtypes = packable_dtypes()
        with torch.no_grad():
            for module in model.modules() if only is None else only:
                if _packable(module, dtypes):
                    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows_hint)
                    module.forward = _packed_forward(module, packed)
                    swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
