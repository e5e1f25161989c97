"""Measured effect of each hot-path choice, one at a time, alternatives interleaved in one process.

| ablation | compares |
|---|---|
| head | one decode step's output layer, 8 rows x 576 -> 49152: `F.linear` (MKL) vs rows-first `W @ x^T` vs oneDNN with the weight packed once (what `sample` uses on CPU) |
| decode | C new tokens for R rows: our `sample` (oneDNN linears) vs the same loop with `F.linear` vs `model.generate` (what TRL runs) vs a static-cache loop with `F.linear` or oneDNN linears (optionally `torch.compile`d) |
| logits | student forward+backward: logits for every position vs `logits_to_keep=C+1` vs completion-only input (`completion_logits`) |
| teacher | teacher forward under `no_grad` vs `inference_mode` |
| loss | full-vocabulary forward KL, forward+backward: from `[R, C, V]` logits vs chunked from hidden states |
| bf16 | student forward+backward: fp32 vs bf16 autocast |
| prefill | `--groups` prompts x `--group-n` rollouts each: the prompt prefilled once and its cache repeated n ways (`generation.share_prefill`) vs every row prefilled |
| rollout_dtype | a rollout of R rows in fp32 vs under bf16 autocast (weights cast in every decode step) vs from a bf16 copy cast once (`generation.dtype=bf16`) |
| lean_decode | a rollout of R rows decoded by the model's own forward vs the lean step (`generation.lean_decode`) vs the lean step compiled (`generation.compile_decode`), in fp32 and from a bf16 copy |

Each alternative runs `--reps` times in turn (A, B, A, B, ...); min and median are printed. Run on a quiet
machine (see README.md); numbers go to docs/performance.md.

    python experiments/benchmarks/ablations.py                       # all, SmolLM2-135M
    python experiments/benchmarks/ablations.py --only head,decode --reps 5
    python experiments/benchmarks/ablations.py --only decode --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

ALL = ("head", "decode", "logits", "teacher", "loss", "bf16", "prefill", "rollout_dtype", "lean_decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--decode-len", type=int, default=32, help="new tokens in the decode ablation")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default=",".join(ALL))
    p.add_argument("--groups", type=int, default=2, help="prompts in the prefill ablation")
    p.add_argument("--group-n", type=int, default=8, help="rollouts per prompt in the prefill ablation")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd static-cache decode loop")
    return p.parse_args(argv)


def interleave(fns: dict, reps: int) -> dict:
    """`{name: fn}` -> `{name: [seconds, ...]}`, alternatives run in turn `reps` times."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict, unit: float = 1.0, suffix: str = "s") -> None:
    print(f"\n{title}  (load {os.getloadavg()[0]:.2f})")
    base = None
    for k, v in times.items():
        lo, med = min(v) * unit, statistics.median(v) * unit
        base = base or lo
        print(f"  {k:<34} min {lo:9.3f} {suffix}   median {med:9.3f} {suffix}   min vs first {lo / base:5.2f}x")


def batch(tokenizer, rows: int, completion: int, seed: int = 0):
    from step import TEACHER_TEMPLATE, benchmark_records, make_batch

    records = benchmark_records(tokenizer, rows, None, seed)
    b = make_batch(tokenizer, records)
    tb = make_batch(tokenizer, [{**r, "prompt": TEACHER_TEMPLATE.format(**r)} for r in records])
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(100, tokenizer.vocab_size - 1, (rows, completion), generator=g)
    return b.prompt_ids, b.prompt_mask, tb.prompt_ids, tb.prompt_mask, comp, torch.ones_like(comp)


