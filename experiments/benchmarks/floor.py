"""The floor of one on-policy self-distillation step: counted FLOPs and bytes of each phase divided by the
machine's measured rates.

- `measure_rates()` times a square matmul in fp32 and in bf16 (FLOP/s each) and a large tensor copy (bytes/s,
  read + write counted) on this machine, the same way every time, and keeps the best of a few repeats.
- `ModelShape.from_model(model)` reads a Llama-style decoder's sizes from a Hugging Face model.
- `Precision` says in which dtype each phase runs: the rollout's weights (and KV cache), whether those weights
  are cast from the fp32 parameters once per rollout, and the dtype of the teacher's and the student's matmuls.
  The default `Precision()` is the fp32 floor (the rollout reads the model's own parameters).
- `step_floor(shape, work, rates, precision=...)` returns the lower bound of each phase in seconds:

| phase | work counted | bound |
|---|---|---|
| generation | prefill of R x P prompt tokens (logits at the last position only), then C decode steps: every weight read once per step, KV cache read, R tokens of matmuls; weights and KV cache in the rollout dtype (4 bytes fp32, 2 bf16 or fp16), matmuls at that dtype's rate; with `rollout_cast`, once per rollout the cast of every parameter (read 4 bytes, write 2) | prefill: FLOPs; each decode step: max(FLOPs, bytes); cast: bytes |
| teacher_forward | R x (P' + C - 1) tokens forward (the last token is not fed), logits at the C completion positions | FLOPs at the compute dtype's rate |
| student_fwd_bwd | 3 x the forward FLOPs of R x (P + C - 1) tokens (backward = 2 x forward), plus the full-vocabulary loss: 5 passes over `[R, C, V]` fp32 logits | FLOPs at the compute dtype's rate + loss bytes |
| optimizer | AdamW on fp32 master weights: read param, grad, exp_avg, exp_avg_sq, write param, exp_avg, exp_avg_sq (7 x 4 bytes a parameter) | bytes |

Under bf16 mixed precision (autocast) the teacher's and the student's matmuls run in bf16 (`compute="bf16"`):
their FLOPs are divided by the measured bf16 rate. The copy bandwidth is one rate for every dtype.

Attention FLOPs count the causal half of the score matrix. Embedding lookups, norms, activations and
rotary embeddings are left out (each well under 1% here), so the floor is a true lower bound of the
counted work, not a prediction.

Usage: `python experiments/benchmarks/floor.py` prints this machine's rates.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MachineRates:
    """Measured peak-ish rates: `flops` fp32 matmul FLOP/s (the `dtype` of `measure_rates`), `bandwidth` copy
    bytes/s (read + write), `bf16_flops` / `fp16_flops` bf16 / fp16 matmul FLOP/s (None: not measured)."""

    flops: float
    bandwidth: float
    device: str
    threads: int
    matmul_n: int
    copy_bytes: int
    bf16_flops: float | None = None
    fp16_flops: float | None = None

    def matmul_flops(self, dtype: str) -> float:
        """The matmul rate of `dtype` ("fp32", "bf16" or "fp16"); raises if that rate was not measured."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"no matmul rate for dtype {dtype!r} (fp32 | bf16 | fp16)")
        rate = self.flops if dtype == "fp32" else getattr(self, f"{dtype}_flops")
        if rate is None:
            raise ValueError(f"the {dtype} matmul rate was not measured (measure_rates(..., {dtype}=True))")
        return rate


