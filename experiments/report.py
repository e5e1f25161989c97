"""Regenerate the tables of docs/results.md, docs/recipes.md and docs/default_run.md from
experiments/results/<name>/results.json (no number in those tables is typed by hand): every block between
`<!-- results:<name> -->` and `<!-- /results:<name> -->` is replaced by the table of that experiment, with the
machine, the code version and the wall time of its runs.

    python experiments/report.py                 # rewrite the docs in place
    python experiments/report.py --check         # exit 1 if a doc is not up to date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "recipes.md", ROOT / "docs" / "default_run.md",
        ROOT / "docs" / "vllm.md"]

# experiment -> [(column title, metric key)]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "knowledge_injection": [
        ("teacher with the fact, A / B (before)", "teacher_before_facts_a|teacher_before_facts_b"),
        ("facts A after A", "facts_a_after_facts_a"), ("facts B after B", "facts_b_after_facts_b"),
        ("facts A after B", "facts_a_after_facts_b"), ("forgetting", "forgetting"),
        ("real capitals before", "before_real_capitals"), ("real capitals after B", "real_capitals_after_facts_b"),
        ("KL(trained \\|\\| base), nats/token", "drift_kl"), ("train s", "train_seconds")],
    "knowledge_injection_paper_recipe": [],  # the same columns as knowledge_injection (set below)
    "knowledge_injection_pilot": [
        ("teacher with the fact, A / B (before)", "teacher_before_facts_a|teacher_before_facts_b"),
        ("facts A after A", "facts_a_after_facts_a"), ("facts B after B", "facts_b_after_facts_b"),
        ("facts A after B", "facts_a_after_facts_b"), ("real capitals before", "before_real_capitals"),
        ("real capitals after B", "real_capitals_after_facts_b"), ("KL(trained \\|\\| base)", "drift_kl")],
    "self_critique_arithmetic": [
        ("teacher with reference solution", "teacher_with_context"), ("greedy before", "greedy_before"),
        ("greedy after", "greedy_after"), ("sampled after (T=1)", "sampled_after"),
        ("answer tokens (greedy)", "completion_tokens_greedy"), ("tokens generated for training", "generated_tokens"),
        ("train s", "train_seconds")],
    "rl_feedback_vs_grpo": [],  # columns from the curve points (accuracy_at_<k>_samples)
    "rl_feedback_json": [],  # the same, with the greedy accuracy and the training reward (CURVE_EXTRA)
    "recipes_rl_feedback": [],  # the search for rl_feedback_json: the same columns
    "recipes": [
        ("val before", "val_before"), ("teacher with context", "teacher_with_context"), ("val after", "val_after"),
        ("gain", "gain"), ("answer tokens after", "answer_tokens_after"), ("rollouts cut", "mean_truncated"),
        ("teacher advantage", "mean_teacher_advantage"), ("teacher mass clipped", "mean_clipped_teacher_mass"),
        ("train s", "train_seconds")],
    "recipes_replicate": [],  # the same columns as recipes (set below)
    "default_run": [
        ("test before", "test_before"), ("teacher with context", "teacher_with_context"), ("test after", "test_after"),
        ("known facts before", "known_before"), ("known facts after", "known_after"),
        ("share of steps on own samples", "steps_on_own_samples"), ("answer tokens after", "answer_tokens_after"),
        ("rollouts cut (sampled steps)", "mean_truncated"), ("whole run s", "run_seconds")],
}


COLUMNS["frontier"] = [
    ("new facts (B after B)", "facts_b_after_facts_b"), ("A after A", "facts_a_after_facts_a"),
    ("A kept after B", "facts_a_after_facts_b"), ("known facts before", "before_known_facts"),
    ("known facts after B", "known_facts_after_facts_b"), ("KL(trained \\|\\| base), nats/token", "drift_kl"),
    ("train s", "train_seconds")]
COLUMNS["recipes_on_policy"] = [
    ("val before", "val_before"), ("teacher with context", "teacher_with_context"),
    ("val at step 20 / 40 / 60 / 80", "curve_step20|curve_step40|curve_step60|curve_step80"),
    ("known facts (validation part) at step 0 / 20 / 40 / 60 / 80",
     "known_facts_step0|known_facts_step20|known_facts_step40|known_facts_step60|known_facts_step80"),
    ("answer tokens after", "answer_tokens_after"), ("rollouts cut", "mean_truncated"), ("train s", "train_seconds")]
COLUMNS["recipes_retention"] = [
    ("val at step 10 / 20 / 30 / 40 / 60 / 80", "curve_step10|curve_step20|curve_step30|curve_step40|curve_step60|curve_step80"),
    ("known facts (validation part) at step 10 / 20 / 30 / 40 / 60 / 80",
     "known_facts_step10|known_facts_step20|known_facts_step30|known_facts_step40|known_facts_step60|known_facts_step80"),
    ("KL(trained \\|\\| base) at 80, nats/token", "drift_kl"), ("train s (80 steps)", "train_seconds")]
COLUMNS["default_run_vllm"] = COLUMNS["default_run"]  # the same run, its rollouts sampled by vLLM
COLUMNS["learning_curves"] = [
    ("new facts (test) at step 0 / 10 / 20 / 40 / 80", "test_at_0|test_at_10|test_at_20|test_at_40|test_at_80"),
    ("known facts (test probe) at step 0 / 20 / 40 / 80", "known_at_0|known_at_20|known_at_40|known_at_80"),
    ("steps to 80% new facts", "steps_to_80"), ("train s to 80%", "seconds_to_80"),
    ("KL(trained \\|\\| base), nats/token", "drift_kl"), ("train s (80 steps)", "train_seconds")]
COLUMNS["knowledge_injection_paper_recipe"] = COLUMNS["knowledge_injection"]  # the experiment's first run
COLUMNS["recipes_continual"] = COLUMNS["knowledge_injection"]  # its search, on the validation split
COLUMNS["recipes_replicate"] = COLUMNS["recipes"]  # a trial of the search, over more seeds
COLUMNS["recipes_facts"] = [c for c in COLUMNS["recipes"] if c[1] != "mean_clipped_teacher_mass"]  # no clip there


# curve experiments: columns after the accuracy points
CURVE_EXTRA: dict[str, list[tuple[str, str]]] = {
    "rl_feedback_json": [("greedy before", "greedy_before"), ("greedy after", "greedy_after"),
                         ("mean training reward", "mean_train_reward")],
}
CURVE_EXTRA["recipes_rl_feedback"] = CURVE_EXTRA["rl_feedback_json"]


def fmt(s: dict | None, digits: int = 2) -> str:
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _digits(key: str) -> int:
    if key.endswith("seconds") or key.startswith("generated"):
        return 0
    return 1 if "tokens" in key else 3 if key in ("drift_kl", "mean_teacher_advantage") else 2


def table(name: str, res: dict) -> str:
    summary = res["summary"]
    columns = COLUMNS.get(name)
    if not columns:  # curve experiments: one column per number of generated samples
        keys = sorted({k for arm in summary.values() for k in arm if k.startswith("accuracy_at_")},
                      key=lambda k: int(re.findall(r"\d+", k)[0]))
        columns = [(f"accuracy after {re.findall(r'[0-9]+', k)[0]} samples", k) for k in keys]
        columns += CURVE_EXTRA.get(name, [])
        columns += [("training steps with a success in the group", "steps_with_a_success"),
                    ("answer tokens before", "completion_tokens_before"),
                    ("answer tokens after", "completion_tokens_after"), ("train s", "train_seconds")]
    lines = ["| arm | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, metrics in summary.items():
        cells = []
        for _, key in columns:
            parts = [fmt(metrics.get(k), _digits(k)) for k in key.split("|")]
            cells.append(" / ".join(parts))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    runs = res["runs"]
    started = min(datetime.strptime(r["started"], "%Y-%m-%d %H:%M:%S") for r in runs)
    finished = max(datetime.strptime(r["finished"], "%Y-%m-%d %H:%M:%S") for r in runs)
    commits = sorted({str(r.get("git_commit"))[:12] for r in runs})
    m = runs[0]["machine"]
    exp = res["experiment"]
    seeds = sorted({r["seed"] for r in runs})
    lines += ["", f"Mean ± sample std (min-max) over seeds {seeds}; {len(runs)} runs. Machine: {processor(m)}, "
                  f"{m['cpu_count']} cores, torch {m['torch']}, {exp['parallel']} runs at once x {exp['threads']} "
                  f"thread(s). Wall time {started:%Y-%m-%d %H:%M}-{finished:%H:%M} UTC "
                  f"({(finished - started).total_seconds() / 60:.0f} min; {res['run_seconds_total'] / 60:.0f} "
                  f"run-minutes). Code: {', '.join(commits)}. Per-run numbers: "
                  f"[results.csv](../experiments/results/{name}/results.csv)."]
    return "\n".join(lines)


def processor(m: dict) -> str:
    """The CPU a result names: its model and vector features where recorded, else the architecture."""
    if not m.get("cpu_model"):
        return m.get("processor", "unknown CPU")
    features = ", ".join(m.get("cpu_features") or [])
    return f"{m['cpu_model']} ({features})" if features else m["cpu_model"]


def probe_table(res: dict) -> str:
    """The teacher-context probe's table (experiments/teacher_probe.py) with where it was measured."""
    from teacher_probe import markdown

    c, m = res["config"], res["machine"]
    return (markdown(res) + f"\n{c['problems']} {res['split']} problems x {c['samples']} samples at temperature "
            f"{c['temperature']}, model {c['model']}. Machine: {m['processor']}, {m['cpu_count']} cores, torch "
            f"{m['torch']}; {res['seconds'] / 60:.0f} min. Code: {str(res['git_commit'])[:12]}"
            f"{' (with uncommitted changes)' if str(res['git_commit']).endswith('+dirty') else ''}. "
            "Numbers: [results.json](../experiments/results/teacher_probe/results.json).")


