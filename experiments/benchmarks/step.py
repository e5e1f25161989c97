"""Time on-policy self-distillation steps of `SelfDistillationModule` and compare them with the floor.

Each configuration runs in a fresh subprocess (peak RSS only grows, so processes are never shared): it measures
the machine's fp32 and bf16 matmul and copy rates (`floor.measure_rates`), builds the run as `python train.py`
does (`build_run`) from train.py's config with the benchmark preset (`conf/benchmark/step.yaml` here), the
flags below and any `--set KEY=VALUE` (Hydra overrides of train.py's config), and trains `--warmup + --steps`
steps on a fixed batch of prompts. The Trainer's profiler spans time each phase:

| phase | profiler spans |
|---|---|
| generation | every callback's `on_train_batch_start` (the rollout: `OnPolicyGeneration`, decode + detokenize) |
| teacher_prompts | `[step]teacher_prompts` (teacher texts, chat template, tokenization) |
| teacher_forward | `[step]teacher_forward` (no grad) |
| student_forward | `[step]student_forward` + `[step]loss` |
| backward | Lightning's `[Strategy]...backward` (`on_before_backward` to `on_after_backward`) |
| optimizer | Lightning's `optimizer_step` less its closure's training step and backward (gradient normalization, AdamW, EMA update) |
| other | the rest of the step (Lightning, logging, the other callbacks) |

Work is fixed so that runs are comparable: the same prompts every step, completions decoded to exactly
`--completion-len` tokens (`generation.fixed_length=true`), fixed seeds. On CUDA the device is synchronized at
every span's start and end.

    python experiments/benchmarks/step.py                                   # SmolLM2, 8 x 64, forward KL
    python experiments/benchmarks/step.py --batch 4 --completion-len 1024 --chunk-size none,512 --steps 1
    python experiments/benchmarks/step.py --model tiny --steps 2 --warmup 0  # seconds, for a smoke run
    python experiments/benchmarks/step.py --set generation.backend=vllm      # any key of train.py's config
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
from omegaconf import OmegaConf

from floor import MachineRates, ModelShape, Precision, StepWork, measure_rates, step_floor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

PHASES = ("generation", "teacher_prompts", "teacher_forward", "student_forward", "backward", "optimizer", "other")
# the benchmark preset's teacher text (TRL's SDFT default: the prompt, a blank line, the reference solution)
TEACHER_TEMPLATE: str = OmegaConf.load(HERE / "conf" / "benchmark" / "step.yaml").loss.template
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of train.py's config, applied last (repeatable), e.g. generation.backend=vllm")
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


def make_batch(tokenizer, records: list[dict], **options):
    """The `StepBatch` the run's data module would make of `records` (`options`: the `PromptEncoder`'s)."""
    from lightning_sd.data.datamodule import prompt_batch

    return prompt_batch(tokenizer, records, **options)


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
# the phases from the Trainer's profiler spans: Lightning's own hooks and the module's `[step]...` spans
# (`SelfDistillationModule.span`); "optimizer" is the optimizer step without the closure's training_step and backward
SPAN_PHASES = {"teacher_prompts": ("[step]teacher_prompts",), "teacher_forward": ("[step]teacher_forward",),
               "student_forward": ("[step]student_forward", "[step]loss")}
# peak RSS is read (and reset) when these phases end: the per-phase memory column
RSS_AT_END = {"generation": "generation", "[step]teacher_forward": "teacher_forward", "[step]loss": "student_forward",
              "backward": "backward", "optimizer_step": "optimizer"}


def _kind(action: str) -> str | None:
    """Which of Lightning's step actions `action` is (any strategy, any module class), else None."""
    if action.startswith("[Callback]") and action.endswith(".on_train_batch_start"):
        return "generation"  # every callback's batch start: the rollout sampler, and the rest (microseconds)
    for prefix, hook in (("[Strategy]", ".training_step"), ("[Strategy]", ".backward"),
                         ("[LightningModule]", ".optimizer_step"), ("[LightningModule]", ".on_train_batch_end")):
        if action.startswith(prefix) and action.endswith(hook):
            return hook[1:]
    return None


