"""Our module against TRL's `SDFTTrainer` on the same work, alternating in one invocation.

Both sides get the same model weights, the same prompts (the chat template applied by the same tokenizer),
the same teacher text (`"{prompt}\\n\\n{solution}"`, TRL's default `teacher_prompt_template` with the
solution as `privileged_context`), a frozen copy of the initial model as teacher, the same loss (full-vocabulary
forward KL(T||S), per-sequence mean then batch mean, no importance weights, no skipped tokens), the same
sampling (temperature 1, no top-k / top-p, one rollout per prompt) and the same lengths: every rollout is
decoded to exactly `--completion-len` tokens (ours: `SamplingConfig(fixed_length=True)`; TRL:
`min_new_tokens`, since TRL trims completions at the first EOS and would otherwise train on fewer tokens).
Neither side clips gradients; both use torch's fused AdamW at the same learning rate (TRL's default
`adamw_torch_fused`; ours `optimizer.fused=null`, which fuses on one device). Precision and gradient checkpointing
are the same on both sides: bf16 mixed precision (what users train in; TRL's `bf16=True`) on a CPU that multiplies
bf16 natively (the check of `lightning_sd.cpu_precision`), fp32 on one that emulates it; `--fp32` / `--bf16` choose,
and the first line printed says which precision ran and why. Gradient checkpointing is on on both sides (TRL's
default) unless `--no-gradient-checkpointing`. In bf16 our side runs its fast path: it
samples from a bf16 copy of the student made once per rollout (`generation.dtype=bf16`) with the decode step
compiled (`generation.compile_decode=true`), and therefore corrects the sampler/trainer mismatch with truncated
importance weights (`loss.is_clip=2`); TRL samples under autocast and needs none. Each of our bf16 runs compiles
the decode step (or loads it from PyTorch's on-disk cache) in its warm-up step, which is not timed. In fp32 our
side decodes with the eager step (the compiled one there gains ~0.15 s of rollout for ~0.3 GiB more peak RSS).
`--autocast-rollouts` runs ours the way TRL does (autocast in every decode step, no weights).
Each side runs with its own shipped settings otherwise: ours with `trainer.retain_heap` (glibc keeps freed
memory for the next step) and the lean decode step, TRL with glibc's default allocator thresholds;
`--no-retain-heap` runs ours with glibc's defaults, `--trl-retain-heap` gives TRL our allocator setting.
`--no-compile-decode` runs ours with the eager decode step. `--optimizer-in-backward` runs ours with each parameter
updated inside backward and its gradient freed at once (`optimizer.in_backward=true`, possible here because
neither side clips), which TRL has no counterpart for: the same updates, with up to one copy of the weights
less at the memory peak.

Each run is a fresh subprocess (peak RSS is per process); the order alternates ours, TRL, TRL, ours, ... so
that both see the same machine state. Medians are over all measured steps of all runs of a side.

Run it with the interpreter that has TRL (`.venv-bench`, see README.md):

    .venv-bench/bin/python experiments/benchmarks/vs_trl.py           # the acceptance configuration
    .venv-bench/bin/python experiments/benchmarks/vs_trl.py --rounds 1 --steps 2

The last line printed is `ratio: <our median step time / TRL's>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


import step as ours

HERE = Path(__file__).resolve().parent

PHASES = ours.PHASES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2, help="runs per side (alternating)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="both sides keep activations (default: both recompute them, TRL's default)")
    p.add_argument("--fp32", action="store_true", help="both sides in fp32")
    p.add_argument("--bf16", action="store_true", help="both sides in bf16 mixed precision (the default where the CPU "
                   "multiplies bf16 natively; elsewhere fp32 is the default: emulated bf16 is several times slower)")
    p.add_argument("--autocast-rollouts", action="store_true",
                   help="bf16: ours samples under autocast like TRL (default: from a bf16 copy, with IS weights)")
    p.add_argument("--no-compile-decode", action="store_true",
                   help="bf16: ours with the eager decode step (generation.compile_decode=false)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="ours with optimizer.in_backward=true (updates inside backward, no full set of gradients)")
    p.add_argument("--no-retain-heap", action="store_true",
                   help="ours without trainer.retain_heap (glibc's default allocator thresholds, as TRL runs)")
    p.add_argument("--trl-retain-heap", action="store_true",
                   help="TRL with the same allocator setting as ours (lightning_sd.retain_freed_memory)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fp32 and args.bf16:
        p.error("--fp32 and --bf16 exclude each other")
    args.auto_precision = not args.bf16 and not args.fp32 and args.device == "cpu"
    if args.auto_precision:  # the acceptance precision this CPU runs well
        from lightning_sd.cpu_precision import native_bf16

        args.fp32 = not native_bf16()
    return args


def precision_note(args: argparse.Namespace) -> str:
    """Which precision this invocation compares in, and why."""
    if not args.auto_precision:
        return f"precision: {'fp32' if args.fp32 else 'bf16 mixed'} (asked for, or the default off the CPU)"
    from lightning_sd.cpu_precision import bf16_slowdown

    if args.fp32:
        return (f"precision: fp32, because this CPU has no native bf16 matmul (a bf16 matmul ran {bf16_slowdown():.1f}x "
                "slower than fp32 here); --bf16 compares in bf16 anyway")
    return "precision: bf16 mixed, because this CPU multiplies bf16 natively; --fp32 compares in fp32"


def _ours_argv(args: argparse.Namespace) -> list[str]:
    keys = ("model", "tokenizer", "dtype", "device", "threads", "batch", "prompt_len", "completion_len", "lr",
            "steps", "warmup", "seed")
    out = []
    for k in keys:
        if getattr(args, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out += ["--precision", "32-true" if args.fp32 else "bf16-mixed"]
    if not args.fp32 and not args.autocast_rollouts:  # our bf16 fast path
        out += ["--generation-dtype", "bf16", "--is-clip", "2.0"]
        out += [] if args.no_compile_decode else ["--compile-decode"]
    out += [] if args.no_gradient_checkpointing else ["--gradient-checkpointing"]
    out += ["--no-retain-heap"] if args.no_retain_heap else []
    out += ["--optimizer-in-backward"] if args.optimizer_in_backward else []
    return out + ["--teacher", "frozen", "--beta", "0.0", "--support", "full", "--reduction", "sequence_mean",
                  "--chunk-size", "none"]


# ---------------------------------------------------------------------------------------------- TRL worker
def _model_path(args: argparse.Namespace, model, tmp: str) -> str:
    """TRL builds its frozen teacher from `config._name_or_path`: give it a folder holding these weights."""
    path = getattr(model.config, "_name_or_path", "")
    if path and os.path.isdir(path):
        return path
    model.save_pretrained(tmp)
    return tmp


def run_trl_worker(args: argparse.Namespace) -> dict:
    """One TRL `SDFTTrainer` run with per-phase timestamps (its methods wrapped, not changed)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from lightning_sd.models import load_model, resolve_dtype

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.trl_retain_heap:
        from lightning_sd.heap import retain_freed_memory

        retain_freed_memory()
    torch.manual_seed(args.seed)
    rates = ours.measure_rates(device)
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed)
    records = ours.benchmark_records(tokenizer, args.batch, args.prompt_len, args.seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["solution"]}
                              for r in records])
    total = args.warmup + args.steps
    tmp = tempfile.mkdtemp(prefix="vs_trl_")
    path = _model_path(args, model, tmp)
    del model
    config = SDFTConfig(
        output_dir=tmp, max_steps=total, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_generations=1, max_completion_length=args.completion_len, max_prompt_length=None,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": args.completion_len},
        distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None,
        num_loss_tokens_to_skip=0, teacher_model_kind="base", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused", max_grad_norm=0.0, seed=args.seed,
        shuffle_dataset=False, use_cpu=device.type == "cpu", bf16=not args.fp32, fp16=False, report_to="none",
        gradient_checkpointing=not args.no_gradient_checkpointing,
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": resolve_dtype(args.dtype)},
    )
    steps: list[dict] = []
    cur: dict = {}
    marks: dict = {}

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            cur.clear()
            marks["start"] = now()

        def on_pre_optimizer_step(self, a, state, control, **kw):
            marks["optimizer"] = now()

        def on_step_end(self, a, state, control, **kw):
            end = now()
            cur["optimizer"] = end - marks["optimizer"]
            cur["step"] = end - marks["start"]
            cur["other"] = cur["step"] - sum(cur.get(k, 0.0) for k in PHASES if k != "other")
            steps.append(dict(cur))

    trainer = SDFTTrainer(model=path, args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Clock()])

    def span(name, fn):
        def wrapped(*a, **kw):
            t0 = now()
            out = fn(*a, **kw)
            cur[name] = cur.get(name, 0.0) + now() - t0
            return out
        return wrapped

    trainer.sample_rollouts = span("generation", trainer.sample_rollouts)
    trainer.teacher_context_builder.build = span("teacher_prompts", trainer.teacher_context_builder.build)
    forward_logits = trainer._forward_logits

    def _forward_logits(*a, **kw):
        name = "student_forward" if torch.is_grad_enabled() else "teacher_forward"
        return span(name, forward_logits)(*a, **kw)

    trainer._forward_logits = _forward_logits
    loss_fn = trainer._compute_self_distillation_loss

    def _loss(*a, **kw):
        out = span("student_forward", loss_fn)(*a, **kw)
        cur["loss"] = float(out)
        return out

    trainer._compute_self_distillation_loss = _loss
    trainer.accelerator.backward = span("backward", trainer.accelerator.backward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    return {
        "steps": steps[args.warmup:],
        "losses": [s.get("loss") for s in steps],
        "rates": vars(rates),
        "peak_rss": ours.peak_rss_bytes(),
        "peak_gpu": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "load": os.getloadavg(),
        "trl": __import__("trl").__version__,
    }


def _run_trl_subprocess(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--out", out]
        for k, v in vars(args).items():
            if k in ("trl_worker", "out", "json", "rounds", "auto_precision") or v is None or v is False:
                continue
            argv += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"TRL worker failed (exit {proc.returncode}): {' '.join(argv)}\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------- report
def _medians(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in (*PHASES, "step")}


# the floor's phases, as sums of the measured phases (the floor counts the student's forward and backward as one)
FLOOR_PHASES = {"generation": ("generation",), "teacher_forward": ("teacher_forward",),
                "student_fwd_bwd": ("student_forward", "backward"), "optimizer": ("optimizer",)}


def phase_floors(mo: dict, mt: dict, floor: dict) -> list[str]:
    """Each phase of the floor against ours and TRL's medians, and what the step would be against the floor if
    the rollout ran at its floor and everything else as measured (what the other phases leave reachable)."""
    lines = [f"{'floor by phase (s)':<20}{'floor':>9}{'ours/fl':>9}{'TRL/fl':>9}"]
    for k, parts in FLOOR_PHASES.items():
        o, t = sum(mo[p] for p in parts), sum(mt[p] for p in parts)
        lines.append(f"{k:<20}{floor[k]:>9.3f}{o / floor[k]:>9.2f}{t / floor[k]:>9.2f}")
    rest = mo["step"] - mo["generation"]
    lines.append(f"ours with the rollout at its floor and the rest as measured: "
                 f"{(rest + floor['generation']) / floor['total']:.2f} x floor")
    return lines


def format_report(ours_runs: list[dict], trl_runs: list[dict]) -> str:
    mo, mt = _medians(ours_runs), _medians(trl_runs)
    first = ours_runs[0]
    c, w = first["config"], first["work"]
    rss_o = max(r["peak_rss"] for r in ours_runs)
    rss_t = max(r["peak_rss"] for r in trl_runs)
    floor = first["floor"]
    loads = [r["load"][0] for r in ours_runs + trl_runs]
    lines = [
        f"model {c['model']}, {first['device_name']}, threads {c['threads']}, torch {first['torch']}, "
        f"TRL {trl_runs[0]['trl']}; load average (1 min) during runs {min(loads):.2f}-{max(loads):.2f}",
        f"batch {w['rows']} x {w['completion']} new tokens, prompt {w['prompt']} / teacher prompt {w['teacher_prompt']} "
        f"tokens, full-vocabulary forward KL, frozen teacher, precision {c['precision']}, gradient checkpointing "
        f"{'on' if c.get('gradient_checkpointing') else 'off'} (both sides); {len(ours_runs)} runs per side x "
        f"{len(first['steps'])} measured steps (after {c['warmup']} warm-up)",
        "",
        f"{'phase (median s)':<20}{'ours':>9}{'TRL':>9}{'ours/TRL':>10}",
    ]
    for k in (*PHASES, "step"):
        ratio = mo[k] / mt[k] if mt[k] > 0 else float("nan")
        lines.append(f"{k:<20}{mo[k]:>9.3f}{mt[k]:>9.3f}{ratio:>10.2f}")
    lines += [
        f"{'peak RSS GiB':<20}{rss_o / 2**30:>9.2f}{rss_t / 2**30:>9.2f}{rss_o / rss_t:>10.2f}",
        f"{'loss (step 1)':<20}{ours_runs[0]['losses'][0]:>9.4f}{trl_runs[0]['losses'][0]:>9.4f}",
        "",
        f"floor of this step ({ours.floor_rates(first)}; ours' rates): {floor['total']:.2f} s; "
        f"ours {mo['step'] / floor['total']:.2f} x floor, TRL {mt['step'] / floor['total']:.2f} x floor",
        f"rollout phase ({ours.floor_rates(first, rollout_only=True)}): floor {floor['generation']:.2f} s; "
        f"ours {mo['generation'] / floor['generation']:.2f} x its floor, TRL {mt['generation'] / floor['generation']:.2f} x",
        *phase_floors(mo, mt, floor),
        f"ratio: {mo['step'] / mt['step']:.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        result = run_trl_worker(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return
    print(precision_note(args), flush=True)
    ours_runs, trl_runs = [], []
    for r in range(args.rounds):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
        for side in order:
            t0 = time.perf_counter()
            if side == "ours":
                ours_runs.append(ours.run_subprocess(_ours_argv(args)))
                res = ours_runs[-1]
            else:
                trl_runs.append(_run_trl_subprocess(args))
                res = trl_runs[-1]
            med = statistics.median(s["step"] for s in res["steps"])
            print(f"round {r + 1}/{args.rounds} {side:>4}: median step {med:.2f} s, peak RSS "
                  f"{res['peak_rss'] / 2**30:.2f} GiB, load {res['load'][0]:.2f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": ours_runs, "trl": trl_runs}, f, indent=1)
    print(format_report(ours_runs, trl_runs))


if __name__ == "__main__":
    main()
