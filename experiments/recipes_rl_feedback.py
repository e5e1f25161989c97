"""The recipe search for RL-feedback (SDPO) on the JSON-format task, tuned on the validation split.
See experiments/conf/recipes_rl_feedback.yaml (arms = trials) and docs/recipes.md (what was learned).

    python experiments/recipes_rl_feedback.py        # every trial not yet recorded, 2 at a time

Writes experiments/results/recipes_rl_feedback/ the way experiments/rl_feedback_json.py writes its runs: sampled
accuracy against generated rollouts, greedy accuracy before and after, the training reward.
"""

from __future__ import annotations



import evidence
from rl_feedback_vs_grpo import plot, row

if __name__ == "__main__":
    evidence.main("recipes_rl_feedback", row, plot)
