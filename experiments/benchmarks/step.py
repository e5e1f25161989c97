"""Time on-policy self-distillation steps of `SelfDistillationModule` and compare them with the floor.

Each configuration runs in a fresh subprocess (peak RSS only grows, so processes are never shared): it
measures the machine's fp32 and bf16 matmul and copy rates (`floor.measure_rates`), loads the model, builds a fixed
batch of prompts, and runs `--warmup + --steps` steps through a real Lightning `Trainer` with the
`OnPolicyGeneration` callback, timing each phase:

| phase | from -> to |
|---|---|
| generation | batch start -> the sampler's rollout is in the batch (decode + detokenize) |
| teacher_prompts | `build_teacher_inputs` (teacher texts, chat template, tokenization) |
| teacher_forward | `teacher_forward` (no grad) |
| student_forward | `student_forward` + `compute_loss` |
| backward | `on_before_backward` -> `on_after_backward` |
| optimizer | `on_after_backward` -> batch end (gradient normalization, AdamW, EMA update) |
| other | the rest of the step (Lightning, logging) |

Work is fixed so that runs are comparable: the same prompts every step, completions decoded to exactly
`--completion-len` tokens (`SamplingConfig(fixed_length=True)`), fixed seeds. On CUDA the device is
synchronized only at phase boundaries.

    python experiments/benchmarks/step.py                                   # SmolLM2, 8 x 64, forward KL
    python experiments/benchmarks/step.py --batch 4 --completion-len 1024 --chunk-size none,512 --steps 1
    python experiments/benchmarks/step.py --model tiny --steps 2 --warmup 0  # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


from floor import MachineRates, ModelShape, Precision, StepWork, measure_rates, step_floor

HERE = Path(__file__).resolve().parent

PHASES = ("generation", "teacher_prompts", "teacher_forward", "student_forward", "backward", "optimizer", "other")
# the teacher sees the prompt, a blank line and the reference solution: the same text as TRL's SDFT default
# `teacher_prompt_template="{prompt}\n\n{privileged_context}"` with `privileged_context = solution`
TEACHER_TEMPLATE = "{prompt}\n\n{solution}"
FILLER = "Read the problem carefully and think before you answer. "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="load_model name: smollm2_135m | tiny | hf")
    p.add_argument("--name-or-path", default=None, help="for --model hf")
    p.add_argument("--tokenizer", default=None, help="for --model tiny: byte (default) | smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on GPU")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the student's activations in backward (less memory, ~one more forward)")
    p.add_argument("--batch", type=int, default=8, help="prompts per step (one rollout each)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="exact student prompt length in tokens (chat template included); default: the task's prompts")
    p.add_argument("--completion-len", type=int, default=64, help="new tokens per rollout (always decoded in full)")
    p.add_argument("--rollouts", default="sample", choices=("sample", "random"),
                   help="sample: OnPolicyGeneration (default); random: uniform random completion tokens, no decoding "
                        "(for training-side memory runs: the step is the same, only faster to set up)")
    p.add_argument("--teacher", default="frozen", help="live | frozen | ema | trust_region")
    p.add_argument("--teacher-rate", type=float, default=0.05, help="EMA rate (teacher=ema)")
    p.add_argument("--beta", type=float, default=0.0, help="0 forward KL(T||S), 1 reverse KL(S||T), else JSD")
    p.add_argument("--support", default="full", help="full | topk | sampled")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--reduction", default="sequence_mean", help="token_mean | sequence_mean | sum")
    p.add_argument("--chunk-size", default="none",
                   help="loss.chunk_size; comma list to compare configurations, e.g. none,512")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--generation-dtype", default=None,
                   help="generation.dtype: sample from a copy of the student in this dtype (bf16 | fp16 | fp32)")
    p.add_argument("--is-clip", type=float, default=None, help="loss.is_clip (truncated importance weights)")
    p.add_argument("--no-share-prefill", action="store_true", help="generation.share_prefill=false")
    p.add_argument("--no-lean-decode", action="store_true", help="generation.lean_decode=false")
    p.add_argument("--compile-decode", action="store_true", help="generation.compile_decode=true")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="optimizer.in_backward=true: each parameter updated inside backward, its gradient freed")
    p.add_argument("--no-retain-heap", action="store_true",
                   help="trainer.retain_heap=false: glibc's default allocator thresholds")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocations, caches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and "," in args.chunk_size:
        p.error("a worker runs one configuration: give one --chunk-size")
    return args


def chunk_sizes(spec: str) -> list[int | None]:
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        out.append(None if item in ("", "none", "null", "0") else int(item))
    return out


# ---------------------------------------------------------------------------------------------- data
def fit_prompt(tokenizer, text: str, length: int) -> str:
    """`text` with a filler prefix (or its beginning cut) so that the chat-formatted prompt is exactly `length`
    tokens. Raises ValueError when no text reaches that length exactly (e.g. shorter than the chat template)."""
    from lightning_sd.data.prompts import format_prompt

    def count(t: str) -> int:
        return len(tokenizer(format_prompt(tokenizer, t), add_special_tokens=False)["input_ids"])

    body = tokenizer(FILLER * (length // 4 + 2) + text, add_special_tokens=False)["input_ids"]
    overhead = count(text) - len(tokenizer(text, add_special_tokens=False)["input_ids"])
    guess = max(1, min(len(body), length - overhead))
    # token counts of decoded text can shift by one at the seam: search outward from the guess
    for keep in sorted(range(max(1, guess - 8), min(len(body), guess + 8) + 1), key=lambda k: abs(k - guess)):
        candidate = tokenizer.decode(body[-keep:])
        if count(candidate) == length:
            return candidate
    raise ValueError(f"--prompt-len {length}: could not build a prompt of exactly {length} tokens "
                     f"(the chat template alone takes {count('')}); pick another length")


def benchmark_records(tokenizer, batch: int, prompt_len: int | None, seed: int) -> list[dict]:
    """`batch` arithmetic word problems with worked solutions, optionally stretched to `prompt_len` tokens."""
    from lightning_sd.data.tasks import get_task

    records = get_task("arithmetic").records("train", batch, seed)
    if prompt_len:
        records = [{**r, "prompt": fit_prompt(tokenizer, r["prompt"], prompt_len)} for r in records]
    return records


def make_batch(tokenizer, records: list[dict]):
    from lightning_sd.data.datamodule import prompt_batch

    return prompt_batch(tokenizer, records)


class _SameBatch(torch.utils.data.Dataset):
    """The same prompts `n` times (a fresh batch each time: the callback writes rollouts into it)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return dataclasses.replace(self.batch)


