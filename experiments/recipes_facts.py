"""The recipe search for knowledge injection: continual (SDFT) on invented facts, tuned on the validation split.
See experiments/conf/recipes_facts.yaml (arms = trials) and docs/recipes.md (what was learned).

    python experiments/recipes_facts.py              # every trial not yet recorded, 2 at a time

Writes experiments/results/recipes_facts/ the way experiments/recipes.py writes its search.
"""

from __future__ import annotations



import evidence
from recipes import plot, row

if __name__ == "__main__":
    evidence.main("recipes_facts", row, plot)