@dataclass(frozen=True)
class Precision:
    """The dtype of each phase of a step, for `step_floor`.

    - `rollout`: dtype of the weights the rollout reads at every decode step, of its KV cache and of its matmuls
      ("fp32" | "bf16" | "fp16"); None: the model's own parameters (`ModelShape.bytes_per_param`) at the fp32 rate.
    - `rollout_cast`: the rollout's weights are cast from the parameters once per rollout (a `generation.dtype`
      copy, or autocast's weight cache, which lasts the whole rollout): every matmul weight read once in the
      model's dtype and written once in `rollout`.
    - `compute`: dtype of the teacher's forward and the student's forward + backward matmuls ("fp32" | "bf16":
      bf16 mixed precision). The loss's logits and the optimizer's fp32 master weights do not change.
    """

    rollout: str | None = None
    rollout_cast: bool = False
    compute: str = "fp32"

    def __post_init__(self) -> None:
        if self.rollout not in (None, *DTYPE_BYTES):
            raise ValueError(f"Precision.rollout={self.rollout!r} is not None, fp32, bf16 or fp16")
        if self.compute not in DTYPE_BYTES:
            raise ValueError(f"Precision.compute={self.compute!r} is not fp32, bf16 or fp16")
        if self.rollout_cast and self.rollout is None:
            raise ValueError("Precision.rollout_cast needs a rollout dtype")

    def describe(self, rates: MachineRates, *, rollout_only: bool = False) -> str:
        """Which precision and which measured rates a floor used, e.g. `rollout bf16 (cast once), teacher and
        student bf16: bf16 matmul 180 GFLOP/s, copy 20.1 GB/s`; `rollout_only`: the generation phase's."""
        rollout = ("model dtype" if self.rollout is None else self.rollout) + (", cast once" if self.rollout_cast else "")
        used = [self.rollout or "fp32"] + ([] if rollout_only else [self.compute])
        mm = ", ".join(f"{d} matmul {rates.matmul_flops(d) / 1e9:.0f} GFLOP/s" for d in dict.fromkeys(used))
        phases = f"rollout {rollout}" + ("" if rollout_only else f"; teacher and student {self.compute}")
        return f"{phases}: {mm}, copy {rates.bandwidth / 1e9:.1f} GB/s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int, min_seconds: float = 1.0) -> float:
    """Best time of one call: after a warm-up, at least `repeats` calls and `min_seconds` of calls (a few
    milliseconds right after start-up, with threads still waking, read as half the machine's rate)."""
    fn()  # warm-up
    _sync(device)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def measure_rates(device: str | torch.device = "cpu", *, matmul_n: int | None = None, copy_mib: int | None = None,
                  repeats: int = 5, dtype: torch.dtype = torch.float32, bf16: bool = True,
                  fp16: bool = False) -> MachineRates:
    """Time `[n, n] @ [n, n]` (2 n^3 FLOPs) in `dtype` (`flops`), with `bf16` in bfloat16 (`bf16_flops`), with
    `fp16` in float16 (`fp16_flops`), and `dst.copy_(src)` of `copy_mib` MiB (2 x size bytes moved).

    Defaults: n = 1024 and 256 MiB on CPU (larger than any cache), n = 8192 and 2 GiB on CUDA. The best of
    `repeats` is kept: the floor wants the machine's attainable rate, not its average under load."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = matmul_n or (8192 if cuda else 1024)
    mib = copy_mib or (2048 if cuda else 256)
    if cuda:
        # TF32 would inflate the "fp32" rate; the models here run true fp32 unless the user sets it
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = _matmul_seconds(n, dtype, device, repeats)
        t_bf16 = _matmul_seconds(n, torch.bfloat16, device, repeats) if bf16 else None
        t_fp16 = _matmul_seconds(n, torch.float16, device, repeats) if fp16 else None
        numel = mib * 2**20 // 4
        src = torch.ones(numel, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        t_cp = _best_seconds(lambda: dst.copy_(src), device, repeats)
        del src, dst
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return MachineRates(flops=2 * n**3 / t_mm, bandwidth=2 * numel * 4 / t_cp, device=str(device),
                        threads=torch.get_num_threads(), matmul_n=n, copy_bytes=numel * 4,
                        bf16_flops=2 * n**3 / t_bf16 if t_bf16 else None,
                        fp16_flops=2 * n**3 / t_fp16 if t_fp16 else None)


def _matmul_seconds(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats)


@dataclass
class ModelShape:
    """Sizes of a Llama-style decoder (q/k/v/o projections, gated MLP, LM head)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_params: int  # all parameters (tied embeddings counted once)
    bytes_per_param: int = 4

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelShape":
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        params = list(model.parameters())
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=c.intermediate_size, vocab=c.vocab_size, n_params=sum(p.numel() for p in params),
                   bytes_per_param=params[0].element_size())

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer (norm weights left out)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    def forward_flops(self, rows: int, length: int, logits: int, past: int = 0) -> float:
        """FLOPs of a forward over `rows` sequences of `length` new tokens after `past` cached ones, with
        logits at `logits` positions per row."""
        dense = 2 * self.layer_params * self.layers * rows * length
        # causal attention: token i attends to past + i + 1 keys; QK^T and AV each 2 * heads * head_dim FLOPs a key
        keys = length * past + length * (length + 1) / 2
        attn = 4 * self.heads * self.head_dim * self.layers * rows * keys
        head = 2 * self.hidden * self.vocab * rows * logits
        return dense + attn + head


