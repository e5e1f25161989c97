"""Shared machinery of the evidence experiments (`knowledge_injection.py`, `self_critique_arithmetic.py`,
`rl_feedback_vs_grpo.py`): compose each arm's training config from `conf/` with Hydra, run every (arm, seed)
in its own process, measure, and write the results folder.

An experiment config (`experiments/conf/<name>.yaml`, Hydra-composed; any key can be overridden on the command
line, e.g. `seeds=[0] parallel=1`) holds:

    name, out_dir (results: JSON, CSV, PNG, one result.json per run), work_dir (run folders: checkpoints, logs),
    seeds, parallel (runs at once, each a separate process; 0 = in this process, one after another),
    threads (torch threads per run), common (overrides of conf/train.yaml for every arm), extra (appended last),
    arms: {name: {train, overrides, seeds (optional: this arm runs only these of `seeds`, e.g. a search
    repeating its best trials)}}, measure: what to measure.

Command line: `python experiments/<name>.py [experiment overrides] [-- train overrides for every arm]`, e.g.
`python experiments/knowledge_injection.py seeds=[0] parallel=0 -- model=tiny trainer.max_steps=2`.

Per run (seed k: `seed=k data.seed=k generation.seed=k`, so the train order, the held-out problems and the
samples all change with the seed, and arms with the same seed see the same problems):

- before training: the student's greedy accuracy and, if `measure.teacher_before`, the teacher's accuracy with
  its privileged context on the same held-out prompts (the gap is what self-distillation can transfer);
- during training: `PeriodicEvaluation` (greedy accuracy every `measure.curve_every` steps, else at the start
  and the end; with `measure.curve_sampled_n` > 0, sampled accuracy: that many samples per prompt at
  `measure.sampled_temperature`, the same sampling seed at every point) against the rollouts and tokens
  generated for training so far;
- after training: greedy accuracy, sampled accuracy (`measure.sampled_n` samples per prompt at
  `measure.sampled_temperature`), mean completion length, for sequences of tasks the accuracy matrix
  (`continual.json`), and if `measure.drift` the per-token KL(trained || base) on general prompts.

Resumable at two levels: a run whose `result.json` exists is skipped; an interrupted run restarts from its
`last.ckpt` (written every `trainer.checkpoint_every_n_steps`; deleted once the run's result is written).
Each `result.json` records the resolved config, seed, git commit, machine and wall time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- configs
def compose_experiment(name: str, overrides: list[str]):
    """The experiment's config `experiments/conf/<name>.yaml` with command-line `overrides`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def compose_train(overrides: list[str]):
    """`conf/train.yaml` with `overrides` (what `python train.py <overrides>` would run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def has_teacher(result: dict) -> bool:
    """Whether the run's loss shows a teacher a privileged context (`LossConfig.needs_teacher`)."""
    from lightning_sd.objectives import LossConfig, with_current_names

    return LossConfig.from_dict(with_current_names(result["config"]["loss"])).needs_teacher


def run_overrides(exp, arm: str, seed: int) -> list[str]:
    arm_cfg = exp.arms[arm]
    return ([*exp.common, *arm_cfg.overrides, *exp.extra] +
            [f"seed={seed}", f"data.seed={seed}", f"generation.seed={seed}"])


def arm_seeds(exp, arm: str) -> list[int]:
    """The seeds `arm` runs: the experiment's, or those of them the arm lists under `seeds`."""
    own = exp.arms[arm].get("seeds")
    return [int(s) for s in exp.seeds if own is None or int(s) in {int(x) for x in own}]


def check_experiment(exp) -> None:
    """Clear errors before anything runs: every arm composes and validates."""
    from lightning_sd.config import validate_config

    if not exp.seeds:
        raise ValueError(f"{exp.name}: seeds is empty; give at least one, e.g. seeds=[0]")
    if not exp.arms:
        raise ValueError(f"{exp.name}: arms is empty")
    for arm in exp.arms:
        own = exp.arms[arm].get("seeds")
        if own is not None and not arm_seeds(exp, arm):
            raise ValueError(f"{exp.name}: arm {arm!r} lists seeds {list(own)}, none of which is in seeds "
                             f"{list(exp.seeds)}; list some of those, or drop the arm's seeds")
        try:
            validate_config(compose_train(run_overrides(exp, arm, exp.seeds[0])))
        except Exception as err:  # name the arm: the config error itself names the key
            raise ValueError(f"{exp.name}: arm {arm!r} does not compose: {err}") from err


