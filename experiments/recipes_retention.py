"""The default recipe's search for learning with less forgetting (loss.lmbda=0.5 at two learning rates), tuned on
the validation split. See experiments/conf/recipes_retention.yaml (arms = trials) and docs/recipes.md.

    python experiments/recipes_retention.py              # every trial not yet recorded, 2 at a time

Writes experiments/results/recipes_retention/ the way experiments/recipes_on_policy.py writes its search: the
validation accuracy and the known-facts probe every 10 steps (`curve_*` columns), and the drift.
"""

from __future__ import annotations

import evidence
from recipes import plot
from recipes_on_policy import row as curve_row


def row(r: dict) -> dict:
    return {**curve_row(r), "drift_kl": (r.get("drift") or {}).get("kl_mean")}


if __name__ == "__main__":
    evidence.main("recipes_retention", row, plot)
