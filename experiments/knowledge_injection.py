"""Experiment 1: knowledge injection and forgetting, continual (SDFT) vs SFT. See experiments/conf/knowledge_injection.yaml.

    python experiments/knowledge_injection.py                    # 3 arms x 3 seeds on SmolLM2-135M-Instruct
    python experiments/knowledge_injection.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2

Writes experiments/results/knowledge_injection/: results.json, results.csv, summary.md, knowledge_injection.png.
"""

from __future__ import annotations

from pathlib import Path


import evidence


def row(r: dict) -> dict:
    c = r.get("continual") or {}
    tasks, probes = c.get("tasks", []), c.get("probes", [])
    matrix, probe_acc = c.get("matrix", []), c.get("probe_accuracy", [])
    out: dict = {}
    by_task = r["before"].get("by_task", {})
    for label, ev in by_task.items():
        out[f"before_{label}"] = ev["student_accuracy"]
        out[f"teacher_before_{label}"] = ev["teacher_accuracy"] if evidence.has_teacher(r) else None
    for i, task in enumerate(tasks):  # row i: after training on task i
        for j, label in enumerate(tasks[: i + 1]):
            out[f"{label}_after_{task}"] = matrix[i][j] if i < len(matrix) else None
        for j, label in enumerate(probes):
            out[f"{label}_after_{task}"] = probe_acc[i][j] if i < len(probe_acc) else None
    for k in ("avg_accuracy", "bwt", "forgetting"):
        out[k] = (c.get("summary") or {}).get(k)
    out["drift_kl"] = (r.get("drift") or {}).get("kl_mean")
    out["train_seconds"] = r.get("train_seconds")
    out["generated_tokens"] = r.get("generated_tokens")
    return out


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    arms = list(exp.arms)
    tasks = (results[0].get("continual") or {}).get("tasks", []) if results else []
    probes = (results[0].get("continual") or {}).get("probes", []) if results else []
    metrics: list[tuple[str, str]] = []
    if tasks:
        first, last = tasks[0], tasks[-1]
        metrics += [(f"teacher_before_{t}", f"teacher with\nthe fact: {t}") for t in tasks]
        metrics += [(f"{first}_after_{first}", f"{first}\nafter {first}")]
        for t in tasks[1:]:
            metrics += [(f"{t}_after_{t}", f"{t}\nafter {t}")]
        if len(tasks) > 1:
            metrics += [(f"{first}_after_{last}", f"{first}\nafter {last}")]
        metrics += [(f"before_{p}", f"{p}\nbefore") for p in probes]
        metrics += [(f"{p}_after_{last}", f"{p}\nafter {last}") for p in probes]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3.2, 1]})
    evidence.bar_panel(axes[0], summary, arms, metrics, "held-out accuracy (greedy)")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("Recall of new facts (paraphrased, no context) and retention (real capitals)", fontsize=10)
    evidence.bar_panel(axes[1], summary, arms, [("drift_kl", "KL(trained || base)\ngeneral prompts")],
                       "nats per token")
    axes[1].set_title("Drift from the base model", fontsize=10)
    evidence.save_figure(fig, exp, out, "bars = mean, dots = each seed")


if __name__ == "__main__":
    evidence.main("knowledge_injection", row, plot)
