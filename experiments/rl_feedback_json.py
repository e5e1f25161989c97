"""RL-feedback (SDPO) vs GRPO on the JSON-format task, where the base model succeeds about a quarter of the time
and the verifier explains each failure. See experiments/conf/rl_feedback_json.yaml.

    python experiments/rl_feedback_json.py                  # 2 arms x 3 seeds, held-out test split
    python experiments/rl_feedback_json.py name=rl_feedback_json_val -- data.eval_split=val   # for a search

Writes results.json, results.csv, summary.md and a plot of sampled accuracy against generated rollouts.
"""

from __future__ import annotations



import evidence
from rl_feedback_vs_grpo import plot, row

if __name__ == "__main__":
    evidence.main("rl_feedback_json", row, plot)
