"""The optimizer and the learning-rate schedule: their options (the `optimizer` and `scheduler` config groups) and
`build_optimizer`, which makes both for `SelfDistillationModule.configure_optimizers`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_sd.step_in_backward import OptimizerInBackward

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimizerConfig:
    """The `optimizer` group (conf/optimizer/adamw.yaml holds these defaults)."""

    name: str = "adamw"
    lr: float = 5e-5  # the default run's (docs/recipes.md: as fast as 1e-4 on the new facts, keeps more of the known)
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool | None = None  # null: a fused update kernel where torch has one and no strategy shards params
    in_backward: bool = False  # true: each parameter stepped inside backward, its gradient freed (OptimizerInBackward)

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r} is not one of {OPTIMIZERS}")


@dataclass
class SchedulerConfig:
    """The `scheduler` group: a warmup, then constant, linear or cosine decay to `min_lr_ratio`."""

    name: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"scheduler.name={self.name!r} is not one of {SCHEDULES}")


def optimizer_factory(cfg: OptimizerConfig, fused: bool | None) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A function that makes `cfg`'s optimizer over a list of parameters (`fused`: torch's fused kernel)."""
    if cfg.name == "adamw":
        return lambda group: torch.optim.AdamW(group, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                               eps=cfg.eps, fused=fused)
    return lambda group: torch.optim.SGD(group, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(cfg: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a multiplier of the learning rate at each optimizer step (`LambdaLR`): a linear warmup over
    `warmup_steps`, then constant, or a linear or cosine decay to `min_lr_ratio` at `total_steps`."""
    total, warmup, floor = max(int(total_steps), 1), int(cfg.warmup_steps or 0), float(cfg.min_lr_ratio or 0.0)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.name == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _loss_scaler(trainer):
    """The trainer's loss scaler (fp16 mixed precision), or None (bf16 mixed precision, fp32, no trainer)."""
    return getattr(trainer.precision_plugin if trainer is not None else None, "scaler", None)


def fused_choice(cfg: OptimizerConfig, params: list[nn.Parameter], trainer=None) -> bool | None:
    """`optimizer.fused`: true/false as given; null (auto) fuses the update into one kernel per parameter when
    every parameter is a plain floating tensor on CPU or CUDA and no strategy shards parameters or owns the
    optimizer (FSDP, DeepSpeed), and not when fp16's loss scaler must be undone before clipping. The for-loop
    AdamW that torch picks on CPU otherwise keeps per-parameter temporaries and is much slower (measurements:
    docs/performance.md)."""
    from lightning_sd.distributed import engine_owns_gradients, shards_parameters

    if cfg.fused is not None:
        return bool(cfg.fused)
    strategy = trainer.strategy if trainer is not None else None
    if strategy is not None and (shards_parameters(strategy) or engine_owns_gradients(strategy)):
        return None
    if _loss_scaler(trainer) is not None and trainer.gradient_clip_val:
        return None
    plain = all(type(p) is nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if plain and params else None


def clip_without_scaler(trainer, optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm) -> bool:
    """Under mixed precision without a loss scaler (bf16), Lightning refuses to clip for a fused optimizer, a rule
    meant for the scaler that fp16 has and bf16 has not: clip the gradients here directly (by norm or by value, as
    `trainer.gradient_clip_algorithm` says). Returns False, having done nothing, in every other case."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    if not (clip_val and type(trainer.precision_plugin) is MixedPrecision and _loss_scaler(trainer) is None):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if getattr(algorithm, "value", algorithm) == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    return True


def build_optimizer(params: list[nn.Parameter], optimizer: OptimizerConfig, scheduler: SchedulerConfig,
                    total_steps: int, fused: bool | None) -> dict:
    """What `configure_optimizers` returns: the optimizer over `params` (inside backward with
    `optimizer.in_backward`, `OptimizerInBackward`) and its per-step schedule."""
    make = optimizer_factory(optimizer, fused)
    opt = OptimizerInBackward(params, make) if optimizer.in_backward else make(params)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(scheduler, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimizerConfig", "SchedulerConfig", "build_optimizer", "clip_without_scaler",
           "fused_choice", "lr_factor", "optimizer_factory"]
