"""The rollout of one training step with each sampler, side by side in one process: vLLM's engine
(`generation.backend=vllm`, its weight reload included), the built-in sampler with the lean decode step, the
built-in sampler with the model's own forward, and transformers' `generate`. Same prompts, same
`SamplingConfig`, fixed completion length (stop tokens ignored) so that every sampler does the same work;
the samplers alternate within each round. Prints one table (median seconds over rounds, tokens/s, engine
start-up and the process's RSS growth when the engine starts) and writes it as JSON with `--out`.

Needs vLLM: run it in the environment `make vllm` builds.

    .venv-vllm/bin/python experiments/benchmarks/rollout_backends.py                 # SmolLM2-135M, fp32
    .venv-vllm/bin/python experiments/benchmarks/rollout_backends.py --batches 4,16 --lengths 32,128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def prompts(tok, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_sd.data.tasks import get_task

    records = get_task("fictional_facts").records("train", batch, seed=0)
    while len(records) < batch:
        records = records + records[: batch - len(records)]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
           for r in records]
    ids = [x if isinstance(x, list) else x["input_ids"] for x in ids]
    width = max(map(len, ids))
    prompt_ids = torch.full((batch, width), tok.pad_token_id or 0, dtype=torch.long)
    prompt_mask = torch.zeros(batch, width, dtype=torch.long)
    for i, x in enumerate(ids):
        prompt_ids[i, width - len(x):] = torch.tensor(x)
        prompt_mask[i, width - len(x):] = 1
    return prompt_ids, prompt_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,16")
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_sd.logging_utils import machine
    from lightning_sd.models import load_model, smollm2_folder
    from lightning_sd.rollout_backends.vllm import VllmBackend
    from lightning_sd.sampling import SamplingConfig, sample

    student, tok = load_model("smollm2_135m", dtype=args.dtype)
    student.eval()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    rss_before = rss_gib()
    backend = VllmBackend(str(smollm2_folder()), tok, dtype=args.dtype, max_prompt_length=128)
    backend.engine(max(lengths))
    torch.set_num_threads(args.threads)
    start = {"engine_start_s": backend.engine_start_seconds, "engine_rss_gib": rss_gib() - rss_before}

    class Module:
        pass

    module = Module()
    module.student, module.tokenizer, module.pad_token_id = student, tok, tok.pad_token_id or 0

    def run_vllm(ids, mask, cfg, step):
        return backend.rollout(type("T", (), {"global_step": step})(), module, ids, mask, cfg, seed=step)

    def run_ours(lean):
        def go(ids, mask, cfg, step):
            c = SamplingConfig(**{**cfg.__dict__, "lean_decode": lean})
            with torch.no_grad():
                return sample(student, ids, mask, c, pad_token_id=module.pad_token_id,
                              stop_token_ids=[tok.eos_token_id], generator=torch.Generator().manual_seed(step))
        return go

    def run_generate(ids, mask, cfg, step):
        with torch.no_grad():
            return student.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                                    top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                    min_new_tokens=cfg.max_new_tokens, pad_token_id=module.pad_token_id)

    samplers = {"vllm (reload + generate)": run_vllm, "ours, lean decode": run_ours(True),
                "ours, model forward": run_ours(False), "transformers generate": run_generate}
    rows = []
    for batch in batches:
        ids, mask = prompts(tok, batch)
        for length in lengths:
            cfg = SamplingConfig(n=1, max_new_tokens=length, temperature=0.7, fixed_length=True)
            times: dict[str, list[float]] = {k: [] for k in samplers}
            for r in range(args.rounds + 1):  # round 0 warms every sampler up
                for name, fn in samplers.items():
                    t0 = time.perf_counter()
                    fn(ids, mask, cfg, step=r)
                    if r:
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"batch": batch, "length": length, "sampler": name, "median_s": med,
                             "tokens_per_s": batch * length / med, "all_s": ts})
            print(f"batch {batch} x {length} tokens: " + ", ".join(
                f"{r['sampler']} {r['median_s']:.2f} s" for r in rows[-len(samplers):]), flush=True)
    result = {"machine": machine(), "dtype": args.dtype, "threads": args.threads, **start,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rows": rows}
    print(f"\nvLLM engine start-up {start['engine_start_s']:.1f} s, RSS +{start['engine_rss_gib']:.2f} GiB; process "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB; {args.dtype}, {args.threads} threads, "
          f"{result['machine'].get('cpu_model')}, load {result['machine']['load_avg']}")
    print("| batch x length | sampler | median s | tokens/s | vs lean decode |")
    print("|---|---|---|---|---|")
    for r in rows:
        lean = next(x for x in rows if x["batch"] == r["batch"] and x["length"] == r["length"]
                    and x["sampler"] == "ours, lean decode")
        print(f"| {r['batch']} x {r['length']} | {r['sampler']} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['median_s'] / lean['median_s']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
