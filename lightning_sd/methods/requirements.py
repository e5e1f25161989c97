"""What each method needs from the other config groups, checked at start-up (`validate_config`)."""

from __future__ import annotations

import warnings
from typing import Any


def check_method(loss: Any, teacher: Any, generation: Any, data: Any) -> None:
    """Raise a ValueError naming the options when the loss cannot work with the rest of the config (warn when
    it would run but learn nothing).

    `loss` is a `LossConfig`; the others are the typed group configs (`teacher`, `generation`, `data`)."""
    policy_gradient = loss.name == "grpo" or (loss.name == "rl_feedback" and loss.lam > 0)
    uses_rewards = policy_gradient or loss.template == "sdpo"
    verifier = getattr(data, "verifier", None)
    if uses_rewards and (verifier == "none" or (not data.task and verifier is None)):
        raise ValueError(f"loss={loss.name} (template {loss.template!r}, lam={loss.lam}) learns from verifier rewards: "
                         "pick a task with a verifier (data=arithmetic|facts|json_format, or data.task=...) or set "
                         "data.verifier (math, normalized, ...; docs/configuration.md)")
    if policy_gradient and generation.n < 2:  # a warning: every loss option must validate on its own
        warnings.warn(f"loss={loss.name} with loss.lam={loss.lam} normalizes rewards within each prompt's group, so "
                      f"with generation.n={generation.n} every advantage is 0 and the GRPO term learns nothing: set "
                      "generation.n >= 2 (the papers use 8)", stacklevel=2)
    if loss.template == "sdpo" and generation.n < 2 and not loss.feedback:
        raise ValueError("the sdpo teacher context needs a successful sibling rollout (generation.n >= 2) or verifier "
                         f"feedback (loss.feedback=true); got generation.n={generation.n}, loss.feedback=false")


__all__ = ["check_method"]