def _first(items: list):
    return items[0]


# ---------------------------------------------------------------------------------------------- timing
def timed_module_class():
    """`SelfDistillationModule` with phase timestamps (a subclass: the library code is timed as it is)."""
    from lightning.pytorch import Callback

    from lightning_sd.module import SelfDistillationModule

    class TimedModule(SelfDistillationModule):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.records_log: list[dict] = []
            self._cur: dict = {}
            self._marks: dict = {}

        def _now(self) -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        def _span(self, name: str, fn, *a):
            t0 = self._now()
            out = fn(*a)
            self._cur[name] = self._cur.get(name, 0.0) + self._now() - t0
            return out

        def _memory(self, phase: str) -> None:
            """Peak RSS of the phase that just ended (VmHWM since the previous mark), then reset the mark."""
            peak = phase_peak_rss()
            if peak is not None:
                self._cur[f"rss_{phase}"] = peak

        def mark_start(self) -> None:
            self._cur = {}
            phase_peak_rss()
            self._marks = {"start": self._now()}

        def on_train_batch_start(self, batch, batch_idx):
            self._cur["generation"] = self._now() - self._marks["start"]
            self._memory("generation")
            return super().on_train_batch_start(batch, batch_idx)

        def build_teacher_inputs(self, batch):
            out = self._span("teacher_prompts", super().build_teacher_inputs, batch)
            self._cur["teacher_prompt_width"] = int(out.prompt_ids.size(1))
            return out

        def teacher_forward(self, batch, teacher_inputs):
            out = self._span("teacher_forward", super().teacher_forward, batch, teacher_inputs)
            self._memory("teacher_forward")
            return out

        def student_forward(self, batch):
            t0 = self._now()
            self._marks["student"] = t0
            return super().student_forward(batch)

        def compute_loss(self, *a):
            out = super().compute_loss(*a)
            self._cur["student_forward"] = self._now() - self._marks["student"]
            self._cur["loss"] = float(out.value)
            self._memory("student_forward")
            return out

        def on_before_backward(self, loss):
            self._marks["backward"] = self._now()
            super().on_before_backward(loss)

        def on_after_backward(self):
            super().on_after_backward()
            self._marks["after_backward"] = self._now()
            self._cur["backward"] = self._marks["after_backward"] - self._marks["backward"]
            self._memory("backward")

        def on_train_batch_end(self, outputs, batch, batch_idx):
            super().on_train_batch_end(outputs, batch, batch_idx)
            end = self._now()
            cur = self._cur
            cur["optimizer"] = end - self._marks["after_backward"]
            self._memory("optimizer")
            cur["step"] = end - self._marks["start"]
            cur["other"] = cur["step"] - sum(cur.get(k, 0.0) for k in PHASES if k != "other")
            rollout = batch.rollout
            cur["rows"], cur["completion_width"] = map(int, rollout.completion_ids.shape)
            cur["prompt_width"] = int(rollout.prompt_ids.size(1))
            cur["trained_tokens"] = int(rollout.completion_mask.sum())
            self.records_log.append(cur)

    class StepStart(Callback):
        """First callback: stamps the start of a step, before the generation callback runs."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.mark_start()

    class RandomRollouts(Callback):
        """`--rollouts random`: completions of uniform random tokens (seeded per batch) instead of samples."""

        def __init__(self, length: int, seed: int) -> None:
            self.length, self.seed = length, seed

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            from lightning_sd.sampling import Rollout

            ids, mask = batch.prompt_ids, batch.prompt_mask
            rows, vocab = ids.size(0), pl_module.student.config.vocab_size
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_idx)
            comp = torch.randint(0, vocab, (rows, self.length), generator=g).to(ids.device)
            ones = torch.ones_like(comp)
            batch.rollout = Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=comp, completion_mask=ones,
                                    logprobs=torch.zeros(comp.shape, device=ids.device),
                                    truncated=torch.ones(rows, dtype=torch.bool, device=ids.device),
                                    prompt_index=torch.arange(rows, device=ids.device))
            batch.completion_text = pl_module.tokenizer.batch_decode(comp.tolist(), skip_special_tokens=True)

    return TimedModule, StepStart, RandomRollouts


_PEAK_SEEN = 0  # the largest per-phase peak so far: resetting VmHWM also resets getrusage's ru_maxrss


def phase_peak_rss() -> int | None:
    """Linux: the peak RSS (bytes) since the previous call, then reset that peak (`/proc/self/clear_refs` 5);
    None where /proc is unavailable. Gives the per-phase memory column of the table."""
    global _PEAK_SEEN
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        _PEAK_SEEN = max(_PEAK_SEEN, peak)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (bytes), including phases whose peak `phase_peak_rss` has reset."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak if sys.platform == "darwin" else peak * 1024, _PEAK_SEEN)


def run_worker(args: argparse.Namespace) -> dict:
    """Run one configuration in this process; return per-step phase times, rates, floor, memory."""
    import lightning as L

    from lightning_sd.callbacks.generation import OnPolicyGeneration
    from lightning_sd.models import load_model
    from lightning_sd.sampling import SamplingConfig

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if not args.no_retain_heap:  # as train.py does (trainer.retain_heap, default true)
        from lightning_sd.heap import retain_freed_memory

        retain_freed_memory()
    torch.manual_seed(args.seed)
    rates = measure_rates(device, fp16="fp16" in (args.generation_dtype, _autocast_dtype(args.precision)))
    extra = {"name_or_path": args.name_or_path} if args.name_or_path else {}
    student, tokenizer = load_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed, **extra)
    if args.gradient_checkpointing:
        from lightning_sd.models import enable_activation_checkpointing

        enable_activation_checkpointing(student, use_reentrant=None)  # transformers' default, as TRL gets it
    records = benchmark_records(tokenizer, args.batch, args.prompt_len, args.seed)
    batch = make_batch(tokenizer, records)
    chunk = chunk_sizes(args.chunk_size)[0]
    loss = dict(beta=args.beta, support=args.support, top_k=args.top_k, reduction=args.reduction, chunk_size=chunk,
                template=TEACHER_TEMPLATE, is_clip=args.is_clip)
    TimedModule, StepStart, RandomRollouts = timed_module_class()
    module = TimedModule(student, tokenizer, teacher=args.teacher,
                         teacher_kwargs={"rate": args.teacher_rate} if args.teacher == "ema" else
                         {"mix": 0.5} if args.teacher == "trust_region" else None,
                         loss=loss, optimizer={"name": "adamw", "lr": args.lr,
                                               "in_backward": args.optimizer_in_backward})
    sampling = SamplingConfig(n=1, max_new_tokens=args.completion_len, temperature=args.temperature,
                              fixed_length=True, seed=args.seed, dtype=args.generation_dtype,
                              share_prefill=not args.no_share_prefill, lean_decode=not args.no_lean_decode,
                              compile_decode=args.compile_decode)
    total = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(_SameBatch(batch, total), batch_size=1, collate_fn=_first)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
                        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[StepStart(), OnPolicyGeneration(sampling) if args.rollouts == "sample" else
                                   RandomRollouts(args.completion_len, args.seed)])
    trainer.fit(module, train_dataloaders=loader)
    steps = module.records_log[args.warmup:]
    first = module.records_log[0]
    shape = ModelShape.from_model(student)
    precision = floor_precision(args, student)
    work = StepWork(rows=first["rows"], prompt=first["prompt_width"], teacher_prompt=first["teacher_prompt_width"],
                    completion=first["completion_width"])
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json")} | {"chunk_size": chunk},
        "steps": steps,
        "losses": [s["loss"] for s in module.records_log],
        "rates": vars(rates),
        "shape": vars(shape),
        "work": vars(work),
        "floor": step_floor(shape, work, rates, decode=args.rollouts == "sample", precision=precision),
        "floor_precision": dataclasses.asdict(precision),
        "peak_rss": peak_rss_bytes(),
        "peak_gpu": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "load": os.getloadavg(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
    }


def _autocast_dtype(precision: str) -> str | None:
    """The autocast dtype of a Lightning mixed precision ("bf16-mixed" -> bf16, "16-mixed" -> fp16), else None."""
    return {"bf16-mixed": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16": "fp16"}.get(str(precision))


def floor_precision(args: argparse.Namespace, model: torch.nn.Module) -> Precision:
    """The precision this worker ran each phase in (`model` after the run: Lightning's "-true" precisions have
    converted it). `--generation-dtype` set: the rollout reads a copy in that dtype, cast once per rollout unless
    the model already is in it. Else under autocast (`--precision bf16-mixed`) the rollout runs in the autocast
    dtype from weights autocast casts once per rollout (its weight cache lasts the rollout's one precision
    context); else in the model's dtype. The teacher and the student compute in the autocast dtype, else in the
    model's."""
    from floor import DTYPE_BYTES

    from lightning_sd.models import DTYPES

    names = {DTYPES[name]: name for name in DTYPE_BYTES}  # torch dtype -> the floor's short name
    model_dtype = names.get(next(model.parameters()).dtype, "fp32")
    autocast = _autocast_dtype(args.precision)
    compute = autocast or model_dtype
    if args.generation_dtype is not None:
        return Precision(rollout=args.generation_dtype, rollout_cast=args.generation_dtype != model_dtype,
                         compute=compute)
    if autocast is not None:
        return Precision(rollout=autocast, rollout_cast=autocast != model_dtype, compute=compute)
    return Precision(rollout=model_dtype, compute=compute)