# ---------------------------------------------------------------------------------------------- facts
def git_commit() -> str | None:
    from lightning_sd.logging_utils import git_commit as commit_of

    return commit_of(ROOT)


def machine() -> dict:
    from lightning_sd.logging_utils import machine as facts

    return facts()


def pooled(parts: list[dict]) -> dict:
    """One evaluation over several disjoint prompt sets, from each set's `EvalResult.as_dict()` (weighted by n)."""
    n = sum(p["n"] for p in parts)

    def mean(key: str) -> float | None:
        vals = [(p[key], p["n"]) for p in parts if p[key] is not None]
        return sum(v * k for v, k in vals) / sum(k for _, k in vals) if vals and n else None

    student, teacher = mean("student_accuracy"), mean("teacher_accuracy")
    return {"student_accuracy": student, "teacher_accuracy": teacher,
            "gap": None if teacher is None else teacher - student,
            "mean_completion_tokens": mean("mean_completion_tokens"), "n": n,
            "samples": [x for p in parts for x in p["samples"]]}


# ---------------------------------------------------------------------------------------------- one run
def before_cache_path(run_dir: str, cfg, with_teacher: bool) -> str:
    """Where the pre-training evaluation of runs that would measure the same thing is shared: a hash of the
    model, data (seed included), evaluation and teacher-context settings, under `<work_dir>/_before/`."""
    import hashlib

    from omegaconf import OmegaConf

    what = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "eval")}
    what.update(seed=int(cfg.seed), with_teacher=with_teacher,
                context=[cfg.loss.template, cfg.loss.reason_first, cfg.loss.feedback] if with_teacher else None)
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return str(Path(run_dir).parents[1] / "_before" / f"{key}.json")


