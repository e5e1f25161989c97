"""The default run, measured as a user runs it: `python train.py` (nothing else overridden) once per seed, one
after another in a fresh process each, on the held-out test split, with the wall time of the whole command.

    python experiments/default_run.py                       # seeds 0, 1, 2
    python experiments/default_run.py --seeds 0 -- model=tiny trainer.max_steps=2    # a smoke run

Seed k sets `seed=k data.seed=k generation.seed=k` (training order, held-out problems and samples all change).
Writes experiments/results/default_run/: runs/seed<k>/result.json (metrics.json of the run, the command, its
wall time, the machine and its load, the commit) and results.json / results.csv / summary.md (mean, spread and
every seed; the table in docs/default_run.md is generated from it by experiments/report.py). A seed whose
result exists is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path


import evidence

ROOT = Path(__file__).resolve().parents[1]
NAME = "default_run"


def row(result: dict) -> dict:
    metrics = result["metrics"]
    before, after = metrics["eval_before"], metrics["eval_after"]
    diagnostics = metrics.get("train_diagnostics") or {}
    known_before = ((before.get("probes") or {}).get("known_facts") or {}).get("student_accuracy")
    known_after = ((after.get("probes") or {}).get("known_facts") or {}).get("student_accuracy")
    own = [h["on_policy"] for h in metrics.get("history") or [] if "on_policy" in h]  # 1: a step on own samples
    return {"test_before": before["student_accuracy"], "teacher_with_context": before["teacher_accuracy"],
            "known_before": known_before, "known_after": known_after,
            "steps_on_own_samples": sum(own) / len(own) if own else None,
            "test_after": after["student_accuracy"], "gain": after["student_accuracy"] - before["student_accuracy"],
            "answer_tokens_after": after["mean_completion_tokens"], "mean_truncated": diagnostics.get("truncated"),
            "mean_teacher_advantage": diagnostics.get("teacher_advantage"), "run_seconds": result["wall_seconds"]}


def run_seed(seed: int, extra: list[str], out_dir: Path, work_dir: Path, threads: int | None) -> dict:
    run_dir = work_dir / f"seed{seed}"
    cmd = [sys.executable, "train.py", f"seed={seed}", f"data.seed={seed}", f"generation.seed={seed}",
           f"hydra.run.dir={run_dir}", *extra]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (run_dir / "console.txt").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}: `{' '.join(cmd)}` failed ({proc.returncode}); see {run_dir}/console.txt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {"experiment": NAME, "arm": "default", "seed": seed, "command": " ".join(cmd[1:]), "wall_seconds": wall,
              "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "metrics": {k: v for k, v in metrics.items() if k != "config"}, "config": metrics["config"],
              "git_commit": evidence.git_commit(), "machine": {**evidence.machine(), "load_avg": load_before,
                                                              "load_avg_end": os.getloadavg()}}
    path = out_dir / "runs" / "default" / f"seed{seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-dir", default=str(ROOT / "experiments" / "results" / NAME))
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "experiments" / NAME))
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: torch's)")
    args = p.parse_args(argv)
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    results = []
    for seed in args.seeds:
        path = out_dir / "runs" / "default" / f"seed{seed}" / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            print(f"[{NAME}] seed {seed}: already done", flush=True)
            continue
        res = run_seed(seed, extra, out_dir, work_dir, args.threads)
        r = row(res)
        print(f"[{NAME}] seed {seed}: test accuracy {r['test_before']:.3f} -> {r['test_after']:.3f} "
              f"(teacher with context {r['teacher_with_context']:.3f}) in {res['wall_seconds']:.0f} s, "
              f"load {res['machine']['load_avg'][0]:.2f}", flush=True)
        results.append(res)
    rows = [{"arm": "default", "seed": r["seed"], **row(r)} for r in results]
    keys = [k for k in rows[0] if k not in ("arm", "seed")]
    summary = {"default": {k: evidence.mean_spread([x[k] for x in rows]) for k in keys}}
    out = {"experiment": {"name": NAME, "parallel": 1, "threads": args.threads or "default", "seeds": args.seeds},
           "summary": summary, "rows": rows, "runs": results,
           "run_seconds_total": sum(r["wall_seconds"] for r in results)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    main()