def precision_of(result: dict) -> tuple[Precision, MachineRates]:
    """The floor's precision and the machine rates of a worker's result (results without a recorded precision
    were computed at the fp32 rates: `Precision()`)."""
    return Precision(**result.get("floor_precision", {})), MachineRates(**result["rates"])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def run_subprocess(argv: list[str], python: str | None = None, timeout: float | None = None) -> dict:
    """Run `step.py --worker argv...` in a fresh process and return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python or sys.executable, str(Path(__file__).resolve()), "--worker", "--out", out, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------- report
def summarize(result: dict) -> dict:
    """Medians over the measured steps, throughput and the floor ratio."""
    steps = result["steps"]
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in (*PHASES, "step")}
    rows, width = steps[0]["rows"], steps[0]["completion_width"]
    trained = statistics.median(s["trained_tokens"] for s in steps)
    floor = result["floor"]
    return {
        "median": med,
        "gen_tokens_per_s": (rows * width / med["generation"]
                             if med["generation"] and result["config"].get("rollouts", "sample") == "sample"
                             else float("nan")),
        "trained_tokens_per_s": trained / max(med["step"] - med["generation"], 1e-9),
        "floor": floor,
        "ratio": med["step"] / floor["total"],
        "peak_rss": result["peak_rss"],
        "peak_gpu": result["peak_gpu"],
        "loss": result["losses"][0],
    }


def format_table(result: dict) -> str:
    """One configuration as a text table (phase medians next to their floors)."""
    s = summarize(result)
    c, w, r = result["config"], result["work"], result["rates"]
    med, fl = s["median"], s["floor"]
    lines = [
        f"model {c['model']} ({result['shape']['n_params'] / 1e6:.1f}M params, {c['dtype']}), device "
        f"{result['device_name']}, threads {c['threads']}, torch {result['torch']}, load {result['load'][0]:.2f}",
        f"batch {w['rows']} x completion {w['completion']} tokens, prompt {w['prompt']} / teacher prompt "
        f"{w['teacher_prompt']} tokens, loss beta={c['beta']} support={c['support']} chunk_size={c['chunk_size']}, "
        f"teacher {c['teacher']}, rollouts {c.get('rollouts', 'sample')}, precision {c['precision']}, gradient "
        f"checkpointing {'on' if c.get('gradient_checkpointing') else 'off'}, {len(result['steps'])} measured steps after "
        f"{c['warmup']} warm-up",
        f"machine rates: fp32 matmul {r['flops'] / 1e9:.0f} GFLOP/s"
        + (f", bf16 matmul {r['bf16_flops'] / 1e9:.0f} GFLOP/s" if r.get("bf16_flops") else "")
        + f", copy {r['bandwidth'] / 1e9:.1f} GB/s",
        "floor at: " + floor_rates(result),
        "",
        f"{'phase':<18}{'median s':>10}{'floor s':>10}{'x floor':>9}{'peak RSS GiB':>14}",
    ]
    rss = {k: max(st.get(f"rss_{k}", 0) for st in result["steps"]) for k in PHASES}
    pairs = [("generation", "generation"), ("teacher_prompts", None), ("teacher_forward", "teacher_forward"),
             ("student_forward", None), ("backward", None), ("student fwd+bwd", "student_fwd_bwd"),
             ("optimizer", "optimizer"), ("other", None), ("step", "total")]
    for name, fkey in pairs:
        value = med["student_forward"] + med["backward"] if name == "student fwd+bwd" else med[name]
        mem = f"{rss[name] / 2**30:>14.2f}" if rss.get(name) else ""
        if fkey is None or not fl[fkey]:
            lines.append(f"{name:<18}{value:>10.3f}{'':>10}{'':>9}{mem}")
        else:
            lines.append(f"{name:<18}{value:>10.3f}{fl[fkey]:>10.3f}{value / fl[fkey]:>9.2f}{mem}")
    lines += [
        "",
        f"generated tokens/s {s['gen_tokens_per_s']:.1f}   trained tokens/s {s['trained_tokens_per_s']:.1f}   "
        f"peak RSS {s['peak_rss'] / 2**30:.2f} GiB"
        + (f"   peak GPU memory {s['peak_gpu'] / 2**30:.2f} GiB" if s["peak_gpu"] is not None else ""),
        f"loss (first step) {s['loss']:.6f}   step / floor {s['ratio']:.2f}",
    ]
    return "\n".join(lines)


def floor_rates(result: dict, *, rollout_only: bool = False) -> str:
    """Which precision and measured rates the result's floor used (`Precision.describe`)."""
    precision, rates = precision_of(result)
    return precision.describe(rates, rollout_only=rollout_only)


