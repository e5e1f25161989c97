"""Multi-GPU helpers on top of Lightning's own strategies (nothing here launches processes or shards weights).

- `strategy_kind(strategy)`: `single` | `ddp` | `fsdp` | `deepspeed` | `other`, read off Lightning's classes.
- `gathered_for_generation(trainer, network)`: the full weights of `network` for one whole rollout. Under FSDP
  (Lightning's `FSDPStrategy`, FSDP1) and DeepSpeed ZeRO-3 the weights are sharded; gathering them once
  per rollout avoids an all-gather per layer per decode step. Elsewhere a no-op.
- `fsdp_wrap_policy(model)`: the module classes FSDP wraps: every decoder layer, plus the whole causal LM
  (so that tied input/output embeddings stay in one unit, and the student and a frozen/EMA teacher copy are
  sharded identically, which makes the EMA update shard-local).
- `ema_update_(teacher_params, student_params, rate)`: `t <- (1 - rate) t + rate s` on whatever each rank
  holds: full tensors (single/DDP/ZeRO-2), FSDP shards (`use_orig_params=True`), ZeRO-3 partitions.
- Rank-consistent decisions: `all_ranks(trainer, flag)` (a collective AND / OR), `global_sum(trainer, x)`.

Decoding lock-step (every rank runs the same number of decode steps until *all* ranks are done) lives in
`rollout.rollout_on`'s `keep_going`; see `docs/scaling.md`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

def strategy_kind(strategy) -> str:
    """Which family a Lightning strategy object belongs to (by class name, so DeepSpeed need not be installed)."""
    if strategy is None:
        return "single"
    names = {c.__name__ for c in type(strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        return "deepspeed"
    if "FSDPStrategy" in names:
        return "fsdp"
    if "DDPStrategy" in names:
        return "ddp"
    if "SingleDeviceStrategy" in names:
        return "single"
    return "other"


def zero_stage(strategy) -> int | None:
    """DeepSpeed ZeRO stage of a `DeepSpeedStrategy` (None for any other strategy)."""
    if strategy_kind(strategy) != "deepspeed":
        return None
    return int(strategy.config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(strategy) -> bool:
    """True when each rank holds only a shard of the weights outside a forward pass (FSDP, ZeRO-3)."""
    return strategy_kind(strategy) == "fsdp" or zero_stage(strategy) == 3


def engine_owns_gradients(strategy) -> bool:
    """DeepSpeed keeps (reduced, partitioned) gradients inside its engine: `p.grad` cannot be rescaled there,
    so the loss is normalized before backward instead (see `SelfDistillationModule.training_step`)."""
    return strategy_kind(strategy) == "deepspeed"


def ends_optimizer_step(trainer) -> bool:
    """Whether the current micro-batch is the last one of an optimizer step, by Lightning's own gradient
    accumulation decision (always True without accumulation)."""
    should_accumulate = getattr(trainer.fit_loop, "_should_accumulate", None)
    return should_accumulate is None or not should_accumulate()


class StepWatch:
    """Sees each optimizer step once, from a callback's `on_train_batch_end` (after the step, when
    `trainer.global_step` has moved): `moved(trainer)` is True on the first micro-batch end at a new
    `global_step` and False on the micro-batches of gradient accumulation that did not step. It also sees step
    0 (the weights before any update) at the first micro-batch end; after that it agrees with
    `ends_optimizer_step` asked at the same place.

    Unlike `ends_optimizer_step` (asked while a step is under way), it keeps the last step seen (`last_step`,
    -1 before the first), which a callback saves in its checkpoint state (`state()` / `load()`, key
    `"last_step"`), so that after a resume the step of the checkpoint is not seen twice."""

    def __init__(self) -> None:
        self.last_step = -1

    def moved(self, trainer) -> bool:
        """Whether `trainer.global_step` differs from the last step seen; records it."""
        step = int(trainer.global_step)
        if step == self.last_step:
            return False
        self.last_step = step
        return True

    def state(self) -> dict:
        return {"last_step": self.last_step}

    def load(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", -1))


# ---------------------------------------------------------------------------------------------- FSDP


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The decoder-layer classes of a Hugging Face model (from `_no_split_modules`), found among its modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(
            f"cannot find the decoder-layer class of {type(base).__name__} (its _no_split_modules is {sorted(names)}): "
            "pass trainer.fsdp_wrap=[<layer class name>, ...] to name the classes FSDP should wrap")
    return found


def fsdp_wrap_policy(model: nn.Module, extra: Iterable[str] = ()) -> set[type]:
    """Classes for `FSDPStrategy(auto_wrap_policy=...)`: decoder layers, the causal-LM class itself (tied
    embeddings stay together in its unit; a teacher copy gets the same shard layout as the student), and any
    class named in `extra` (looked up among the model's modules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = decoder_layer_classes(model) | {type(base)}
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    for name in extra:
        if name not in by_name:
            raise ValueError(f"trainer.fsdp_wrap: no module of class {name!r} in {type(base).__name__}; "
                             f"some classes it has: {sorted(by_name)[:12]}")
        classes.add(by_name[name])
    return classes


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """FSDP1 instances at or below `module` (outermost first)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [m for m in module.modules() if isinstance(m, FSDP)]


@contextmanager
def _fsdp_bypassed(network: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every FSDP wrapper at or below `network` by the module it wraps, so forward passes
    skip FSDP's pre/post-forward hooks (which would re-gather and free the weights at every call); yields the
    unwrapped network. The module tree is restored afterwards, also on error."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    swapped = []
    try:
        for parent in list(network.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, FSDP):
                    parent._modules[name] = child.module
                    swapped.append((parent, name, child))
        yield network.module if isinstance(network, FSDP) else network
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


@contextmanager
def fsdp_gathered(root: nn.Module, network: nn.Module) -> Iterator[nn.Module]:
    """Unshard the FSDP units that hold `network`'s weights for the whole block (read-only: `writeback=False`)
    and yield `network` with its FSDP wrappers bypassed: forward passes inside the block use the full weights
    with no collectives, however many decode steps run.

    `root` is the outermost FSDP module (`trainer.strategy.model`); its own flat parameter is gathered too
    (`recurse=False`) since it may hold weights no inner unit owns. Units outside `network` (e.g. a teacher
    copy) stay sharded. Memory: the full student on every rank for the duration of the rollout.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = fsdp_units(network)
    outer = [root] if root is not None and not any(u is root for u in units) else []
    with ExitStack() as stack:
        for unit in outer + units:  # the root first: it initialises FSDP's lazy state
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        yield stack.enter_context(_fsdp_bypassed(network))


# ---------------------------------------------------------------------------------------------- DeepSpeed


@contextmanager
def zero3_gathered(engine) -> Iterator[None]:
    """Gather a ZeRO-3 engine's weights once and lift its per-module fetch hooks for the block (DeepSpeed's own
    `unwrap_model_for_generation`). Not run on this project's machines yet: see docs/scaling.md."""
    try:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
    except ImportError as err:
        raise ImportError(
            "trainer=deepspeed_zero3 with trainer.gather_for_generation=true needs deepspeed>=0.16 (it provides "
            f"deepspeed.runtime.zero.stage3.unwrap_model_for_generation): {err}. Install it with "
            "`pip install deepspeed`, or set trainer.gather_for_generation=false (weights fetched per layer)") from err
    with unwrap_model_for_generation(engine):
        yield


@contextmanager
def gathered_for_generation(trainer, network: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Yields the network to decode with: under FSDP / ZeRO-3 `network` with its weights gathered once for the
    whole rollout (not per decode step); elsewhere `network` itself.

    With `enabled=False`, or under single-device / DDP / ZeRO-1-2, nothing is gathered: under FSDP / ZeRO-3 the
    sharded forward then fetches layer by layer at every decode step (slower, but needs memory for one layer, not
    the model), which is correct because all ranks decode the same number of steps (`rollout.rollout_on`).
    """
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is None:
        yield network
        return
    kind = strategy_kind(strategy)
    if kind == "fsdp" and not enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, recurse=False, writeback=False):
            pass  # initialises FSDP's root state first, or the student's unit would take itself for the root
        yield network
    elif not enabled:
        yield network
    elif kind == "fsdp":
        with fsdp_gathered(strategy.model, network) as net:
            yield net
    elif kind == "deepspeed" and zero_stage(strategy) == 3:
        with zero3_gathered(strategy.model):
            yield network
    else:
        yield network


# ---------------------------------------------------------------------------------------------- EMA on shards


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank owns: a ZeRO-3 partition (`ds_tensor`) or the tensor itself (full
    tensor, or an FSDP `use_orig_params=True` view of this rank's shard)."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


@torch.no_grad()
def ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor], rate: float) -> None:
    """In place `t <- (1 - rate) * t + rate * s` over matching parameter lists, on each rank's local part only
    (no communication). Student and teacher must be sharded identically (same wrap policy), which
    `fsdp_wrap_policy` guarantees for a teacher that is a copy of the student."""
    t_list, s_list = list(teacher_params), list(student_params)
    if len(t_list) != len(s_list):
        raise RuntimeError(f"EMA teacher has {len(t_list)} parameters but the student has {len(s_list)}: the teacher "
                           "must be a copy of the student")
    t_loc = [_local(t) for t in t_list]
    s_loc = [_local(s).detach() for s in s_list]
    for i, (t, s) in enumerate(zip(t_loc, s_loc)):
        if t.shape != s.shape:
            raise RuntimeError(
                f"EMA update: local shard of parameter #{i} is {tuple(t.shape)} in the teacher but {tuple(s.shape)} in "
                "the student; they are sharded differently. Under FSDP use trainer=fsdp (it wraps the whole model "
                "and its decoder layers, use_orig_params=True) so teacher and student shards line up")
    pairs = [(t, s) for t, s in zip(t_loc, s_loc) if t.numel()]
    if pairs:
        torch._foreach_lerp_([t for t, _ in pairs], [s.to(t.dtype) for t, s in pairs], rate)


def world_size(trainer) -> int:
    return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1


def all_ranks(trainer, flag: bool, all: bool = True) -> bool:
    """Collective AND (`all=True`) or OR of a local flag; the local flag itself on one process."""
    if world_size(trainer) == 1:
        return bool(flag)
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=all))


def global_sum(trainer, value: float, device: torch.device | None = None) -> float:
    """Sum of a local number over all ranks (float64 all-reduce); the number itself on one process."""
    if world_size(trainer) == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=device or trainer.strategy.root_device)
    return float(trainer.strategy.reduce(t, reduce_op="sum"))


__all__ = ["strategy_kind", "zero_stage", "shards_parameters", "engine_owns_gradients",
           "decoder_layer_classes", "fsdp_wrap_policy", "fsdp_units", "fsdp_gathered", "zero3_gathered",
           "gathered_for_generation", "ema_update_", "world_size", "all_ranks",
           "global_sum"]