def ablate_head(model, args) -> None:
    w = model.get_output_embeddings().weight.detach()
    x = torch.randn(args.batch, w.size(1))
    fns = {"F.linear(x, W)": lambda: torch.nn.functional.linear(x, w),
           "rows-first (W @ x^T)^T": lambda: torch.mm(w, x.t()).t().contiguous()}
    from lightning_sd.cpu_linear import onednn_available

    if onednn_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, args.batch)
        fns["oneDNN, packed once"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    report(f"head: {args.batch} rows x {tuple(w.shape)} output layer", interleave(fns, max(args.reps, 10)), 1e3, "ms")


@torch.no_grad()
def _static_decode(model, ids, mask, new_tokens, step_fn=None):
    from transformers import StaticCache

    from lightning_sd.sampling import position_ids_from_mask

    rows, p = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens)
    attn = torch.zeros(rows, p + new_tokens, dtype=torch.long)
    attn[:, :p] = mask
    pos = position_ids_from_mask(mask)
    out = model(input_ids=ids, attention_mask=attn[:, :p], position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    logits, nxt = out.logits[:, -1], pos[:, -1:] + 1
    gen = torch.Generator().manual_seed(0)
    for t in range(new_tokens - 1):
        tok = torch.multinomial(logits.float().log_softmax(-1).exp(), 1, generator=gen)
        attn[:, p + t] = 1
        out = (step_fn or model)(input_ids=tok, attention_mask=attn, position_ids=nxt, cache=cache, use_cache=True)
        logits, nxt = out.logits[:, -1], nxt + 1


def _sampler(model, tok, ids, mask, **settings):
    import lightning_sd.sampling as sampling

    cfg = sampling.SamplingConfig(fixed_length=True, **settings)
    return lambda: sampling.sample(model, ids, mask, cfg, pad_token_id=tok.pad_token_id,
                                   stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(0))


def ablate_decode(model, tok, args) -> None:
    from transformers import GenerationConfig

    import lightning_sd.sampling as sampling

    ids, mask, *_ = batch(tok, args.batch, 1)
    c = args.decode_len
    gen_cfg = GenerationConfig(max_new_tokens=c, min_new_tokens=c, do_sample=True, temperature=1.0, top_p=1.0,
                               top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.eval()

    ours = _sampler(model, tok, ids, mask, max_new_tokens=c)

    def ours_f_linear():
        with _patched(sampling, "onednn_linears", lambda m, rows_hint=8: contextlib.nullcontext()):
            ours()

    def static_onednn():
        with sampling.onednn_linears(model, rows_hint=args.batch):
            _static_decode(model, ids, mask, c)

    fns = {"ours (sample, oneDNN linears)": ours, "ours with F.linear": ours_f_linear,
           "model.generate (as TRL)": lambda: _no_grad(model.generate, input_ids=ids, attention_mask=mask,
                                                          generation_config=gen_cfg),
           "static-cache loop, F.linear": lambda: _static_decode(model, ids, mask, c),
           "static-cache loop, oneDNN linears": static_onednn}
    if args.compile:
        compiled = torch.compile(model, dynamic=False)
        t0 = time.perf_counter()
        _static_decode(model, ids, mask, 3, step_fn=compiled)
        print(f"\ntorch.compile of the decode step: first 3 steps took {time.perf_counter() - t0:.1f} s")
        fns["static-cache loop, torch.compile"] = lambda: _static_decode(model, ids, mask, c, step_fn=compiled)
    report(f"decode: {args.batch} rows x {c} new tokens (prompt {ids.size(1)})", interleave(fns, args.reps))


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _no_grad(fn, **kw):
    with torch.no_grad():
        return fn(**kw)


def ablate_logits(model, tok, args) -> None:
    from lightning_sd.forward import completion_logits
    from lightning_sd.sampling import position_ids_from_mask

    ids, mask, _, _, comp, cmask = batch(tok, args.batch, args.completion_len)
    model.train()
    c = comp.size(1)

    def run(keep, trim=False):
        def fn():
            if trim:
                logits = completion_logits(model, ids, mask, comp, cmask)
            else:
                full = torch.cat([ids, comp], 1)
                m = torch.cat([mask, cmask], 1)
                out = model(input_ids=full, attention_mask=m, position_ids=position_ids_from_mask(m),
                            logits_to_keep=keep, use_cache=False)
                logits = out.logits[:, -(c + 1):-1]
            logits.float().log_softmax(-1).mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    fns = {"completion-only input (completion_logits)": run(None, trim=True),
           "logits_to_keep=C+1 (before)": run(c + 1),
           "all positions' logits": run(0)}
    report(f"logits: student forward+backward, {args.batch} x (prompt {ids.size(1)} + {c})", interleave(fns, args.reps))


def ablate_teacher(model, tok, args) -> None:
    from lightning_sd.forward import completion_logits

    _, _, tids, tmask, comp, cmask = batch(tok, args.batch, args.completion_len)
    model.eval()

    def under(ctx):
        def fn():
            with ctx():
                completion_logits(model, tids, tmask, comp, cmask)
        return fn

    fns = {"no_grad": under(torch.no_grad), "inference_mode": under(torch.inference_mode)}
    report(f"teacher: forward {args.batch} x (prompt {tids.size(1)} + {comp.size(1)})", interleave(fns, args.reps))


def ablate_loss(model, args) -> None:
    from lightning_sd.losses import chunked_divergence, per_token_divergence

    w = model.get_output_embeddings().weight.detach()
    n = args.batch * args.completion_len
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, w.size(1), generator=g)
    ht = hs + 0.1 * torch.randn(n, w.size(1), generator=g)
    ws = w.clone().requires_grad_(True)

    def naive():
        h = hs.clone().requires_grad_(True)
        s_logits = h @ ws.t()
        with torch.no_grad():
            t_logits = ht @ w.t()
        per_token_divergence(s_logits, t_logits).sum().backward()
        ws.grad = None

    def chunked(size):
        def fn():
            h = hs.clone().requires_grad_(True)
            chunked_divergence(h, ws, ht, w, chunk_size=size).sum().backward()
            ws.grad = None
        return fn

    fns = {"logits [N, V] + per_token_divergence": naive, "chunked, chunk 512": chunked(512),
           "chunked, chunk 128": chunked(128)}
    report(f"loss: forward KL fwd+bwd incl. output layer, N={n} tokens, V={w.size(0)}", interleave(fns, args.reps))


def ablate_bf16(model, tok, args) -> None:
    from lightning_sd.forward import completion_logits

    ids, mask, _, _, comp, cmask = batch(tok, args.batch, args.completion_len)
    model.train()

    def run(dtype):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                logits = completion_logits(model, ids, mask, comp, cmask)
            logits.float().log_softmax(-1).mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    fns = {"fp32": run(None), "bf16 autocast": run(torch.bfloat16)}
    report(f"bf16: student forward+backward {args.batch} x (prompt {ids.size(1)} + {comp.size(1)})",
           interleave(fns, args.reps))


def ablate_prefill(model, tok, args) -> None:
    ids, mask, *_ = batch(tok, args.groups, 1)
    model.eval()
    settings = dict(n=args.group_n, max_new_tokens=args.decode_len)
    fns = {"prefill every row": _sampler(model, tok, ids, mask, share_prefill=False, **settings),
           "prefill once, cache repeated": _sampler(model, tok, ids, mask, share_prefill=True, **settings)}
    report(f"prefill: {args.groups} prompts (length {ids.size(1)}) x {args.group_n} rollouts x {args.decode_len} "
           "new tokens", interleave(fns, args.reps))


def ablate_rollout_dtype(model, tok, args) -> None:
    ids, mask, *_ = batch(tok, args.batch, 1)
    model.eval()
    fp32 = _sampler(model, tok, ids, mask, max_new_tokens=args.decode_len)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32()

    fns = {"fp32": fp32, "bf16 autocast (cast every step)": autocast,
           "bf16 copy, cast once": _sampler(model, tok, ids, mask, max_new_tokens=args.decode_len, dtype="bf16")}
    report(f"rollout_dtype: {args.batch} rows x {args.decode_len} new tokens (prompt {ids.size(1)})",
           interleave(fns, args.reps))


def ablate_lean_decode(model, tok, args) -> None:
    ids, mask, *_ = batch(tok, args.batch, 1)
    model.eval()
    fns = {f"{dtype or 'fp32'}, {name}":
           _sampler(model, tok, ids, mask, max_new_tokens=args.decode_len, dtype=dtype, lean_decode=lean,
                    compile_decode=compiled)
           for dtype in (None, "bf16")
           for name, lean, compiled in (("model forward", False, False), ("lean step", True, False),
                                        ("lean step, compiled", True, True))}
    for name, fn in fns.items():  # the first compiled call compiles: not timed
        if name.endswith("compiled"):
            t0 = time.perf_counter()
            fn()
            print(f"  {name}: first rollout (compilation or its load from the on-disk cache) "
                  f"{time.perf_counter() - t0:.1f} s")
    report(f"lean_decode: {args.batch} rows x {args.decode_len} new tokens (prompt {ids.size(1)})",
           interleave(fns, args.reps))


def main(argv=None) -> None:
    from lightning_sd.models import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(which) - set(ALL))
    if unknown:
        raise SystemExit(f"--only: unknown ablation(s) {unknown}; choose from {ALL}")
    print(f"model {args.model}, threads {args.threads}, torch {torch.__version__}")
    for name in which:
        if name == "head":
            ablate_head(model, args)
        elif name == "decode":
            ablate_decode(model, tok, args)
        elif name == "logits":
            ablate_logits(model, tok, args)
        elif name == "teacher":
            ablate_teacher(model, tok, args)
        elif name == "loss":
            ablate_loss(model, args)
        elif name == "bf16":
            ablate_bf16(model, tok, args)
        elif name == "prefill":
            ablate_prefill(model, tok, args)
        elif name == "rollout_dtype":
            ablate_rollout_dtype(model, tok, args)
        elif name == "lean_decode":
            ablate_lean_decode(model, tok, args)


if __name__ == "__main__":
    main()