def format_comparison(results: list[dict]) -> str:
    """One row per configuration (used for the chunked vs naive memory comparison)."""
    head = f"{'chunk_size':>10}{'step s':>9}{'peak RSS GiB':>14}{'vs first':>10}{'loss (step 1)':>16}"
    lines = [head]
    base = results[0]["peak_rss"]
    for res in results:
        s = summarize(res)
        lines.append(f"{str(res['config']['chunk_size']):>10}{s['median']['step']:>9.2f}{s['peak_rss'] / 2**30:>14.2f}"
                     f"{s['peak_rss'] / base - 1:>+10.1%}{s['loss']:>16.6f}")
    return "\n".join(lines)


def worker_argv(args: argparse.Namespace, chunk: int | None) -> list[str]:
    """The command line of one worker: every option of `args`, with one `--chunk-size`."""
    out = []
    for key, value in vars(args).items():
        if key in ("worker", "out", "json", "chunk_size") or value is None or value is False:
            continue
        out += [f"--{key.replace('_', '-')}"] if value is True else [f"--{key.replace('_', '-')}", str(value)]
    return out + ["--chunk-size", "none" if chunk is None else str(chunk)]


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return [result]
    results = []
    for chunk in chunk_sizes(args.chunk_size):
        result = run_subprocess(worker_argv(args, chunk))
        results.append(result)
        print(format_table(result), flush=True)
        print(flush=True)
    if len(results) > 1:
        print(format_comparison(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
