"""The recipe search for the default run: self-critique on one-step arithmetic, tuned on the validation split.
See experiments/conf/recipes.yaml (arms = trials) and docs/recipes.md (what was learned).

    python experiments/recipes.py                    # every trial not yet recorded, 2 at a time
    python experiments/recipes.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2

Writes experiments/results/recipes/: results.json, results.csv, summary.md, recipes.png; one result.json per
trial under runs/<arm>/seed<k>/ (config, seed, commit, machine, load, per-step diagnostics).
"""

from __future__ import annotations

from pathlib import Path


import evidence

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
    """One row per trial: validation accuracy before (grey) -> after (green if higher, red if lower), with the
    teacher-with-context accuracy (x); beside it, the share of rollouts cut by the length limit."""
    import matplotlib.pyplot as plt

    arms = [a for a in exp.arms if summary["arms"].get(a, {}).get("val_after", {}).get("n")]
    mean = {a: {k: (v or {}).get("mean") for k, v in summary["arms"][a].items()} for a in arms}
    fig, (ax, cut) = plt.subplots(1, 2, figsize=(11, 0.42 * len(arms) + 1.6), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1]})
    for y, arm in enumerate(arms):
        m = mean[arm]
        before, after, teacher = m["val_before"], m["val_after"], m.get("teacher_with_context")
        colour = "tab:green" if after > before else "tab:red" if after < before else "grey"
        ax.annotate("", xy=(after, y), xytext=(before, y), arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.8})
        ax.plot([before], [y], "o", color="grey", ms=5)
        ax.plot([after], [y], "o", color=colour, ms=6)
        if teacher is not None:
            ax.plot([teacher], [y], "x", color="black", ms=5)
        ax.text(max(before, after) + 0.015, y, f"{before:.2f} -> {after:.2f}", va="center", fontsize=7)
        if m.get("mean_truncated") is not None:
            cut.barh(y, m["mean_truncated"], color="tab:orange")
    ax.set_yticks(range(len(arms)), arms, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("greedy accuracy on the validation split (o before -> o after; x teacher with its context)")
    ax.grid(axis="x", alpha=0.3)
    cut.set_xlim(0, 1)
    cut.set_xlabel("share of training rollouts cut")
    cut.grid(axis="x", alpha=0.3)
    evidence.save_figure(fig, exp, out, "one trial per row, seed 0; base* rows are untrained")


if __name__ == "__main__":
    evidence.main("recipes", row, plot)
