"""The recipe search for pure on-policy self-distillation (loss.lmbda=1) on invented facts, tuned on the validation
split. See experiments/conf/recipes_on_policy.yaml (arms = trials) and docs/recipes.md (what was learned).

    python experiments/recipes_on_policy.py              # every trial not yet recorded, 2 at a time

Writes experiments/results/recipes_on_policy/ the way experiments/recipes.py writes its search, with the
validation accuracy and the known-facts probe every 20 steps (`curve_*` columns).
"""

from __future__ import annotations



import evidence
from recipes import plot
from recipes import row as trial_row


def row(r: dict) -> dict:
    out = trial_row(r)
    for point in r.get("curve") or []:
        out[f"curve_step{point['step']}"] = point["accuracy"]
        for label, acc in (point.get("probes") or {}).items():
            out[f"{label}_step{point['step']}"] = acc
    return out


if __name__ == "__main__":
    evidence.main("recipes_on_policy", row, plot)
