"""`OptimizerInBackward`: the optimizer step taken inside the backward pass, one parameter at a time, each
gradient freed as soon as it has been applied, so a full set of gradients never exists.

Why: after the backward pass and before the optimizer step the gradients are one more copy of the trainable
weights (fp32: 4 bytes a parameter), at the point where a step's memory often peaks. Stepping each parameter from a
hook that fires once backward has accumulated its gradient (`register_post_accumulate_grad_hook`) removes that
copy from the peak. The update is the same as one optimizer over all parameters (AdamW and SGD update each
parameter from its own gradient and state alone); what it rules out is anything that needs every gradient
before the first update: clipping by the global norm, accumulating gradients over micro-batches, averaging them
across ranks, and fp16's loss scaler (`check_step_in_backward` refuses them for a run's setup).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch import nn


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter (`make([p])`), each stepped by a hook as soon as backward has accumulated that
    parameter's gradient; the gradient is then set to None. `step(closure)` runs the closure (the forward and
    backward passes) with the hooks armed; a backward outside `step` leaves gradients in place as usual.

    The hyperparameters live in this optimizer's single param group (a scheduler sets `lr` there) and are copied
    into each parameter's optimizer before its update. Each parameter's optimizer state is created at
    construction (`_allocate_state`). `state_dict()` holds every parameter's optimizer state."""

    def __init__(self, params: Iterable[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        params = list(params)
        if not params:
            raise ValueError("OptimizerInBackward needs at least one parameter")
        self._per_param = [make([p]) for p in params]
        defaults = {k: v for k, v in self._per_param[0].param_groups[0].items() if k != "params"}
        super().__init__(params, defaults)
        self._armed = False
        for p, opt in zip(params, self._per_param):
            _allocate_state(opt, p)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        # the parameter holds its hook for life: the hook holds this optimizer weakly, so that an optimizer that is
        # replaced (a second `fit`) frees its state, and its hooks do nothing from then on
        owner = weakref.ref(self)

        def step_and_free(param: torch.Tensor) -> None:
            this = owner()
            if this is None or not this._armed:
                return
            opt = this._per_param[index]
            group = opt.param_groups[0]
            for k, v in this.param_groups[0].items():
                if k != "params":
                    group[k] = v
            opt.step()
            param.grad = None

        return step_and_free

    def step(self, closure: Callable[[], torch.Tensor | None] | None = None):  # type: ignore[override]
        """Run `closure` (it computes the loss and calls backward); each parameter is updated during its
        backward. A closure is required: the updates happen inside its backward pass."""
        if closure is None:
            raise RuntimeError("OptimizerInBackward updates the weights inside backward: call step(closure) with a "
                               "closure that runs the backward pass (Lightning's automatic optimization does)")
        self._armed = True
        try:
            with torch.enable_grad():
                return closure()
        finally:
            self._armed = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def state_dict(self) -> dict:
        return {"param_groups": [{k: v for k, v in self.param_groups[0].items() if k != "params"}],
                "per_parameter": [opt.state_dict() for opt in self._per_param]}

    def load_state_dict(self, state_dict: dict) -> None:
        per_param = state_dict.get("per_parameter")
        if per_param is None or len(per_param) != len(self._per_param):
            found = "none" if per_param is None else len(per_param)
            raise ValueError(f"this optimizer state is not an OptimizerInBackward state for {len(self._per_param)} "
                             f"parameters (it has {found}); was it saved with optimizer.in_backward set differently?")
        self.param_groups[0].update(state_dict["param_groups"][0])
        for opt, state in zip(self._per_param, per_param):
            opt.load_state_dict(state)

    def remove_hooks(self) -> None:
        """Detach the hooks from the parameters (they stay registered for the parameters' lifetime otherwise)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _allocate_state(opt: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Create `opt`'s state for `param` now, before any forward pass, rather than lazily inside the first backward,
    where it would land among that pass's temporaries and raise the process's memory high-water mark. Made by one
    step on a zero gradient with `lr` and `weight_decay` at 0, which leaves `param` as it is (AdamW: zero moments;
    SGD: a zero momentum buffer), then every step counter put back to 0: the state the first real step would have
    created."""
    group = opt.param_groups[0]
    saved = {k: group[k] for k in ("lr", "weight_decay") if k in group}
    grad, param.grad = param.grad, torch.zeros_like(param)
    try:
        group.update({k: 0.0 for k in saved})
        opt.step()
    finally:
        group.update(saved)
        param.grad = grad
    for state in opt.state.values():
        if "step" in state:
            state["step"] = state["step"].zero_() if isinstance(state["step"], torch.Tensor) else 0


def check_step_in_backward(*, gradient_clip_val: float | None, accumulate_grad_batches: int, processes: int,
                           precision: str, strategy: str | None = None) -> None:
    """Raise a ValueError naming everything in a run's setup that needs all gradients before the first update,
    each with the key to change; return when `optimizer.in_backward` can be used. `processes`: the run's world
    size; `strategy`: Lightning's strategy name where it is a string."""
    problems = []
    if gradient_clip_val:
        problems.append(f"trainer.gradient_clip_val={gradient_clip_val}: clipping needs every gradient's norm "
                        "before any update; set it to null")
    if accumulate_grad_batches != 1:
        problems.append(f"trainer.accumulate_grad_batches={accumulate_grad_batches}: each micro-batch would update "
                        "the weights; set it to 1")
    if strategy not in (None, "auto", "single_device") or processes != 1:
        what = f"trainer.strategy={strategy}" if strategy not in (None, "auto", "single_device") else \
            f"{processes} processes"
        problems.append(f"{what}: gradients must be averaged or sharded across ranks before an update; train on "
                        "one device (trainer=cpu or trainer=gpu)")
    if precision in ("16-mixed", "16"):
        problems.append(f"trainer.precision={precision}: the loss scaler must see every gradient before an update; "
                        "use bf16-mixed or 32-true")
    if problems:
        raise ValueError("optimizer.in_backward=true updates each parameter inside backward, which rules out: "
                         + "; ".join(problems))


def check_trainer_for_step_in_backward(trainer) -> None:
    """`check_step_in_backward` against the Trainer a module runs under (the rules train.py checks in the config at
    start-up, for a module used in one's own Lightning code)."""
    strategy = type(trainer.strategy).__name__
    check_step_in_backward(
        gradient_clip_val=trainer.gradient_clip_val, accumulate_grad_batches=trainer.accumulate_grad_batches,
        processes=trainer.world_size, precision=str(trainer.precision),
        strategy=None if strategy in ("SingleDeviceStrategy", "SingleDeviceXLAStrategy") else strategy)
