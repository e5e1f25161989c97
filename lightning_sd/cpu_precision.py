"""Whether this CPU multiplies bf16 natively, and one warning when a run asks for bf16 on a CPU that emulates it.

CPUs with AVX512-BF16 or AMX run bf16 matmuls faster than fp32 ones. On a CPU without them (AVX2-only, or
AVX-512 without BF16) oneDNN has no bf16 kernel, PyTorch falls back to a generic one, and every bf16 matmul is
several times slower than the same matmul in fp32: `trainer.precision=bf16-mixed|bf16-true`,
`generation.dtype=bf16` and `model.dtype=bfloat16` then slow a run down instead of speeding it up.

The check is the one PyTorch's oneDNN backend makes for itself (`torch.ops.mkldnn._is_mkldnn_bf16_supported`):
it follows the CPU's features and `ONEDNN_MAX_CPU_ISA`, not a list of processor names. The warning states the
slowdown measured on the spot (one matmul of a decode-sized shape, in each dtype) and the fp32 settings.
"""

from __future__ import annotations

import time
import warnings
from functools import lru_cache

import torch

PROBE_SHAPE = (64, 576, 1536)  # rows x SmolLM2-135M's hidden size x its MLP width


def native_bf16() -> bool:
    """True when oneDNN has bf16 matmul kernels for this CPU (AVX512-BF16 or AMX) under the current ISA limit."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: bf16 takes the generic kernels
        return False


@lru_cache(maxsize=1)
def bf16_slowdown(repeats: int = 3) -> float:
    """The time of a bf16 matmul over that of the same fp32 matmul (`PROBE_SHAPE`, one thread, best of
    `repeats`): below 1 where bf16 is native, several times 1 where it is emulated. Measured once per process."""
    m, k, n = PROBE_SHAPE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b  # the first call packs and dispatches
            best[dtype] = min(_timed(a, b) for _ in range(repeats))
        return best[torch.bfloat16] / best[torch.float32]
    finally:
        torch.set_num_threads(threads)


def _timed(a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    a @ b
    return time.perf_counter() - t0


_warned: set[str] = set()


def warn_if_bf16_is_emulated(settings: list[str]) -> bool:
    """Warn once per process when `settings` (the bf16 config keys a run sets, e.g. `["trainer.precision=bf16-mixed"]`)
    would run on a CPU without native bf16. Returns whether it warned."""
    if not settings or native_bf16():
        return False
    key = ",".join(settings)
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(
        f"{', '.join(settings)}: this CPU has no native bf16 matmul (no AVX512-BF16 or AMX under oneDNN), so bf16 "
        f"is emulated: a {'x'.join(map(str, PROBE_SHAPE))} matmul just ran {bf16_slowdown():.1f}x slower in bf16 "
        "than in fp32. Train in fp32 on this CPU: trainer.precision=32-true, generation.dtype=null, "
        "model.dtype=float32", stacklevel=2)
    return True


def bf16_settings(precision: str, generation_dtype: str | None, model_dtype: str | None) -> list[str]:
    """The settings among these that compute in bf16."""
    found = []
    if str(precision).startswith("bf16"):
        found.append(f"trainer.precision={precision}")
    if generation_dtype in ("bf16", "bfloat16"):
        found.append(f"generation.dtype={generation_dtype}")
    if model_dtype in ("bf16", "bfloat16"):
        found.append(f"model.dtype={model_dtype}")
    return found


__all__ = ["bf16_settings", "bf16_slowdown", "native_bf16", "warn_if_bf16_is_emulated"]
