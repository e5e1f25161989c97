"""Learning curves of the new facts and of the known facts, every 10 steps, for SFT and self-distillation at
loss.lmbda 0, 0.5 and 1. See experiments/conf/learning_curves.yaml.

    python experiments/learning_curves.py              # every (arm, seed) not yet recorded, one at a time
    python experiments/learning_curves.py seeds=[0] -- model=tiny trainer.max_steps=4

Writes experiments/results/learning_curves/: results.json, results.csv (per run: test accuracy and known facts at
each point, training seconds to each point, drift), summary.md, learning_curves.png.
"""

from __future__ import annotations

from pathlib import Path


import evidence

PROBE = "known_facts"


def row(r: dict) -> dict:
    out = {"test_before": r["before"]["student_accuracy"], "teacher_with_context": r["before"]["teacher_accuracy"],
           "test_after": r["after"]["student_accuracy"],
           "known_before": (r["before"].get("probes") or {}).get(PROBE, {}).get("student_accuracy"),
           "known_after": (r["after"].get("probes") or {}).get(PROBE, {}).get("student_accuracy"),
           "drift_kl": (r.get("drift") or {}).get("kl_mean"), "train_seconds": r.get("train_seconds"),
           "run_seconds": r.get("seconds")}
    for point in r.get("curve") or []:
        step = point["step"]
        out[f"test_at_{step}"] = point["accuracy"]
        out[f"known_at_{step}"] = (point.get("probes") or {}).get(PROBE)
        out[f"seconds_at_{step}"] = point.get("train_seconds")
    first = next((p for p in r.get("curve") or [] if p["accuracy"] >= 0.8), None)
    out["steps_to_80"] = first["step"] if first else None
    out["seconds_to_80"] = first.get("train_seconds") if first else None
    return out


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    """Test accuracy against steps and against training seconds, and the known-facts probe against steps: each
    seed a thin line, the mean over seeds a thick one."""
    import matplotlib.pyplot as plt

    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for i, arm in enumerate(exp.arms):
        runs = [r for r in results if r["arm"] == arm and r.get("curve")]
        for k, (ax, x, y) in enumerate(((axes[0], "step", "accuracy"), (axes[1], "train_seconds", "accuracy"),
                                        (axes[2], "step", PROBE))):
            lines = []
            for r in runs:
                xs = [p.get(x) for p in r["curve"]]
                ys = [p["accuracy"] if y == "accuracy" else (p.get("probes") or {}).get(PROBE) for p in r["curve"]]
                pts = [(a, b) for a, b in zip(xs, ys) if a is not None and b is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colors[i % 5], lw=0.6, alpha=0.4)
                    lines.append(pts)
            if lines and len({len(p) for p in lines}) == 1:
                mean = [(sum(p[j][0] for p in lines) / len(lines), sum(p[j][1] for p in lines) / len(lines))
                        for j in range(len(lines[0]))]
                ax.plot(*zip(*mean), color=colors[i % 5], lw=2, label=arm if k == 0 else None, marker="o", ms=3)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("new facts: test accuracy (greedy)")
    axes[1].set_xlabel("training seconds (evaluations excluded; one run at a time, 2 threads)")
    axes[1].set_ylabel("new facts: test accuracy (greedy)")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("known facts kept (test probe)")
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    evidence.save_figure(fig, exp, out, "thin = each seed, thick = mean")


if __name__ == "__main__":
    evidence.main("learning_curves", row, plot)
