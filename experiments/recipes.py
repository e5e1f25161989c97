"""The recipe search for the default run: self-critique on one-step arithmetic, tuned on the validation split.
See experiments/conf/recipes.yaml (arms = trials) and docs/recipes.md (what was learned).

    python experiments/recipes.py                    # every trial not yet recorded, 2 at a time
    python experiments/recipes.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2

Writes experiments/results/recipes/: results.json, results.csv, summary.md, recipes.png; one result.json per
trial under runs/<arm>/seed<k>/ (config, seed, commit, machine, load, per-step diagnostics).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evidence  # noqa: E402

DIAGNOSTICS = ("truncated", "teacher_advantage", "clipped_teacher_mass", "no_signal_rows", "completion_len")


def row(r: dict) -> dict:
    """One trial: validation accuracy before and after, the gain, and the run means of the step diagnostics."""
    before, after = r["before"], r["after"]
    teacher = evidence.has_teacher(r) and before.get("teacher_accuracy") is not None
    history = r.get("history") or []
    out = {"val_before": before["student_accuracy"],
           "teacher_with_context": before["teacher_accuracy"] if teacher else None,
           "val_after": after["student_accuracy"],
           "gain": after["student_accuracy"] - before["student_accuracy"],
           "answer_tokens_after": after["mean_completion_tokens"], "train_seconds": r.get("train_seconds")}
    for key in DIAGNOSTICS:
        values = [h[key] for h in history if key in h]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    out["empty_steps"] = (r.get("train_metrics") or {}).get("train/empty_steps")
    return out


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    arms = list(exp.arms)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(arms) + 4), 4.2), gridspec_kw={"width_ratios": [3, 1]})
    evidence.bar_panel(axes[0], summary, arms, [("val_before", "before"), ("val_after", "after")],
                       "validation accuracy")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("Greedy accuracy on the validation split", fontsize=10)
    axes[0].tick_params(axis="x", labelrotation=30)
    evidence.bar_panel(axes[1], summary, [a for a in arms if exp.arms[a].train], [("mean_truncated", "cut")],
                       "share of rollouts cut")
    axes[1].set_title("Rollouts cut by max_new_tokens", fontsize=10)
    axes[1].tick_params(axis="x", labelrotation=30)
    evidence.save_figure(fig, exp, out, "bars = mean, dots = each seed; trials tuned on the validation split")


if __name__ == "__main__":
    evidence.main("recipes", row, plot)