def phase_profiler_class():
    """A Lightning `Profiler` that keeps, per training step, the seconds of each phase (`PHASES`) and the peak RSS
    at the end of each: the benchmark reads the library's step through the Trainer's profiler spans."""
    from lightning.pytorch.profilers import Profiler

    class PhaseProfiler(Profiler):
        def __init__(self, cuda: bool = False) -> None:
            super().__init__()
            self.cuda, self.steps, self.cur = cuda, [], None
            self._open: dict[str, float] = {}

        def _now(self) -> float:
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def start(self, action_name: str) -> None:
            now = self._now()
            if self.cur is None and _kind(action_name) == "generation":  # the first hook of a training batch
                phase_peak_rss()
                self.cur = {"_start": now, "_spans": {}}
            self._open[action_name] = now

        def stop(self, action_name: str) -> None:
            now = self._now()
            began = self._open.pop(action_name, None)
            if self.cur is None or began is None:
                return
            kind = _kind(action_name) or action_name
            spans = self.cur["_spans"]
            spans[kind] = spans.get(kind, 0.0) + now - began
            if kind in RSS_AT_END and (peak := phase_peak_rss()) is not None:
                key = f"rss_{RSS_AT_END[kind]}"
                self.cur[key] = max(self.cur.get(key, 0), peak)
            if kind == "on_train_batch_end" and action_name.startswith("[LightningModule]"):  # the step's last hook
                self.steps.append(self._phases(self.cur, now))
                self.cur = None

        @staticmethod
        def _phases(cur: dict, end: float) -> dict:
            spans = cur.pop("_spans")
            out = {k: v for k, v in cur.items() if not k.startswith("_")}
            out["generation"] = spans.get("generation", 0.0)
            for phase, names in SPAN_PHASES.items():
                out[phase] = sum(spans.get(n, 0.0) for n in names)
            out["backward"] = spans.get("backward", 0.0)
            out["optimizer"] = max(0.0, spans.get("optimizer_step", 0.0) - spans.get("training_step", 0.0)
                                   - out["backward"])
            out["step"] = end - cur["_start"]
            out["other"] = out["step"] - sum(out[k] for k in PHASES if k != "other")
            return out

    return PhaseProfiler


def step_recorder_class():
    """A callback (last in the list) that adds each step's shapes and loss to the profiler's open record; it keeps
    the last batch, whose teacher prompts are measured after the run."""
    from lightning.pytorch import Callback

    class StepRecorder(Callback):
        def __init__(self, profiler) -> None:
            self.profiler, self.last_batch = profiler, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            cur, rollout = self.profiler.cur, batch.rollout
            cur["rows"], cur["completion_width"] = map(int, rollout.completion_ids.shape)
            cur["prompt_width"] = int(rollout.prompt_ids.size(1))
            cur["trained_tokens"] = int(rollout.completion_mask.sum())
            cur["loss"] = float(trainer.callback_metrics["train/loss"])
            self.last_batch = batch

    return StepRecorder


def random_rollouts_class():
    """`--rollouts random`: completions of uniform random tokens (seeded per batch) instead of the sampler's."""
    from lightning.pytorch import Callback

    class RandomRollouts(Callback):
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

    return RandomRollouts


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


def overrides(args: argparse.Namespace, chunk: int | None) -> list[str]:
    """The Hydra overrides of train.py's config that the flags stand for (after the preset's), then `--set`."""
    out = [f"model={args.model}", f"model.dtype={args.dtype}", f"seed={args.seed}", f"data.seed={args.seed}",
           f"generation.seed={args.seed}", f"data.batch_size={args.batch}",
           f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", f"trainer.precision={args.precision}",
           f"trainer.max_steps={args.warmup + args.steps}", f"teacher={args.teacher}",
           f"loss.beta={args.beta}", f"loss.support={args.support}", f"loss.reduction={args.reduction}",
           f"loss.chunk_size={'null' if chunk is None else chunk}", f"optimizer.lr={args.lr}",
           f"generation.max_new_tokens={args.completion_len}", f"generation.temperature={args.temperature}"]
    optional = {"model.name_or_path": args.name_or_path, "model.tokenizer": args.tokenizer,
                "loss.top_k": args.top_k, "loss.is_clip": args.is_clip, "generation.dtype": args.generation_dtype,
                "teacher.rate": args.teacher_rate if args.teacher == "ema" else None,
                "teacher.mix": 0.5 if args.teacher == "trust_region" else None}
    out += [f"{k}={v}" for k, v in optional.items() if v is not None]
    switches = {"model.gradient_checkpointing=true": args.gradient_checkpointing,
                "generation.share_prefill=false": args.no_share_prefill,
                "generation.lean_decode=false": args.no_lean_decode,
                "generation.compile_decode=true": args.compile_decode,
                "optimizer.in_backward=true": args.optimizer_in_backward,
                "trainer.retain_heap=false": args.no_retain_heap}
    return out + [k for k, on in switches.items() if on] + list(args.set or [])


