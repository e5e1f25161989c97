"""Experiment 2: self-critique (OPSD) vs SFT vs the base model on arithmetic word problems. See
experiments/conf/self_critique_arithmetic.yaml.

    python experiments/self_critique_arithmetic.py               # 3 arms x 3 seeds on SmolLM2-135M-Instruct
    python experiments/self_critique_arithmetic.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2

Writes experiments/results/self_critique_arithmetic/: results.json, results.csv, summary.md,
self_critique_arithmetic.png.
"""

from __future__ import annotations

from pathlib import Path


import evidence


def row(r: dict) -> dict:
    before, after = r["before"], r["after"]
    sampled = r.get("after_sampled") or {}
    teacher = evidence.has_teacher(r)
    return {"greedy_before": before["student_accuracy"],
            "teacher_with_context": before["teacher_accuracy"] if teacher else None,
            "gap_before": before["gap"] if teacher else None, "greedy_after": after["student_accuracy"],
            "sampled_after": sampled.get("accuracy"), "completion_tokens_greedy": after["mean_completion_tokens"],
            "completion_tokens_sampled": sampled.get("mean_completion_tokens"),
            "generated_tokens": r.get("generated_tokens"), "train_seconds": r.get("train_seconds")}


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    arms = list(exp.arms)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    evidence.bar_panel(axes[0], summary, arms, [("greedy_after", "greedy"), ("sampled_after", "sampled (T=1)")],
                       "held-out accuracy after training")
    teacher = [r["teacher_with_context"] for r in summary["rows"] if r.get("teacher_with_context") is not None]
    if teacher:
        m = sum(teacher) / len(teacher)
        axes[0].axhline(m, color="gray", ls="--", lw=1)
        axes[0].text(1.45, m, f"teacher with\nreference solution\n{m:.2f}", va="center", ha="right", fontsize=7,
                     color="gray")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("Accuracy (base = no training)", fontsize=10)
    evidence.bar_panel(axes[1], summary, arms, [("generated_tokens", "generated for training")], "tokens")
    axes[1].set_title("Generation spent", fontsize=10)
    evidence.bar_panel(axes[2], summary, arms, [("completion_tokens_greedy", "greedy answer")], "tokens")
    axes[2].set_title("Answer length", fontsize=10)
    evidence.save_figure(fig, exp, out, "bars = mean, dots = each seed")


if __name__ == "__main__":
    evidence.main("self_critique_arithmetic", row, plot)
