"""What the step diagnostics cost next to the loss they describe: the per-token teacher advantage and the
clipped teacher mass (`Scorer.token_diagnostics`) against the loss's forward and backward
(`per_token_divergence`, forward KL, loss temperature 1.1, direction-preserving clip at 0.05), on random
logits of the default run's shape (8 rollouts x 48 tokens x SmolLM2's 49152 entries), in one process, best of
`--repeats`, one thread by default.

    python experiments/benchmarks/diagnostics.py [--rows 8] [--tokens 48] [--vocab 49152] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time



def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    from lightning_sd import SelfDistillationModule, load_model, per_token_divergence

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.tokens, args.vocab)
    s = torch.randn(shape, generator=g).requires_grad_(True)
    t = torch.randn(shape, generator=g)
    tokens = torch.randint(0, args.vocab, shape[:2], generator=g)
    model, tok = load_model("tiny", seed=0)
    out = {"load_avg": os.getloadavg(), **{k: v for k, v in vars(args).items()}}

    def loss() -> None:
        per_token_divergence(s, t, beta=0.0, temperature=1.1, entry_clip=0.05).sum().backward()
        s.grad = None

    out["loss_forward_backward_s"] = best_of(loss, args.repeats)
    for clip in (None, 0.05):
        module = SelfDistillationModule(model, tok, loss={"name": "distill", "template": "answer_hint",
                                                          "temperature": 1.1, "entry_clip": clip})
        key = "diagnostics_s" if clip is None else "diagnostics_with_clip_s"
        out[key] = best_of(lambda: module.scorer.token_diagnostics(s, t, tokens), args.repeats)
    for k, v in out.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return out


if __name__ == "__main__":
    main()