@dataclass
class StepWork:
    """Token counts of one step: R rows, student prompt P, teacher prompt P' (padded widths), C new tokens."""

    rows: int
    prompt: int
    teacher_prompt: int
    completion: int


def step_floor(shape: ModelShape, work: StepWork, rates: MachineRates, *, decode: bool = True,
               precision: Precision = Precision()) -> dict[str, float]:
    """Lower bound in seconds of each phase (see the module docstring) and their `total`; `decode=False` for
    steps whose completions are not generated (generation floor 0); `precision`: the dtype of each phase
    (default: fp32 rates, the rollout reading the model's own parameters)."""
    r, p, tp, c = work.rows, work.prompt, work.teacher_prompt, work.completion
    bpp = shape.bytes_per_param if precision.rollout is None else DTYPE_BYTES[precision.rollout]
    flops = rates.matmul_flops(precision.rollout or "fp32")  # the rollout's matmuls
    train_flops = rates.matmul_flops(precision.compute)  # the teacher's and the student's matmuls
    bw = rates.bandwidth
    # generation: the weights' cast (once per rollout), prefill, then C - 1 decode steps (the first token comes
    # from the prefill logits)
    weights = shape.layer_params * shape.layers + shape.hidden * shape.vocab  # matmul weights
    gen = weights * (shape.bytes_per_param + bpp) / bw if precision.rollout_cast else 0.0
    gen += shape.forward_flops(r, p, 1) / flops
    weight_bytes = weights * bpp
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * bpp
    for t in range(1, c):
        ctx = p + t
        step_flops = shape.forward_flops(r, 1, 1, past=ctx - 1)
        step_bytes = weight_bytes + kv_per_token * r * ctx
        gen += max(step_flops / flops, step_bytes / bw)
    # the last completion token scores nothing and is not fed (`completion_logits`)
    teacher = shape.forward_flops(r, tp + c - 1, c) / train_flops
    loss_bytes = 5 * r * c * shape.vocab * 4
    student = 3 * shape.forward_flops(r, p + c - 1, c) / train_flops + loss_bytes / bw
    optimizer = 7 * 4 * shape.n_params / bw
    phases = {"generation": gen if decode else 0.0, "teacher_forward": teacher, "student_fwd_bwd": student, "optimizer": optimizer}
    phases["total"] = sum(phases.values())
    return phases


def _main() -> None:
    p = argparse.ArgumentParser(description="Measure this machine's fp32 and bf16 matmul and memory-copy rates.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rates = measure_rates(args.device)
    print(f"fp32 matmul: {rates.flops / 1e9:.0f} GFLOP/s, bf16 matmul: {rates.bf16_flops / 1e9:.0f} GFLOP/s "
          f"(n={rates.matmul_n}), "
          f"copy: {rates.bandwidth / 1e9:.1f} GB/s (read+write, {rates.copy_bytes / 2**20:.0f} MiB), "
          f"device {rates.device}, {rates.threads} threads")
    print(asdict(rates))


if __name__ == "__main__":
    _main()
