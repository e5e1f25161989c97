"""Experiment 3: RL-feedback (SDPO) vs GRPO at an equal generation budget. See
experiments/conf/rl_feedback_vs_grpo.yaml.

    python experiments/rl_feedback_vs_grpo.py                    # 2 arms x 3 seeds on SmolLM2-135M-Instruct
    python experiments/rl_feedback_vs_grpo.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2

Writes experiments/results/rl_feedback_vs_grpo/: results.json, results.csv, summary.md, rl_feedback_vs_grpo.png.
"""

from __future__ import annotations

from pathlib import Path


import evidence


def row(r: dict) -> dict:
    out = {"greedy_before": r["before"]["student_accuracy"], "greedy_after": r["after"]["student_accuracy"],
           "completion_tokens_before": r["before"]["mean_completion_tokens"],
           "completion_tokens_after": r["after"]["mean_completion_tokens"],
           "generated_samples": r.get("generated_samples"), "generated_tokens": r.get("generated_tokens"),
           "train_seconds": r.get("train_seconds")}
    hist = [h for h in r.get("history") or [] if "reward" in h]
    # steps whose group had a success: the only steps where SDPO's teacher has a sibling solution to show, and
    # (with at least one failure too) where GRPO's advantages are non-zero
    out["steps_with_a_success"] = sum(h["reward"] > 0 for h in hist) if hist else None
    out["mean_train_reward"] = sum(h["reward"] for h in hist) / len(hist) if hist else None
    for p in r.get("curve") or []:
        out[f"accuracy_at_{p['samples']}_samples"] = p["accuracy"]
    return out


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors  # a search has more arms than the experiment's two
    colors = {arm: palette[i % len(palette)] for i, arm in enumerate(exp.arms)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in exp.arms:
        curves = [r.get("curve") or [] for r in results if r["arm"] == arm]
        for key, ax in (("accuracy", axes[0]), ("mean_completion_tokens", axes[1])):
            for c in curves:
                ax.plot([p["samples"] for p in c], [p[key] for p in c], color=colors[arm], alpha=0.3, lw=1)
            by_x: dict[int, list[float]] = {}
            for c in curves:
                for p in c:
                    by_x.setdefault(p["samples"], []).append(p[key])
            xs = sorted(by_x)
            ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], color=colors[arm], lw=2.2, marker="o", ms=4,
                    label=f"{arm} (mean of {len(curves)} seeds)")
    sampled = int(exp.measure.get("curve_sampled_n") or 0)
    how = f"{sampled} samples per prompt at T={exp.measure.sampled_temperature}" if sampled else "greedy"
    split = "validation" if "data.eval_split=val" in list(exp.common) else "held-out"
    axes[0].set_ylabel(f"{split} accuracy ({how})")
    axes[0].set_title("Accuracy vs generated training samples", fontsize=10)
    axes[1].set_ylabel(f"mean answer length (tokens, {'sampled' if sampled else 'greedy'})")
    axes[1].set_title("Answer length", fontsize=10)
    for ax in axes:
        ax.set_xlabel("rollouts generated for training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    evidence.save_figure(fig, exp, out, "thick = mean, thin = each seed")


if __name__ == "__main__":
    evidence.main("rl_feedback_vs_grpo", row, plot)
