"""How a step's cost grows with the work: completion length x batch x precision, ours and TRL side by side.

For every point of the grid (`--lengths` x `--batches` x `--precisions`) this runs one fresh process of our
module (`step.py`'s worker) and one of TRL's `SDFTTrainer` (`vs_trl.py`'s worker) on the same work as
`vs_trl.py` (frozen teacher, full-vocabulary forward KL, every rollout decoded to exactly the completion length,
gradient checkpointing on), ours first then TRL, and records median step time, peak memory and the floor of
the step (`floor.py`: FLOPs and bytes per phase at this machine's measured rates, at the precision of the point:
bf16 rates for the bf16 points, fp32 rates for the fp32 ones). TRL is skipped above
`--trl-max-tokens` generated tokens per step (its runs dominate the time; `0` = never skip).

    .venv-bench/bin/python experiments/benchmarks/scaling.py                   # the CPU grid (long)
    .venv-bench/bin/python experiments/benchmarks/scaling.py --lengths 64,256 --batches 1,8 --precisions bf16
    .venv-bench/bin/python experiments/benchmarks/scaling.py --device cuda --lengths 64,256,1024 --batches 1,8,32

Writes `--json` (every run's full result) and `--plot` (step time against generated tokens per step, log-log,
with the floor), and prints one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


import step as ours
import vs_trl

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="64,256,1024", help="completion lengths (comma list)")
    p.add_argument("--batches", default="1,8,32", help="prompts per step (comma list)")
    p.add_argument("--precisions", default="bf16,fp32", help="bf16 (bf16-mixed) and/or fp32 (comma list)")
    p.add_argument("--steps", type=int, default=1, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--trl-max-tokens", type=int, default=2048,
                   help="skip TRL above this many generated tokens per step (0: never skip)")
    p.add_argument("--no-trl", action="store_true", help="ours only (no TRL installed)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def point_args(args: argparse.Namespace, batch: int, length: int, precision: str) -> argparse.Namespace:
    """`vs_trl.py`'s arguments for one point of the grid."""
    argv = ["--model", args.model, "--device", args.device, "--threads", str(args.threads), "--batch", str(batch),
            "--completion-len", str(length), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if precision not in ("bf16", "fp32"):
        raise SystemExit(f"--precisions: {precision!r} is not bf16 or fp32")
    return vs_trl.parse_args(argv + (["--fp32"] if precision == "fp32" else []))


def side(result: dict) -> dict:
    """What the table and the plot use from one run."""
    med = statistics.median(s["step"] for s in result["steps"])
    gen = statistics.median(s.get("generation", 0.0) for s in result["steps"])
    return {"step_s": med, "generation_s": gen, "peak_rss": result["peak_rss"], "peak_gpu": result.get("peak_gpu"),
            "load": result["load"][0]}


def run_point(args: argparse.Namespace, batch: int, length: int, precision: str) -> dict:
    a = point_args(args, batch, length, precision)
    row: dict = {"batch": batch, "length": length, "precision": precision, "tokens": batch * length}
    t0 = time.perf_counter()
    mine = ours.run_subprocess(vs_trl._ours_argv(a))
    row["ours"], row["floor_s"] = side(mine), mine["floor"]["total"]
    row["floor"], row["device_name"], row["torch"] = mine["floor"], mine["device_name"], mine["torch"]
    row["floor_rates"] = ours.floor_rates(mine)
    skip = args.no_trl or (args.trl_max_tokens and batch * length > args.trl_max_tokens)
    row["trl"] = None if skip else side(vs_trl._run_trl_subprocess(a))
    row["seconds"] = time.perf_counter() - t0
    return row


def memory_gib(s: dict) -> float:
    return (s["peak_gpu"] if s.get("peak_gpu") else s["peak_rss"]) / 2**30


def format_table(rows: list[dict]) -> str:
    head = (f"{'precision':<10}{'batch':>6}{'length':>7}{'ours s':>9}{'TRL s':>9}{'ours/TRL':>9}{'floor s':>9}"
            f"{'ours/floor':>11}{'gen s':>8}{'mem ours':>10}{'mem TRL':>9}")
    lines = [head]
    for r in rows:
        o, t = r["ours"], r["trl"]
        lines.append(
            f"{r['precision']:<10}{r['batch']:>6}{r['length']:>7}{o['step_s']:>9.2f}"
            f"{(format(t['step_s'], '.2f') if t else '-'):>9}"
            f"{(format(o['step_s'] / t['step_s'], '.2f') if t else '-'):>9}{r['floor_s']:>9.2f}"
            f"{o['step_s'] / r['floor_s']:>11.2f}{o['generation_s']:>8.2f}{memory_gib(o):>10.2f}"
            f"{(format(memory_gib(t), '.2f') if t else '-'):>9}")
    mem = "peak GPU memory" if rows and rows[0]["ours"].get("peak_gpu") else "peak RSS"
    lines.append(f"(seconds: median step; mem: {mem}, GiB; floor: the step's FLOP/byte floor at this machine's rates)")
    for prec in dict.fromkeys(r["precision"] for r in rows):
        used = dict.fromkeys(r["floor_rates"] for r in rows if r["precision"] == prec and r.get("floor_rates"))
        lines += [f"floor of {prec}: {u}" for u in used]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"bf16": "-", "fp32": "--"}
    colors = ["#4C72B0", "#55A868", "#8172B2", "#937860"]
    # one line per (precision, batch) across completion lengths: ours solid markers, TRL squares, floor thin grey
    for prec in sorted({r["precision"] for r in rows}):
        for i, b in enumerate(sorted({r["batch"] for r in rows})):
            mine = sorted((r for r in rows if r["precision"] == prec and r["batch"] == b), key=lambda r: r["length"])
            if not mine:
                continue
            xs, ls = [r["tokens"] for r in mine], styles.get(prec, "-")
            ax.plot(xs, [r["ours"]["step_s"] for r in mine], ls, marker="o", color=colors[i % len(colors)],
                    label=f"ours, {prec}, batch {b}")
            ax.plot(xs, [r["floor_s"] for r in mine], ls, color="#999999", lw=1,
                    label="floor" if i == 0 and prec == sorted({r["precision"] for r in rows})[0] else None)
            trl = [r for r in mine if r["trl"]]
            if trl:
                ax.plot([r["tokens"] for r in trl], [r["trl"]["step_s"] for r in trl], ls, marker="s",
                        color="#DD8452", alpha=0.5 + 0.5 * (i == 0), label=f"TRL, {prec}, batch {b}")
            for r in mine:
                ax.annotate(f"{r['batch']}x{r['length']}", (r["tokens"], r["ours"]["step_s"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("generated tokens per step (batch x completion length)")
    ax.set_ylabel("median step time, s")
    device = rows[0]["device_name"] if rows else ""
    ax.set_title(f"Step time against work: {device}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for precision in args.precisions.split(","):
        for length in ints(args.lengths):
            for batch in ints(args.batches):
                row = run_point(args, batch, length, precision)
                rows.append(row)
                t = row["trl"]
                print(f"{precision} batch {batch} x {length}: ours {row['ours']['step_s']:.2f} s"
                      f"{(', TRL ' + format(t['step_s'], '.2f') + ' s') if t else ''}, floor {row['floor_s']:.2f} s, "
                      f"load {row['ours']['load']:.2f} ({row['seconds']:.0f} s); floor at {row['floor_rates']}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(format_table(rows))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
