"""The training step with each sampler, side by side in one invocation: vLLM's engine (`generation.backend=vllm`,
its weight reload each step included), the built-in sampler with the lean decode step (the default), and the
built-in sampler with the model's own forward (`generation.lean_decode=false`). Each (grid point, sampler) is one
`step.py` worker in a fresh process, so its peak RSS is its own; the samplers alternate within each grid point.
The engine starts in the warm-up step, which is not measured; its start-up time is reported apart. Every sampler
runs with the importance-weight correction (`loss.is_clip=2`), which vLLM rollouts require, so the steps do the
same work apart from the rollout.

Needs vLLM: run it in the environment `make vllm` builds.

    .venv-vllm/bin/python experiments/benchmarks/step_backends.py                        # SmolLM2-135M, fp32
    .venv-vllm/bin/python experiments/benchmarks/step_backends.py --batches 4 --lengths 32 --steps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import step

SAMPLERS = {"vllm": ["--set", "generation.backend=vllm"], "lean decode": [], "model forward": ["--no-lean-decode"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,16")
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--steps", type=int, default=2, help="measured steps per worker (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma list of: " + ", ".join(SAMPLERS))
    p.add_argument("--extra", default="", help="more step.py flags for every worker, e.g. '--model tiny'")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",")]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            for name in samplers:
                flags = ["--batch", str(batch), "--completion-len", str(length), "--steps", str(args.steps),
                         "--warmup", "1", "--threads", str(args.threads), "--temperature", "0.7", "--is-clip", "2",
                         *args.extra.split(), *SAMPLERS[name]]
                result = step.run_subprocess(step.worker_argv(step.parse_args(flags), None))
                med = step.summarize(result)["median"]
                rows.append({"batch": batch, "length": length, "sampler": name, "rollout_s": med["generation"],
                             "step_s": med["step"], "rest_s": med["step"] - med["generation"],
                             "peak_rss_gib": result["peak_rss"] / 2**30, "engine_start_s": result["engine_start_s"],
                             "phases_s": med, "all_step_s": [s["step"] for s in result["steps"]],
                             "load": result["load"],
                             "device": result["device_name"]})
                r = rows[-1]
                print(f"batch {batch} x {length}, {name}: rollout {r['rollout_s']:.2f} s, step {r['step_s']:.2f} s, "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    print(format_table(rows))
    if args.out:
        from lightning_sd.logging_utils import git_commit, machine

        commit = git_commit(step.ROOT)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "steps": args.steps, "threads": args.threads, "commit": commit,
                       "machine": machine(), "command": "step_backends.py " + " ".join(argv or sys.argv[1:])}, f,
                      indent=2)
    return {"rows": rows}


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per (grid point, sampler), its step against the lean decode's step at the same point."""
    lines = ["| batch x length | sampler | rollout s | rest of the step s | step s | step vs lean decode | "
             "peak RSS GiB | engine start s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lean = next((x for x in rows if (x["batch"], x["length"], x["sampler"]) == (r["batch"], r["length"],
                                                                                   "lean decode")), None)
        ratio = f"{r['step_s'] / lean['step_s']:.2f}x" if lean else ""
        start = f"{r['engine_start_s']:.1f}" if r["engine_start_s"] is not None else ""
        lines.append(f"| {r['batch']} x {r['length']} | {r['sampler']} | {r['rollout_s']:.2f} | {r['rest_s']:.2f} | "
                     f"{r['step_s']:.2f} | {ratio} | {r['peak_rss_gib']:.2f} | {start} |")
    loads = [r["load"][0] for r in rows]
    lines.append(f"\nMedian over {len(rows[0]['all_step_s'])} measured steps per worker; {rows[0]['device']}; "
                 f"load {min(loads):.2f}-{max(loads):.2f} ({statistics.median(loads):.2f} median).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