def run_one(spec: dict) -> dict:
    """Train and measure one (arm, seed); write `<result_dir>/result.json` and return it."""
    import torch
    from omegaconf import OmegaConf

    from lightning_sd.build import build_logger, prepare_run, probes_split
    from lightning_sd.callbacks import PeriodicEvaluation
    from lightning_sd.evaluation import GENERAL_PROMPTS, evaluate, evaluate_run, kl_from_reference
    from lightning_sd.models import load_model
    from lightning_sd.sampling import SamplingConfig

    torch.set_num_threads(int(spec["threads"]))
    t_start = time.perf_counter()
    run_dir, result_dir, measure = spec["run_dir"], spec["result_dir"], spec["measure"]
    os.makedirs(run_dir, exist_ok=True)
    os.makedirs(result_dir, exist_ok=True)
    cfg = compose_train(spec["overrides"])
    run = prepare_run(cfg, run_dir, verbose_seed=False)
    module, dm = run.module, run.datamodule
    result: dict[str, Any] = {
        "experiment": spec["experiment"], "arm": spec["arm"], "seed": spec["seed"], "train": spec["train"],
        "overrides": spec["overrides"], "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(), "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def eval_batches():
        return dm.val_dataloader()

    # before training (kept in the run folder so that a resumed run does not measure it again, and shared by the
    # arms whose evaluation is the same: same model, data, evaluation and teacher context)
    with_teacher = bool(measure.get("teacher_before")) and bool(getattr(module, "needs_teacher", True))
    shared_path = before_cache_path(run_dir, cfg, with_teacher)
    before_path = os.path.join(run_dir, "before.json")
    if not os.path.isfile(before_path) and os.path.isfile(shared_path):
        shutil.copy(shared_path, before_path)
    if os.path.isfile(before_path):
        before = json.load(open(before_path))
    else:
        t0 = time.perf_counter()
        # arms without a teacher context (sft, grpo) have no teacher-with-context accuracy
        if hasattr(dm, "task_labels"):  # a sequence of tasks: student and teacher-with-context per task and probe
            by_task = {label: evaluate(module, dm.eval_dataloader(label), with_teacher=with_teacher,
                                       keep_samples=2).as_dict() for label in dm.task_labels + dm.probe_labels}
            before = {**pooled(list(by_task.values())), "by_task": by_task}
            before["seconds"] = time.perf_counter() - t0
        else:
            before = evaluate_run(module, dm, with_teacher=with_teacher, keep_samples=4)
        json.dump(before, open(before_path, "w"), indent=2)
        os.makedirs(os.path.dirname(shared_path), exist_ok=True)
        shutil.copy(before_path, shared_path + f".tmp-{os.getpid()}")
        os.replace(shared_path + f".tmp-{os.getpid()}", shared_path)
    result["before"] = before

    curve = None
    if spec["train"]:
        steps = int(cfg.trainer.max_steps)
        curve_n = int(measure.get("curve_sampled_n") or 0)
        curve_sampling = None if not curve_n else SamplingConfig(
            n=curve_n, do_sample=True, temperature=float(measure.get("sampled_temperature", 1.0)),
            max_new_tokens=module.eval_sampling.max_new_tokens, seed=2000 + int(spec["seed"]))
        curve = PeriodicEvaluation(int(measure.get("curve_every") or steps), eval_batches, curve_sampling,
                                   probes=dm if measure.get("curve_probes") and dm.probe_labels else None)
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        ckpt = last if os.path.isfile(last) else None
        if ckpt is None and curve_sampling is None:  # the greedy step-0 point is the "before" evaluation
            curve.points = [{"step": 0, "samples": 0, "tokens": 0, "train_seconds": 0.0,
                             "accuracy": before["student_accuracy"],
                             "mean_completion_tokens": before["mean_completion_tokens"], "n": before["n"]}]
            if curve.probes is not None:
                curve.points[0]["probes"] = {k: v["student_accuracy"] for k, v in (before.get("probes") or {}).items()}
        logger = build_logger(run.typed["logger"], run_dir, resume=ckpt is not None)
        trainer = run.trainer(logger=logger, callbacks=[curve])
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        result["train_seconds"] = time.perf_counter() - t0
        result["resumed_from"] = ckpt
        result["train_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        result["curve"] = curve.points
        result["generated_samples"], result["generated_tokens"] = curve.samples, curve.tokens
        cont = os.path.join(run_dir, "continual.json")
        if os.path.isfile(cont):
            result["continual"] = json.load(open(cont))
            shutil.copy(os.path.join(run_dir, "continual.png"), os.path.join(result_dir, "continual.png"))
    else:
        result["train_seconds"], result["generated_samples"], result["generated_tokens"] = 0.0, 0, 0

    n = int(measure.get("sampled_n") or 0)
    result["after"] = evaluate_run(module, dm, with_teacher=False, keep_samples=4, samples=n,
                                   temperature=float(measure.get("sampled_temperature", 1.0)), seed=int(spec["seed"]),
                                   probes=not hasattr(dm, "task_labels"))  # a sequence's are in its accuracy matrix
    if n:
        s = result["after"].pop("sampled")
        result["after_sampled"] = {"accuracy": s["student_accuracy"], "n_samples": s["n"],
                                   "mean_completion_tokens": s["mean_completion_tokens"],
                                   "temperature": s["temperature"]}
    if measure.get("drift"):
        from dataclasses import asdict

        m = run.typed["model"]
        base, _ = load_model(**{k: v for k, v in asdict(m).items() if k not in ("gradient_checkpointing", "lora")})
        base.to(next(module.student.parameters()).device)
        split = probes_split(run.typed["data"])  # the general prompts' validation part in a search, else the test's
        result["drift"] = kl_from_reference(module.student, base, module.tokenizer, GENERAL_PROMPTS[split],
                                            max_new_tokens=int(measure.get("drift_max_new_tokens") or 48),
                                            system_prompt=module.prompts.system_prompt)
        result["drift"]["prompts"] = split
        del base
    from lightning_sd.logging_utils import train_history

    result["history"] = train_history(run_dir)
    result["seconds"] = time.perf_counter() - t_start
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(result_dir, exist_ok=True)  # (again: a long run's folder may have been cleaned up meanwhile)
    tmp = os.path.join(result_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, os.path.join(result_dir, "result.json"))
    if not spec.get("keep_checkpoints"):
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return result


def backfill_history(specs: list[dict]) -> None:
    """Results written before `history` was recorded get it from their run folder's CSV, if still there."""
    from lightning_sd.logging_utils import train_history

    for spec in specs:
        path = os.path.join(spec["result_dir"], "result.json")
        if not os.path.isfile(path):
            continue
        res = json.load(open(path))
        if "history" in res or not res.get("train") or not os.path.isdir(spec["run_dir"]):
            continue
        res["history"] = train_history(spec["run_dir"])
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=2, default=str)
        os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------- all runs
def plan(exp) -> list[dict]:
    from omegaconf import OmegaConf

    out_dir, work_dir = Path(exp.out_dir), Path(exp.work_dir)
    specs = []
    for seed in exp.seeds:  # seed-major: a partial result already has every arm of the first seeds
        for arm in exp.arms:
            if int(seed) not in arm_seeds(exp, arm):
                continue
            specs.append({
                "experiment": exp.name, "arm": arm, "seed": int(seed), "train": bool(exp.arms[arm].train),
                "overrides": run_overrides(exp, arm, int(seed)), "threads": int(exp.threads),
                "run_dir": str(work_dir / arm / f"seed{seed}"), "result_dir": str(out_dir / "runs" / arm / f"seed{seed}"),
                "measure": OmegaConf.to_container(exp.measure, resolve=True),
                "keep_checkpoints": bool(exp.get("keep_checkpoints", False))})
    return specs


def _done(spec: dict) -> bool:
    return os.path.isfile(os.path.join(spec["result_dir"], "result.json"))


def run_all(exp) -> list[dict]:
    """Run every (arm, seed) that has no result yet, `exp.parallel` at a time; return all results."""
    specs = plan(exp)
    todo = [s for s in specs if not _done(s)]
    total = len(specs)
    print(f"[{exp.name}] {total} runs ({len(exp.arms)} arms, seeds {list(exp.seeds)}), {total - len(todo)} already "
          f"done; results in {exp.out_dir}", flush=True)
    t_all = time.perf_counter()
    finished = total - len(todo)
    if int(exp.parallel) <= 0:
        for spec in todo:
            res = run_one(spec)
            finished += 1
            print(_progress_line(exp.name, finished, total, spec, res, t_all), flush=True)
    else:
        running: list[tuple[dict, subprocess.Popen, Any]] = []
        queue = list(todo)
        failed = []
        while queue or running:
            while queue and len(running) < int(exp.parallel):
                spec = queue.pop(0)
                os.makedirs(spec["run_dir"], exist_ok=True)
                spec_path = os.path.join(spec["run_dir"], "spec.json")
                json.dump(spec, open(spec_path, "w"), indent=2)
                log = open(os.path.join(spec["run_dir"], "log.txt"), "a")
                env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
                proc = subprocess.Popen([sys.executable, __file__, "--run-one", spec_path], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running.append((spec, proc, log))
            time.sleep(1.0)
            for item in list(running):
                spec, proc, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                finished += 1
                if proc.returncode != 0 or not _done(spec):
                    failed.append(spec)
                    print(f"[{exp.name}] run {spec['arm']} seed {spec['seed']} FAILED (exit {proc.returncode}); "
                          f"log: {os.path.join(spec['run_dir'], 'log.txt')}", flush=True)
                    continue
                res = json.load(open(os.path.join(spec["result_dir"], "result.json")))
                print(_progress_line(exp.name, finished, total, spec, res, t_all), flush=True)
        if failed:
            raise RuntimeError(f"{exp.name}: {len(failed)} run(s) failed: " +
                               ", ".join(f"{s['arm']}/seed{s['seed']}" for s in failed) +
                               "; see their log.txt; rerun the same command to retry (finished runs are kept)")
    backfill_history(specs)
    return [json.load(open(os.path.join(s["result_dir"], "result.json"))) for s in specs]


def _progress_line(name: str, k: int, total: int, spec: dict, res: dict, t_all: float) -> str:
    return (f"[{name}] {k}/{total} {spec['arm']} seed {spec['seed']}: accuracy {res['before']['student_accuracy']:.3f}"
            f" -> {res['after']['student_accuracy']:.3f} in {res['seconds']:.0f} s "
            f"(elapsed {time.perf_counter() - t_all:.0f} s)")


# ---------------------------------------------------------------------------------------------- summaries
def mean_spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation, min, max and n over the non-missing values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(exp, results: list[dict], row: Callable[[dict], dict]) -> dict:
    """Per-run rows (`row(result)`: flat metrics) and, per arm and metric, mean and spread over seeds."""
    rows = [{"arm": r["arm"], "seed": r["seed"], **row(r)} for r in results]
    arms: dict[str, dict] = {}
    for arm in exp.arms:
        mine = [x for x in rows if x["arm"] == arm]
        keys = [k for k in (mine[0] if mine else {}) if k not in ("arm", "seed")]
        arms[arm] = {k: mean_spread([x.get(k) for x in mine]) for k in keys}
    return {"rows": rows, "arms": arms}


def write_results(exp, results: list[dict], summary: dict, wall_seconds: float) -> Path:
    """`results.json` (experiment config, every run's result, the summary), `results.csv` (one row per run)
    and `summary.md` (mean +- std per arm) in `exp.out_dir`."""
    import csv

    from omegaconf import OmegaConf

    out = Path(exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": OmegaConf.to_container(exp, resolve=True), "git_commit": git_commit(),
               "machine": machine(), "wall_seconds_this_invocation": wall_seconds,
               "run_seconds_total": sum(r.get("seconds", 0.0) for r in results),
               "summary": summary["arms"], "rows": summary["rows"], "runs": results}
    with open(out / "results.json", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    keys = list(dict.fromkeys(k for r in summary["rows"] for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(summary["rows"])
    lines = ["| arm | metric | mean | std | min | max | n |", "|---|---|---|---|---|---|---|"]
    for arm, metrics in summary["arms"].items():
        for k, s in metrics.items():
            if s["n"]:
                lines.append(f"| {arm} | {k} | {s['mean']:.4g} | {s['std']:.3g} | {s['min']:.4g} | {s['max']:.4g} | "
                             f"{s['n']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return out


def bar_panel(ax, summary: dict, arms: list[str], metrics: list[tuple[str, str]], ylabel: str) -> None:
    """Grouped bars (mean over seeds) with every seed as a dot and a min-max whisker."""
    import numpy as np

    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(metrics))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2"]
    for i, arm in enumerate(arms):
        means = [summary["arms"][arm].get(key, {}).get("mean") for key, _ in metrics]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [m if m is not None else 0.0 for m in means], width * 0.9, label=arm, color=colors[i % 5],
               alpha=0.85)
        for j, (key, _) in enumerate(metrics):
            vals = [r.get(key) for r in summary["rows"] if r["arm"] == arm and r.get(key) is not None]
            if vals:
                ax.scatter([pos[j]] * len(vals), vals, color="black", s=10, zorder=3)
                ax.plot([pos[j], pos[j]], [min(vals), max(vals)], color="black", lw=1, zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([label for _, label in metrics], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def save_figure(fig, exp, out: Path, note: str) -> None:
    """Title the figure with the experiment and its seeds, save it as `<out>/<name>.png`, close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{exp.name}: {note}; seeds {list(exp.seeds)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{exp.name}.png", dpi=110)
    plt.close(fig)


def main(name: str, row: Callable[[dict], dict], plot: Callable[[Any, dict, list[dict], Path], None],
         argv: list[str] | None = None) -> dict:
    """The body of each experiment script: compose, check, run what is missing, summarize, plot."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_overrides: list[str] = []
    if "--" in argv:  # `<experiment overrides> -- <train overrides for every arm>`
        cut = argv.index("--")
        argv, train_overrides = argv[:cut], argv[cut + 1:]
    exp = compose_experiment(name, argv)
    if train_overrides:
        from omegaconf import open_dict

        with open_dict(exp):
            exp.extra = [*exp.extra, *train_overrides]
    check_experiment(exp)
    t0 = time.perf_counter()
    results = run_all(exp)
    summary = summarize(exp, results, row)
    out = write_results(exp, results, summary, time.perf_counter() - t0)
    import matplotlib

    matplotlib.use("Agg")
    plot(exp, summary, results, out)
    print((out / "summary.md").read_text())
    print(f"[{exp.name}] done in {time.perf_counter() - t0:.0f} s: {out}/results.json, results.csv, *.png", flush=True)
    return summary


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--run-one":
    run_one(json.load(open(sys.argv[2])))
