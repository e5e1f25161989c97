"""LoRA students with PEFT, and teachers that cost no copy of the base weights.

- `apply_lora(model, cfg)`: wrap a causal LM with a LoRA adapter named `default` from the `model.lora` config
  (`{r, alpha, dropout, target_modules, bias}`; `null` means no LoRA). Only adapter weights train.
- frozen teacher = the same network with adapters disabled (`teachers.FrozenTeacher`, no copy).
- EMA teacher = a second, never-trained adapter `ema` on the same base weights, initialised as a copy of
  `default` and moved after every optimizer step: `ema <- (1 - rate) * ema + rate * default`
  (`add_ema_adapter`, `ema_adapter_update_`, `adapter_active`). Memory: 2 x adapter size, no base copy.

Switching the active adapter here never touches `requires_grad` (PEFT's `set_adapter` would): the optimizer
and DDP see the same trainable set throughout.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

TRAIN_ADAPTER = "default"
EMA_ADAPTER = "ema"
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "bias")


def _require_peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("model.lora needs the `peft` package: pip install 'lightning_sd[lora]' (peft>=0.13)") from err
    return peft


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def lora_config(cfg: dict):
    """A `peft.LoraConfig` from the `model.lora` dict. Unknown keys are an error naming them."""
    peft = _require_peft()
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"model.lora: unknown key(s) {unknown}; valid keys: {list(LORA_KEYS)}")
    r = int(cfg.get("r") or 0)
    if r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {cfg.get('r')}")
    target = cfg.get("target_modules") or "all-linear"
    return peft.LoraConfig(r=r, lora_alpha=float(cfg.get("alpha") or 2 * r), lora_dropout=float(cfg.get("dropout") or 0.0),
                           target_modules=list(target) if not isinstance(target, str) else target,
                           bias=cfg.get("bias") or "none", task_type="CAUSAL_LM")


def apply_lora(model: nn.Module, cfg: dict | None) -> nn.Module:
    """`model` wrapped with a trainable LoRA adapter `default` (base weights frozen); `model` itself if `cfg` is
    None. The base model is modified in place (PEFT injects the adapter layers), no weights are copied."""
    if not cfg:
        return model
    if is_peft(model):
        raise ValueError("model.lora is set but the model is already a PEFT model; set model.lora=null")
    peft = _require_peft()
    return peft.get_peft_model(model, lora_config(cfg))


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """Every PEFT layer that holds adapters (LoRA layers, modules-to-save wrappers)."""
    return [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "adapter_layer_names")]


def adapter_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """`(name, parameter)` of one adapter, in module order, names with the adapter name replaced by `*` (so
    the lists of two adapters line up by name)."""
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if adapter in parts[:-1]:
            out.append((".".join("*" if s == adapter else s for s in parts), p))
    return out


def add_ema_adapter(model: nn.Module, name: str = EMA_ADAPTER, source: str = TRAIN_ADAPTER) -> str:
    """Add adapter `name` to a PEFT model: same config as `source`, weights copied from it, frozen, inactive."""
    if not is_peft(model):
        raise ValueError("an EMA adapter needs a PEFT (LoRA) model: set model.lora")
    if name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {name!r}")
    config = copy.deepcopy(model.peft_config[source])
    config.inference_mode = True
    active = list(model.active_adapters)
    model.add_adapter(name, config)
    with adapter_active(model, active):  # PEFT versions differ in whether add_adapter activates the new one
        pass
    src, dst = adapter_parameters(model, source), adapter_parameters(model, name)
    if [n for n, _ in src] != [n for n, _ in dst]:
        raise RuntimeError(f"adapters {source!r} and {name!r} have different parameters")
    with torch.no_grad():
        for (_, s), (_, d) in zip(src, dst):
            d.copy_(s)
            d.requires_grad_(False)
    for layer in tuner_layers(model):
        layer._active_adapter = active
    return name


@contextmanager
def adapter_active(model: nn.Module, adapter: str | list[str]) -> Iterator[nn.Module]:
    """Forward passes inside the block use `adapter`; the previous active adapter is restored afterwards.
    `requires_grad` is not changed."""
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    layers = tuner_layers(model)
    previous = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = names
        yield model
    finally:
        for layer, prev in zip(layers, previous):
            layer._active_adapter = prev


def _own_parameters(unit: nn.Module) -> set[int]:
    """ids of the parameters an FSDP unit owns itself (not those of nested FSDP units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owned, stack = set(), [unit]
    while stack:
        m = stack.pop()
        owned.update(id(p) for p in m.parameters(recurse=False))
        stack.extend(c for c in m.children() if not isinstance(c, FSDP))
    return owned


@torch.no_grad()
def ema_adapter_update_(model: nn.Module, rate: float, target: str = EMA_ADAPTER, source: str = TRAIN_ADAPTER) -> None:
    """`target <- (1 - rate) * target + rate * source` over the adapter weights.

    Under FSDP the two adapters of a layer sit at different offsets of one flat parameter, so their local shards
    do not line up: each FSDP unit is gathered in turn (its own weights only, written back), updated, and
    resharded; peak memory is one unit, not the model."""
    from lightning_sd.distributed import fsdp_units

    src, dst = adapter_parameters(model, source), adapter_parameters(model, target)
    if [n for n, _ in src] != [n for n, _ in dst]:
        raise RuntimeError(f"adapters {source!r} and {target!r} have different parameters")
    pairs = [(d, s) for (_, s), (_, d) in zip(src, dst)]
    units = fsdp_units(model)
    if not units:
        torch._foreach_lerp_([d for d, _ in pairs], [s.detach().to(d.dtype) for d, s in pairs], rate)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for unit in units:
        owned = _own_parameters(unit)
        mine = [(d, s) for d, s in pairs if id(d) in owned and id(s) in owned]
        with ExitStack() as stack:
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=True))
            if mine:
                torch._foreach_lerp_([d for d, _ in mine], [s.detach().to(d.dtype) for d, s in mine], rate)


__all__ = ["TRAIN_ADAPTER", "EMA_ADAPTER", "LORA_KEYS", "is_peft", "lora_config", "apply_lora", "tuner_layers",
           "adapter_parameters", "add_ema_adapter", "adapter_active", "ema_adapter_update_"]
