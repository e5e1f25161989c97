"""Peak extra memory of the per-token divergence loss: naive full logits vs the chunked path.

Each path runs in its own fresh subprocess (so the measurements do not interfere):
it builds the inputs (student/teacher hidden states ``[N, H]`` and LM heads ``[V, H]``),
runs a tiny warm-up, then measures forward + backward of ``loss = per_token.mean()``.

- CPU: peak extra = peak RSS of the process (``getrusage(RUSAGE_SELF).ru_maxrss``) after
  the loss minus the current RSS (psutil, or /proc/self/statm) just before it.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the loss.

Usage::

    python experiments/benchmarks/loss_memory.py               # N=4096, V=49152, H=576
    python experiments/benchmarks/loss_memory.py --n 1024 --v 8192 --chunk-size 256 --beta 0.5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


from lightning_sd.losses import chunked_divergence, per_token_divergence

ROOT = Path(__file__).resolve().parents[2]

PATHS = ("naive", "chunked")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="completion tokens (rows)")
    p.add_argument("--v", type=int, default=49152, help="vocabulary size")
    p.add_argument("--h", type=int, default=576, help="hidden size")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk of the chunked path")
    p.add_argument("--beta", type=float, default=0.0, help="0 forward KL(T||S), 1 reverse KL, else JSD")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _inputs(args: argparse.Namespace, n: int):
    g = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    w_s = torch.randn(args.v, args.h, generator=g).div_(args.h**0.5).mul_(2.0)
    w_t = torch.randn(args.v, args.h, generator=g).mul_(0.1 * 2.0 / args.h**0.5).add_(w_s)
    h_s = torch.randn(n, args.h, generator=g)
    h_t = torch.randn(n, args.h, generator=g).mul_(0.5).add_(h_s)
    w_s, w_t, h_s, h_t = (x.to(dev) for x in (w_s, w_t, h_s, h_t))
    return h_s.requires_grad_(True), w_s.requires_grad_(True), h_t, w_t


def _loss(path: str, args: argparse.Namespace, h_s, w_s, h_t, w_t) -> torch.Tensor:
    if path == "naive":
        return per_token_divergence(h_s @ w_s.T, h_t @ w_t.T, beta=args.beta)
    return chunked_divergence(h_s, w_s, h_t, w_t, chunk_size=args.chunk_size, beta=args.beta)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    path = args.worker
    cuda = args.device.startswith("cuda")
    # Warm-up on a few rows (kernels, thread pools, allocator), then the real inputs.
    small = _inputs(args, 8)
    _loss(path, args, *small).mean().backward()
    del small
    h_s, w_s, h_t, w_t = _inputs(args, args.n)
    gc.collect()
    _sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss()
    start = time.perf_counter()
    per_token = _loss(path, args, h_s, w_s, h_t, w_t)
    per_token.mean().backward()
    _sync(args.device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    result = {"path": path, "peak_extra_bytes": peak - base, "seconds": elapsed}
    torch.save(
        {"per_token": per_token.detach().cpu(), "grad_h": h_s.grad.cpu(), "grad_w": w_s.grad.cpu()},
        args.out,
    )
    print(json.dumps(result))


def main(args: argparse.Namespace) -> None:
    forwarded = [
        "--n", str(args.n), "--v", str(args.v), "--h", str(args.h), "--chunk-size", str(args.chunk_size),
        "--beta", str(args.beta), "--device", args.device, "--seed", str(args.seed),
    ]  # fmt: skip
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            out = os.path.join(tmp, f"{path}.pt")
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", path, "--out", out, *forwarded],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{path} worker failed with exit code {proc.returncode}")
            results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
            tensors[path] = torch.load(out)
    naive = tensors["naive"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"N={args.n} V={args.v} H={args.h} chunk_size={args.chunk_size} beta={args.beta} "
          f"device={args.device} ({device}), torch {torch.__version__}")  # fmt: skip
    print(f"{'path':<10} {'peak extra MB':>14} {'fwd+bwd s':>10} {'max|diff| loss':>15} {'max|diff| dH':>13} {'max|diff| dW':>13}")
    for path in PATHS:
        r, t = results[path], tensors[path]
        diffs = [(t[k] - naive[k]).abs().max().item() for k in ("per_token", "grad_h", "grad_w")]
        print(
            f"{path:<10} {r['peak_extra_bytes'] / 2**20:>14.1f} {r['seconds']:>10.2f} "
            f"{diffs[0]:>15.3e} {diffs[1]:>13.3e} {diffs[2]:>13.3e}"
        )
    ratio = results["chunked"]["peak_extra_bytes"] / results["naive"]["peak_extra_bytes"]
    print(f"ratio chunked / naive peak extra memory: {ratio:.3f}")


if __name__ == "__main__":
    ns = _parse()
    worker(ns) if ns.worker else main(ns)