def _value(text: str) -> str:
    try:
        x = float(text)
    except ValueError:
        return text
    return f"{x:.3g}" if x != int(x) else str(int(x))


def sweep_table(name: str, folder: Path) -> str:
    """A recipe search run by Hydra's Optuna sweeper (`train.py -m hparams_search=...` with
    `hydra.sweep.dir=experiments/results/<name>`): one row per finished trial, in order, with its sampled
    values, the objective it returned and its greedy accuracy after; the best trial in bold."""
    import yaml

    trials = sorted((int(p.name), json.loads((p / "metrics.json").read_text())) for p in folder.iterdir()
                    if p.name.isdigit() and (p / "metrics.json").is_file())
    sweeper = yaml.safe_load((folder / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]["sweeper"]
    params = list(sweeper["params"])
    best = max((m["objective"]["value"] for _, m in trials), default=None)
    metric = trials[0][1]["objective"]["metric"] if trials else "?"
    lines = ["| trial | " + " | ".join(f"`{p}`" for p in params) + f" | `{metric}` | greedy accuracy after | train s |",
             "|---" * (len(params) + 4) + "|"]
    for num, m in trials:
        values = dict(o.split("=", 1) for o in m["overrides"] if "=" in o)
        objective = f"{m['objective']['value']:.3f}"
        if m["objective"]["value"] == best:
            objective = f"**{objective}**"
        lines.append(f"| {num} | " + " | ".join(_value(values.get(p, "-")) for p in params)
                     + f" | {objective} | {m['eval_after']['student_accuracy']:.3f} | {m['train_seconds']:.0f} |")
    first = trials[0][1] if trials else {}
    cfg = first.get("config", {})
    sampler = sweeper["sampler"]
    commits = sorted({str(m.get("git_commit"))[:12] for _, m in trials})
    done = (folder / "optimization_results.yaml").is_file()
    machine = first.get("machine")
    where = (f"Machine: {machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}. "
             if machine else "")
    lines += ["", f"Optuna {sampler['_target_'].rsplit('.', 1)[-1]} (seed {sampler['seed']}, the first "
                  f"{sampler['n_startup_trials']} trials random), {len(trials)} of {sweeper['n_trials']} trials"
                  f"{'' if done else ' so far'}, one at a time; each trial seed {cfg.get('seed')}, "
                  f"{cfg.get('trainer', {}).get('max_steps')} steps, scored on data.eval_split="
                  f"{cfg.get('data', {}).get('eval_split')} ({cfg.get('data', {}).get('n_eval')} prompts). {where}"
                  f"{sum(m['total_seconds'] for _, m in trials) / 60:.0f} run-minutes. Code: {', '.join(commits)}. "
                  f"Per-trial records: `experiments/results/{name}/<trial>/metrics.json`."]
    return "\n".join(lines)


def render(doc: str) -> str:
    def sub(match: re.Match) -> str:
        name = match.group(1)
        path = ROOT / "experiments" / "results" / name / "results.json"
        if (path.parent / "0" / ".hydra").is_dir():
            body = sweep_table(name, path.parent)
        elif not path.is_file():
            body = f"(no results yet: run `python experiments/{name}.py`)"
        elif name == "teacher_probe":
            body = probe_table(json.loads(path.read_text()))
        else:
            body = table(name, json.loads(path.read_text()))
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", sub, doc, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    stale = []
    for doc_path in DOCS:
        doc = doc_path.read_text()
        new = render(doc)
        if new == doc:
            continue
        stale.append(doc_path)
        if not args.check:
            doc_path.write_text(new)
            print(f"wrote {doc_path}")
    if args.check and stale:
        print(f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} not up to date: run python experiments/report.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
