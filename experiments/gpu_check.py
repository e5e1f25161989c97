"""GPU check for scale-out: each part runs in its own process with a time limit; one table at the end.

Parts (one GPU; every strategy runs with devices=1, so collectives are trivial but every code path runs):
- env:              torch / CUDA / GPU / package versions.
- bf16_live_grad:   live teacher under bf16-mixed: the student gets finite, non-zero gradients, aligned with
                    the 32-true gradients (cosine).
- uneven_<strategy>: 3 training steps, real on-policy generation, row 0 stops at EOS at once while the other
                    rows run to the limit; EMA teacher; bf16-mixed. Strategies: auto, ddp, fsdp,
                    deepspeed_zero2, deepspeed_zero3 (the last two only if deepspeed imports). Reports
                    decode steps, completion lengths, and (FSDP) all-gathers per rollout.
- bench_<strategy>: SmolLM2-135M architecture (random weights, vocab 49152), bf16-mixed, 32 prompts x 128
                    sampled tokens (fixed length): generation tokens/s and seconds per training step, for
                    auto, fsdp (gathered once) and fsdp (gathered per step).
- loss_memory:      experiments/benchmarks/loss_memory.py on cuda (naive vs chunked loss memory), if present.

Usage: `python experiments/gpu_check.py [--parts a,b] [--timeout 150]`; `experiments/gpu_check.sh` installs
carried wheels first. Results also go to `gpu_check_results.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
PARTS = (["env", "bf16_live_grad"] + [f"uneven_{s}" for s in STRATEGIES]
         + ["bench_auto", "bench_fsdp", "bench_fsdp_per_step", "loss_memory"])
MAX_NEW = 8


# ------------------------------------------------------------------------------------------------ helpers


def _records(n: int) -> list[dict]:
    return [{"id": str(i), "prompt": f"What is {i} + {i + 3}? Think step by step.", "answer": str(2 * i + 3),
             "solution": f"{i} + {i + 3} = {2 * i + 3}."} for i in range(n)]


def _batch(tok, records):
    from lightning_sd.data.datamodule import prompt_batch

    return prompt_batch(tok, records)


def _loader(batches):
    import torch

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    return torch.utils.data.DataLoader(DS(), batch_size=None, shuffle=False)


def _strategy(name: str, student):
    """The strategy object `build_run` would make for trainer=<name> (devices=1)."""
    from omegaconf import OmegaConf

    from lightning_sd.build import build_strategy
    from lightning_sd.config import TrainerConfig

    tr = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {
        "accelerator": "gpu", "strategy": name, "sharding_strategy": "FULL_SHARD" if name == "fsdp" else None}))
    return build_strategy(tr, student, micro_batch_size=4)


def _trainer(strategy, precision="bf16-mixed", **kw):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, use_distributed_sampler=False, **kw)


def _fixed_rollout(tok, batch, lengths):
    import torch

    from lightning_sd.sampling import Rollout

    n = len(batch.records)
    width = max(lengths)
    g = torch.Generator().manual_seed(0)
    completion = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for r in range(n):
        completion[r, : lengths[r]] = torch.randint(0, 250, (lengths[r],), generator=g)
        mask[r, : lengths[r]] = 1
    device = batch.prompt_ids.device
    return Rollout(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask.long(),
                   completion_ids=completion.to(device), completion_mask=mask.to(device),
                   logprobs=torch.zeros(n, width, device=device), truncated=torch.ones(n, dtype=torch.bool, device=device),
                   prompt_index=torch.arange(n, device=device))


# ------------------------------------------------------------------------------------------------ parts


def part_env() -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
           "bf16": torch.cuda.is_bf16_supported()}
    for pkg in ("lightning", "transformers", "peft", "omegaconf", "deepspeed", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return {"ok": True, "detail": ", ".join(f"{k} {v}" for k, v in out.items()), **out}


def part_bf16_live_grad() -> dict:
    import torch
    from lightning.pytorch import Callback

    from lightning_sd.models import load_model
    from lightning_sd.module import SelfDistillationModule

    grads = {}
    for precision in ("32-true", "bf16-mixed"):
        student, tok = load_model("tiny", seed=0, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
        module = SelfDistillationModule(student, tok, teacher="live", loss={"name": "distill", "template": "answer_hint"},
                                        optimizer={"name": "sgd", "lr": 0.0})
        batch = _batch(tok, _records(8))
        lengths = [3, 5, 8, 13, 21, 34, 8, 5]

        class Capture(Callback):
            def on_train_batch_start(self, trainer, pl_module, b, i):
                b.rollout = _fixed_rollout(tok, b, lengths)

            def on_after_backward(self, trainer, pl_module):
                grads[precision] = torch.cat([p.grad.detach().float().flatten() for p in pl_module.student.parameters()
                                              if p.grad is not None])

        _trainer("auto", precision=precision, max_steps=1, callbacks=[Capture()]).fit(module, _loader([batch]))
    g32, g16 = grads["32-true"], grads["bf16-mixed"]
    cos = float(torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0))
    ok = bool(torch.isfinite(g16).all()) and float(g16.abs().max()) > 0 and cos > 0.95
    return {"ok": ok, "detail": f"bf16 grad norm {float(g16.norm()):.3g}, fp32 {float(g32.norm()):.3g}, cosine {cos:.4f}",
            "cosine": cos}


def part_uneven(strategy_name: str) -> dict:
    from lightning.pytorch import Callback

    from lightning_sd.callbacks.generation import OnPolicyGeneration
    from lightning_sd.models import load_model
    from lightning_sd.module import SelfDistillationModule

    if strategy_name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return {"ok": None, "detail": f"skipped: deepspeed does not import ({type(err).__name__}: {err})"[:200]}
    student, tok = load_model("tiny", seed=0, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    eos = tok.eos_token_id

    def bias_eos(module, inputs, output):  # row 0 stops at once, the other rows never stop
        output = output.clone()
        output[..., eos] = -1e4
        output[0, ..., eos] = 1e4
        return output

    student.lm_head.register_forward_hook(bias_eos)
    rate = 0.5
    module = SelfDistillationModule(student, tok, teacher="ema", teacher_kwargs={"rate": rate},
                                    loss={"name": "distill", "template": "answer_hint"},
                                    optimizer={"name": "sgd", "lr": 1e-2})
    seen, gathers = [], {"n": 0}
    try:
        from torch.distributed.fsdp._flat_param import FlatParamHandle

        original = FlatParamHandle._all_gather_flat_param

        def counting(self, *a, **k):
            gathers["n"] += 1
            return original(self, *a, **k)

        FlatParamHandle._all_gather_flat_param = counting
    except ImportError:
        pass

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            gathers["n"] = 0

        def on_before_backward(self, trainer, pl_module, loss):
            r = pl_module._last_rollout
            seen.append({"decode_steps": r.completion_ids.size(1), "row0": int(r.completion_mask[0].sum()),
                         "others": sorted(set(r.completion_mask[1:].sum(-1).tolist())), "gathers": gathers["n"]})

    class Keep(OnPolicyGeneration):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            pl_module._last_rollout = batch.rollout
            gathers["rollout"] = gathers["n"]

    gen = Keep({"max_new_tokens": MAX_NEW, "do_sample": True, "seed": 3})
    t0 = time.perf_counter()
    trainer = _trainer(_strategy(strategy_name, student), max_steps=3, callbacks=[Record(), gen])
    trainer.fit(module, _loader([_batch(tok, _records(4)) for _ in range(3)]))
    seconds = time.perf_counter() - t0
    ok = (trainer.global_step == 3 and len(seen) == 3 and all(s["decode_steps"] == MAX_NEW for s in seen)
          and all(s["row0"] == 1 and s["others"] == [MAX_NEW] for s in seen))
    detail = (f"steps {trainer.global_step}, {seconds:.1f} s, decode steps {[s['decode_steps'] for s in seen]}, "
              f"row0 len {seen[0]['row0'] if seen else '?'}, others {seen[0]['others'] if seen else '?'}")
    if strategy_name == "fsdp":
        detail += f", all-gathers in rollout {gathers.get('rollout')}"
    return {"ok": ok, "detail": detail, "seconds": seconds, "seen": seen}


def part_bench(strategy_name: str, gather: bool = True) -> dict:
    import torch
    from lightning.pytorch import Callback
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_sd.rollout import rollout_on
    from lightning_sd.models import byte_tokenizer
    from lightning_sd.module import SelfDistillationModule
    from lightning_sd.sampling import SamplingConfig

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    student = LlamaForCausalLM(config)
    module = SelfDistillationModule(student, tok, teacher="frozen", loss={"name": "distill", "template": "answer_hint"},
                                    optimizer={"name": "adamw", "lr": 1e-5})
    sampling = SamplingConfig(max_new_tokens=128, do_sample=True, temperature=1.0, fixed_length=True)
    timings = {"gen": [], "step": [], "tokens": []}

    class Generate(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = rollout_on(trainer, pl_module, pl_module.student, batch.prompt_ids, batch.prompt_mask, sampling,
                           seed=batch_idx, gather=gather)
            torch.cuda.synchronize()
            timings["gen"].append(time.perf_counter() - t0)
            timings["tokens"].append(r.completion_ids.numel())
            batch.rollout, batch.completion_text = r, [""] * r.completion_ids.size(0)
            self.t_step = t0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            timings["step"].append(time.perf_counter() - self.t_step)

    batches = [_batch(tok, _records(32)) for _ in range(4)]
    torch.cuda.reset_peak_memory_stats()
    _trainer(_strategy(strategy_name, student), max_steps=4, callbacks=[Generate()]).fit(module, _loader(batches))
    gen_tps = sum(timings["tokens"][1:]) / sum(timings["gen"][1:])
    step_s = sum(timings["step"][1:]) / len(timings["step"][1:])
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"ok": True, "detail": f"gen {gen_tps:,.0f} tok/s, {step_s:.2f} s/step (rollout+train), peak {peak:.1f} GiB "
                                  "(3 steps after 1 warm-up; 32 x 128 tokens)",
            "gen_tokens_per_s": gen_tps, "step_seconds": step_s, "peak_gib": peak}


def part_loss_memory() -> dict:
    script = ROOT / "experiments" / "benchmarks" / "loss_memory.py"
    if not script.exists():
        return {"ok": None, "detail": "skipped: experiments/benchmarks/loss_memory.py not found"}
    proc = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"ok": proc.returncode == 0, "detail": " | ".join(lines[-3:])[:300] or proc.stderr[-300:]}


def run_part(name: str) -> dict:
    if name == "env":
        return part_env()
    if name == "bf16_live_grad":
        return part_bf16_live_grad()
    if name.startswith("uneven_"):
        return part_uneven(name[len("uneven_"):])
    if name == "bench_auto":
        return part_bench("auto")
    if name == "bench_fsdp":
        return part_bench("fsdp")
    if name == "bench_fsdp_per_step":
        return part_bench("fsdp", gather=False)
    if name == "loss_memory":
        return part_loss_memory()
    raise ValueError(f"unknown part {name!r}; parts: {PARTS}")


# ------------------------------------------------------------------------------------------------ driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per part")
    p.add_argument("--out", default="gpu_check_results.json")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:  # child process: run one part, write its result
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            result = run_part(args.part)
        except Exception as err:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            result = {"ok": False, "detail": f"{type(err).__name__}: {err}"[:300]}
        Path(args.result).write_text(json.dumps(result, default=str))
        return 0
    results = {}
    t_all = time.perf_counter()
    for name in [s for s in args.parts.split(",") if s]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        try:
            proc = subprocess.run([sys.executable, __file__, "--part", name, "--result", path], capture_output=True,
                                  text=True, timeout=args.timeout, env=env)
            text = Path(path).read_text() if os.path.getsize(path) else ""
            result = json.loads(text) if text else {"ok": False, "detail": f"no result (exit {proc.returncode})"}
            if result.get("ok") is False:
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                result["stderr_tail"] = tail
        except subprocess.TimeoutExpired:
            result = {"ok": False, "detail": f"TIMEOUT after {args.timeout:.0f} s (hang?)"}
        result["seconds_total"] = time.perf_counter() - t0
        results[name] = result
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[result.get("ok")]
        print(f"[gpu_check] {name}: {status} ({result['seconds_total']:.0f} s) {result.get('detail', '')}", flush=True)
        for line in result.get("stderr_tail", []):
            print(f"    {line[:240]}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print("\n| part | status | seconds | detail |\n|---|---|---|---|")
    for name, r in results.items():
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[r.get("ok")]
        print(f"| {name} | {status} | {r['seconds_total']:.0f} | {r.get('detail', '')} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; results in {args.out}")
    return 0 if all(r.get("ok") is not False for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
