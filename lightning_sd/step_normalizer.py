"""`StepNormalizer`: one optimizer step's loss normalization, exact whatever the batch split.

Each micro-batch's loss is the *sum* of its per-token (or per-sequence) terms; the normalizer counts, over all the
micro-batches of an optimizer step, the normalizing count (`LossOutput.count`) and the loss-bearing tokens
(`signal`). Before the optimizer steps (`finish`), the counts are summed over ranks and the gradients divided by
the total, undoing Lightning's division by the accumulation factor and DDP/FSDP's average over ranks. A step in
which no micro-batch on any rank had a loss-bearing token is *empty*: its gradients are dropped, so the optimizer
leaves the weights and its state alone. Two engines update before `finish` could act, and get a normalized loss
instead: DeepSpeed (`engine_loss`) and the optimizer inside backward (`in_backward_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_sd.batch import LossOutput
from lightning_sd.distributed import engine_owns_gradients, global_sum


class StepNormalizer:
    """Counts one optimizer step's micro-batches; `reduction`: `loss.reduction` (`sum` is not normalized)."""

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction
        self.count = 0.0  # valid tokens (or sequences) accumulated for the current optimizer step
        self.signal = 0.0  # loss-bearing tokens accumulated for the current optimizer step
        self.batches = 0  # micro-batches of the current optimizer step that reached the loss
        self.last_step_empty = False  # the step `finish` closed had no signal on any rank

    def add(self, out: LossOutput) -> None:
        """Count one micro-batch that reached the loss (a non-finite one is skipped before it)."""
        if self.reduction != "sum":
            self.count += float(out.count)
        self.signal += float(out.signal.sum())
        self.batches += 1

    def backward_loss(self, out: LossOutput, trainer, *, in_backward: bool) -> torch.Tensor | None:
        """Count a finite micro-batch and return the loss its backward runs on: the loss itself (gradients are
        normalized by `finish` before the optimizer step), or the engine's or the in-backward optimizer's
        normalized loss (`engine_loss`, `in_backward_loss`)."""
        self.add(out)
        if trainer is not None and engine_owns_gradients(trainer.strategy):
            return self.engine_loss(out, trainer)
        if in_backward:
            return self.in_backward_loss(out, self.reduction)
        return out.loss

    def engine_loss(self, out: LossOutput, trainer) -> torch.Tensor:
        """DeepSpeed keeps the gradients inside its engine: the loss normalized by this micro-batch's global count
        (the engine then averages over ranks); exact for `accumulate_grad_batches=1` (docs/scaling.md)."""
        self.count = 0.0
        if self.reduction == "sum":
            return out.loss
        return out.loss * trainer.world_size / max(global_sum(trainer, out.count), 1.0)

    @staticmethod
    def in_backward_loss(out: LossOutput, reduction: str) -> torch.Tensor | None:
        """With the optimizer inside backward the weights change before `finish` could scale the gradients: the
        loss normalized by this batch's count (one device, one micro-batch a step, so it is the step's total); None,
        no backward and no update, for a batch without signal."""
        if float(out.signal.sum()) <= 0:
            return None
        if reduction == "sum" or float(out.count) <= 0:
            return out.loss
        return out.loss / out.count

    def finish(self, params: list[nn.Parameter], *, world_size: int, accumulate: int, reduce=None,
               scale_gradients: bool = True) -> bool:
        """Close the optimizer step: sum the counts over ranks (`reduce(tensor) -> tensor`, e.g. the strategy's
        sum; None on one process), then drop the gradients of an empty step or divide them by the total count.
        `scale_gradients=False` when the loss was normalized already (optimizer inside backward). Returns whether
        the step was empty."""
        counts = torch.tensor([self.count, self.signal, self.batches], dtype=torch.float64,
                              device=params[0].device if params else "cpu")
        if world_size > 1 and reduce is not None:
            counts = reduce(counts)
        total, signal, batches = (float(c) for c in counts.cpu())
        self.count = self.signal = 0.0
        self.batches = 0
        # a step whose micro-batches were all skipped as non-finite has no gradients either; it is counted there
        self.last_step_empty = signal <= 0 and batches > 0
        if self.last_step_empty:
            for p in params:
                p.grad = None
            return True
        if scale_gradients and self.reduction != "sum" and total > 0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, accumulate * world_size / total)
        return False


__all__ = ["StepNormalizer"]
