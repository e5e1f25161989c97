"""What each method needs from the other config groups, checked at start-up (`validate_config`): the method
object's own `check` (`Method.check`)."""

from __future__ import annotations

from typing import Any

from lightning_sd.methods.base import method_for


def check_method(loss: Any, teacher: Any, generation: Any, data: Any) -> None:
    """Raise a ValueError naming the options when the loss cannot work with the rest of the config (warn when
    it would run but learn nothing).

    `loss` is a `LossConfig`; the others are the typed group configs (`teacher`, `generation`, `data`)."""
    method_for(loss).check(teacher, generation, data)


__all__ = ["check_method"]
