"""Learning without forgetting, measured against SFT's whole frontier. See experiments/conf/frontier.yaml.

    python experiments/frontier.py                    # every (arm, seed) not yet recorded, 2 at a time
    python experiments/frontier.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=4

Writes experiments/results/frontier/: results.json, results.csv, summary.md, frontier.png (new-fact accuracy
against each retention measure, every arm and seed) and verdict.md (the target, seed by seed: at new-fact accuracy
of at least 80%, does a self-distillation point keep at least 20 points more known facts than every SFT point of
equal or higher new-fact accuracy, drift less, and keep block A at least as well?).
"""

from __future__ import annotations

from pathlib import Path


import evidence
import knowledge_injection

NEW = "facts_b_after_facts_b"  # new facts: block B, right after training on it
KEPT_A = "facts_a_after_facts_b"  # block A, after training on B
KNOWN = "known_facts_after_facts_b"  # the known-facts probe after both blocks
KNOWN_BEFORE = "before_known_facts"
DRIFT = "drift_kl"
TARGET_NEW, MARGIN = 0.8, 0.2


def row(r: dict) -> dict:
    out = knowledge_injection.row(r)
    return {k: out.get(k) for k in (NEW, "facts_a_after_facts_a", KEPT_A, KNOWN_BEFORE, KNOWN, DRIFT)} | {
        "train_seconds": r.get("train_seconds"), "run_seconds": r.get("seconds")}


def method(arm: str) -> str:
    """`sft`, `sd0`, `sd05`, `sd1`, ... : the arm name up to its first `_`."""
    return arm.split("_")[0]


def verdict(rows: list[dict]) -> list[dict]:
    """Per seed and self-distillation point with new-fact accuracy >= `TARGET_NEW`: the SFT points of that seed
    with equal or higher new-fact accuracy, and whether the point beats every one of them (known facts by at least
    `MARGIN`, less drift, block A at least as well). A point with no such SFT point to compare is reported as
    such, not as a win."""
    out = []
    for r in rows:
        if method(r["arm"]) == "sft" or r.get(NEW) is None or r[NEW] < TARGET_NEW:
            continue
        rivals = [s for s in rows if method(s["arm"]) == "sft" and s["seed"] == r["seed"] and s.get(NEW) is not None
                  and s[NEW] >= r[NEW]]
        checks = [{"sft": s["arm"], "known": r[KNOWN] - s[KNOWN] >= MARGIN - 1e-9, "drift": r[DRIFT] < s[DRIFT],
                   "block_a": r[KEPT_A] >= s[KEPT_A]} for s in rivals]
        out.append({"arm": r["arm"], "seed": r["seed"], "new": r[NEW], "known": r[KNOWN], "drift": r[DRIFT],
                    "block_a": r[KEPT_A], "rivals": checks,
                    "met": bool(checks) and all(c["known"] and c["drift"] and c["block_a"] for c in checks)})
    return out


def verdict_markdown(found: list[dict], seeds: list[int]) -> str:
    lines = [f"Target: new facts >= {TARGET_NEW:.0%}, known facts kept >= {MARGIN:.0%} points above every SFT point "
             "of the same seed with equal or higher new-fact accuracy, less drift, block A kept at least as well.", "",
             "| seed | self-distillation point | new | known kept | drift | block A kept | SFT points compared | met |",
             "|---|---|---|---|---|---|---|---|"]
    for v in sorted(found, key=lambda v: (v["seed"], v["arm"])):
        compared = ", ".join(f"{c['sft']} ({'known ' + ('ok' if c['known'] else 'no')}, "
                             f"{'drift ' + ('ok' if c['drift'] else 'no')}, {'A ' + ('ok' if c['block_a'] else 'no')})"
                             for c in v["rivals"]) or "none reaches its new-fact accuracy"
        lines.append(f"| {v['seed']} | {v['arm']} | {v['new']:.2f} | {v['known']:.2f} | {v['drift']:.3f} | "
                     f"{v['block_a']:.2f} | {compared} | {'yes' if v['met'] else 'no'} |")
    per_seed = {s: any(v["met"] for v in found if v["seed"] == s) for s in seeds}
    lines += ["", "Met in each seed: " + ", ".join(f"seed {s}: {'yes' if ok else 'no'}" for s, ok in per_seed.items())
              + (" -> the target is met." if per_seed and all(per_seed.values()) else " -> the target is not met.")]
    return "\n".join(lines) + "\n"


def plot(exp, summary: dict, results: list[dict], out: Path) -> None:
    """New-fact accuracy (x) against known facts kept, block A kept and drift (y): one marker per arm (the mean
    over seeds, whiskers min-max), every seed a small dot; SFT's points joined in order of new-fact accuracy."""
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    found = verdict(rows)
    (out / "verdict.md").write_text(verdict_markdown(found, [int(s) for s in exp.seeds]))
    colors = {"sft": "#4C72B0", "sd0": "#DD8452", "sd05": "#55A868", "sd1": "#C44E52"}
    panels = [(KNOWN, "known facts kept (test probe, after B)"), (KEPT_A, "block A kept after B"),
              (DRIFT, "drift KL(trained || base), nats/token")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (key, label) in zip(axes, panels):
        sft_points = []
        for arm in exp.arms:
            mine = [r for r in rows if r["arm"] == arm and r.get(NEW) is not None and r.get(key) is not None]
            if not mine:
                continue
            c = colors.get(method(arm), "grey")
            xs, ys = [r[NEW] for r in mine], [r[key] for r in mine]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            ax.scatter(xs, ys, color=c, s=8, alpha=0.5)
            ax.errorbar([mx], [my], xerr=[[mx - min(xs)], [max(xs) - mx]], yerr=[[my - min(ys)], [max(ys) - my]],
                        fmt="o" if method(arm) == "sft" else "s", color=c, ms=6, lw=0.8, capsize=2)
            ax.annotate(arm, (mx, my), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if method(arm) == "sft":
                sft_points.append((mx, my))
        if sft_points:
            sft_points.sort()
            ax.plot(*zip(*sft_points), color=colors["sft"], lw=1, alpha=0.6)
        ax.axvline(TARGET_NEW, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("new facts: block B after B (test phrasings)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colors.items()]
    axes[0].legend(handles=handles, fontsize=8, title="method", title_fontsize=8)
    evidence.save_figure(fig, exp, out, "sft = SFT, sdX = self-distillation with loss.lmbda X (05: 0.5); "
                                        "marker = mean, whiskers = min-max, dots = seeds")


if __name__ == "__main__":
    evidence.main("frontier", row, plot)
