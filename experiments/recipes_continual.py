"""A small recipe search for continual (SDFT) on two blocks of invented facts, tuned on the validation split,
aimed at KL drift and retention against SFT. See experiments/conf/recipes_continual.yaml.

    python experiments/recipes_continual.py          # every trial not yet recorded, 2 at a time

Writes experiments/results/recipes_continual/ with the columns of experiments/knowledge_injection.py.
"""

from __future__ import annotations



import evidence
from knowledge_injection import plot, row

if __name__ == "__main__":
    evidence.main("recipes_continual", row, plot)