def benchmark_config(args: argparse.Namespace, chunk: int | None):
    """train.py's config for this benchmark: conf/train.yaml with the preset (conf/benchmark/step.yaml here), then
    the flags' overrides and `--set`, composed by Hydra as `python train.py` composes its command line."""
    from hydra import compose, initialize_config_dir

    import lightning_sd.config  # noqa: F401  (registers each group's schema defaults with Hydra)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"hydra.searchpath=[file://{HERE / 'conf'}]", "+benchmark=step",
                                                       *overrides(args, chunk)])


def run_worker(args: argparse.Namespace) -> dict:
    """Run one configuration in this process: build the run as train.py does (`build_run`), train it on the fixed
    batch under the phase profiler, and return per-step phase times, rates, floor and memory."""
    from lightning.pytorch import seed_everything

    from lightning_sd.build import build_run
    from lightning_sd.callbacks.generation import OnPolicyGeneration

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    chunk = chunk_sizes(args.chunk_size)[0]
    cfg = benchmark_config(args, chunk)
    seed_everything(args.seed, verbose=False)
    rates = measure_rates(device, fp16="fp16" in (args.generation_dtype, _autocast_dtype(args.precision)))
    run = build_run(cfg)  # validated; trainer.retain_heap as train.py does; the model loaded
    module, d = run.module, run.typed["data"]
    student, tokenizer = module.student, module.tokenizer
    records = benchmark_records(tokenizer, args.batch, args.prompt_len, args.seed)
    batch = make_batch(tokenizer, records, system_prompt=d.system_prompt, max_length=d.max_prompt_length,
                       truncation=d.truncation)
    total = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(_SameBatch(batch, total), batch_size=1, collate_fn=_first)
    profiler = phase_profiler_class()(cuda=device.type == "cuda")
    recorder = step_recorder_class()(profiler)
    callbacks = run.callbacks
    if args.rollouts == "random":
        callbacks = [random_rollouts_class()(args.completion_len, args.seed) if isinstance(c, OnPolicyGeneration)
                     else c for c in callbacks]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from lightning.pytorch import Trainer

    trainer = Trainer(**{**run.trainer_kwargs, "profiler": profiler, "enable_model_summary": False},
                      callbacks=[*callbacks, recorder], logger=False)
    trainer.fit(module, train_dataloaders=loader)
    backend = next((c.backend for c in callbacks if isinstance(c, OnPolicyGeneration)), None)
    teacher_width = (int(module.build_teacher_inputs(recorder.last_batch).prompt_ids.size(1))
                     if module.needs_teacher else 0)
    for s in profiler.steps:
        s["teacher_prompt_width"] = teacher_width
    steps = profiler.steps[args.warmup:]
    first = profiler.steps[0]
    shape = ModelShape.from_model(student)
    precision = floor_precision(args, student)
    work = StepWork(rows=first["rows"], prompt=first["prompt_width"], teacher_prompt=teacher_width,
                    completion=first["completion_width"])
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json")} | {"chunk_size": chunk},
        "overrides": overrides(args, chunk),
        "steps": steps,
        "losses": [s["loss"] for s in profiler.steps],
        "rates": vars(rates),
        "shape": vars(shape),
        "work": vars(work),
        "floor": step_floor(shape, work, rates, decode=args.rollouts == "sample", precision=precision),
        "floor_precision": dataclasses.asdict(precision),
        "peak_rss": peak_rss_bytes(),
        "engine_start_s": getattr(backend, "engine_start_seconds", None),  # generation.backend=vllm: in the warm-up
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
        if key == "set":
            out += [f"--set={item}" for item in value]
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
