"""Smoke and unit tests of the benchmark scripts (experiments/benchmarks), on the tiny model, so they cannot rot."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _load(name: str):
    """Import a benchmark script as a module (the scripts import each other by file name)."""
    if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "")).parent == BENCH:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


floor = _load("floor")
step = _load("step")


def _shape(**kw):
    base = dict(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, n_params=1000)
    return floor.ModelShape(**{**base, **kw})


def test_forward_flops_hand_count():
    s = _shape()
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, mlp 3 x 8x16
    assert s.layer_params == 64 + 32 + 32 + 64 + 384
    rows, length, logits = 3, 5, 2
    dense = 2 * 576 * 2 * rows * length
    attn = 4 * 2 * 4 * 2 * rows * (length * (length + 1) / 2)  # causal: 1 + 2 + ... + 5 keys
    head = 2 * 8 * 32 * rows * logits
    assert s.forward_flops(rows, length, logits) == dense + attn + head
    # with a cache of 10 tokens every new token attends to 10 more keys
    extra = 4 * 2 * 4 * 2 * rows * length * 10
    assert s.forward_flops(rows, length, logits, past=10) == dense + attn + head + extra


def test_step_floor_phases_add_up_and_scale():
    s = _shape(n_params=10_000)
    rates = floor.MachineRates(flops=1e9, bandwidth=1e9, device="cpu", threads=1, matmul_n=1, copy_bytes=1)
    work = floor.StepWork(rows=4, prompt=10, teacher_prompt=20, completion=6)
    phases = floor.step_floor(s, work, rates)
    assert set(phases) == {"generation", "teacher_forward", "student_fwd_bwd", "optimizer", "total"}
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
    assert phases["optimizer"] == pytest.approx(28 * 10_000 / 1e9)
    # the student does 3x the forward work on its (shorter) sequence, plus the loss passes
    expected = 3 * s.forward_flops(4, 15, 6) / 1e9 + 5 * 4 * 6 * 32 * 4 / 1e9  # last token not fed
    assert phases["student_fwd_bwd"] == pytest.approx(expected)
    slower = floor.step_floor(s, work, floor.MachineRates(0.5e9, 0.5e9, "cpu", 1, 1, 1))
    assert slower["total"] == pytest.approx(2 * phases["total"])
    no_decode = floor.step_floor(s, work, rates, decode=False)
    assert no_decode["generation"] == 0.0
    assert no_decode["total"] == pytest.approx(phases["total"] - phases["generation"])


def test_decode_floor_is_memory_bound_for_big_weights():
    s = _shape(hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=2048, vocab=1000, layers=4)
    fast_compute = floor.MachineRates(flops=1e15, bandwidth=1e9, device="cpu", threads=1, matmul_n=1, copy_bytes=1)
    work = floor.StepWork(rows=1, prompt=1, teacher_prompt=1, completion=3)
    gen = floor.step_floor(s, work, fast_compute)["generation"]
    weights = (s.layer_params * s.layers + s.hidden * s.vocab) * 4
    assert gen >= 2 * weights / 1e9  # two decode steps, each reads every weight once


def _rates(flops=1e9, bandwidth=1e9, bf16_flops=None):
    return floor.MachineRates(flops=flops, bandwidth=bandwidth, device="cpu", threads=1, matmul_n=1, copy_bytes=1,
                              bf16_flops=bf16_flops)


_WORK = floor.StepWork(rows=4, prompt=10, teacher_prompt=20, completion=6)


def test_fp32_precision_keeps_the_fp32_floor():
    s = _shape(n_params=10_000)
    today = floor.step_floor(s, _WORK, _rates())
    # a measured bf16 rate changes nothing at the default (fp32) precision, nor at an explicit fp32 one
    assert floor.step_floor(s, _WORK, _rates(bf16_flops=1e12)) == today
    assert floor.step_floor(s, _WORK, _rates(bf16_flops=1e12),
                            precision=floor.Precision(rollout="fp32", compute="fp32")) == today


def test_bf16_precision_with_equal_rates_and_4_byte_rollouts_is_the_fp32_floor():
    s = _shape(n_params=10_000)
    today = floor.step_floor(s, _WORK, _rates())
    bf16 = floor.step_floor(s, _WORK, _rates(bf16_flops=1e9), precision=floor.Precision(rollout="fp32", compute="bf16"))
    assert bf16 == pytest.approx(today)


def test_bf16_compute_divides_the_training_flops_by_the_bf16_rate():
    s = _shape(n_params=10_000)
    p = floor.Precision(rollout="fp32", compute="bf16")
    fp32 = floor.step_floor(s, _WORK, _rates())
    bf16 = floor.step_floor(s, _WORK, _rates(bf16_flops=2e9), precision=p)
    assert bf16["teacher_forward"] == pytest.approx(fp32["teacher_forward"] / 2)
    loss = 5 * 4 * 6 * 32 * 4 / 1e9  # the loss's fp32 logits bytes: unchanged
    assert bf16["student_fwd_bwd"] == pytest.approx((fp32["student_fwd_bwd"] - loss) / 2 + loss)
    assert bf16["optimizer"] == fp32["optimizer"]  # fp32 master weights
    assert bf16["generation"] == fp32["generation"]  # fp32 rollout


def test_bf16_rollout_reads_half_the_bytes_at_the_bf16_rate():
    s = _shape(hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=2048, vocab=1000, layers=4)
    work = floor.StepWork(rows=2, prompt=3, teacher_prompt=3, completion=5)
    # matmuls free: the generation floor is the decode steps' bytes (weights + KV cache)
    fast = _rates(flops=1e30, bandwidth=1e9, bf16_flops=1e30)
    fp32 = floor.step_floor(s, work, fast, precision=floor.Precision(rollout="fp32"))["generation"]
    bf16 = floor.step_floor(s, work, fast, precision=floor.Precision(rollout="bf16"))["generation"]
    assert fp32 == pytest.approx(floor.step_floor(s, work, fast)["generation"])
    assert bf16 == pytest.approx(fp32 / 2)
    weights = s.layer_params * s.layers + s.hidden * s.vocab
    kv = sum(2 * s.layers * s.kv_heads * s.head_dim * 2 * (3 + t) for t in range(1, 5))
    assert bf16 == pytest.approx((4 * weights * 2 + kv * 2) / 1e9)
    # bandwidth free: the prefill and decode matmuls at the rollout dtype's rate
    compute_bound = floor.step_floor(s, work, _rates(flops=1e9, bandwidth=1e30, bf16_flops=4e9),
                                     precision=floor.Precision(rollout="bf16"))["generation"]
    flops = s.forward_flops(2, 3, 1) + sum(s.forward_flops(2, 1, 1, past=3 + t - 1) for t in range(1, 5))
    assert compute_bound == pytest.approx(flops / 4e9)


def test_cast_costs_once_per_rollout_only_with_a_cast_copy():
    s = _shape(n_params=10_000)
    rates = _rates(bf16_flops=2e9)
    plain = floor.step_floor(s, _WORK, rates, precision=floor.Precision(rollout="bf16", compute="bf16"))
    cast = floor.step_floor(s, _WORK, rates, precision=floor.Precision(rollout="bf16", rollout_cast=True,
                                                                       compute="bf16"))
    weights = s.layer_params * s.layers + s.hidden * s.vocab
    assert cast["generation"] - plain["generation"] == pytest.approx(weights * (4 + 2) / 1e9)  # read fp32, write bf16
    assert {k: v for k, v in cast.items() if k not in ("generation", "total")} == \
        {k: v for k, v in plain.items() if k not in ("generation", "total")}
    assert floor.step_floor(s, _WORK, rates, decode=False,
                            precision=floor.Precision(rollout="bf16", rollout_cast=True))["generation"] == 0.0


def test_precision_needs_a_measured_rate_and_known_dtypes():
    s = _shape()
    with pytest.raises(ValueError, match="bf16 matmul rate was not measured"):
        floor.step_floor(s, _WORK, _rates(), precision=floor.Precision(compute="bf16"))
    with pytest.raises(ValueError):
        floor.Precision(rollout="int8")
    with pytest.raises(ValueError):
        floor.Precision(rollout_cast=True)
    text = floor.Precision(rollout="bf16", rollout_cast=True, compute="bf16").describe(_rates(bf16_flops=180e9))
    assert text == "rollout bf16, cast once; teacher and student bf16: bf16 matmul 180 GFLOP/s, copy 1.0 GB/s"
    mixed = floor.Precision(rollout="fp32", compute="bf16").describe(_rates(bf16_flops=180e9), rollout_only=False)
    assert "fp32 matmul 1 GFLOP/s, bf16 matmul 180 GFLOP/s" in mixed
    assert floor.Precision().describe(_rates(), rollout_only=True) == "rollout model dtype: fp32 matmul 1 GFLOP/s, copy 1.0 GB/s"


def test_step_worker_floor_precision_follows_its_configuration():
    model = torch.nn.Linear(2, 2)
    P = floor.Precision

    def prec(*argv):
        return step.floor_precision(step.parse_args(["--model", "tiny", *argv]), model)

    vs = _load("vs_trl")
    assert prec(*vs._ours_argv(vs.parse_args(["--fp32"]))) == P(rollout="fp32", compute="fp32")
    # --bf16: bf16-mixed, rollouts from a bf16 copy; --autocast-rollouts: autocast's cached bf16 weights
    assert prec(*vs._ours_argv(vs.parse_args(["--bf16"]))) == P(rollout="bf16", rollout_cast=True, compute="bf16")
    assert prec(*vs._ours_argv(vs.parse_args(["--bf16", "--autocast-rollouts"]))) == P(
        rollout="bf16", rollout_cast=True, compute="bf16")
    assert prec("--precision", "32-true", "--generation-dtype", "bf16") == P(rollout="bf16", rollout_cast=True)
    assert prec("--generation-dtype", "fp32") == P(rollout="fp32")
    assert step.floor_precision(step.parse_args(["--precision", "bf16-true"]), model.to(torch.bfloat16)) == \
        P(rollout="bf16", compute="bf16")
    # results written before the floor knew the precision: the fp32 floor
    assert step.precision_of({"rates": vars(_rates())})[0] == P()


def test_measure_rates_small():
    r = floor.measure_rates("cpu", matmul_n=64, copy_mib=4, repeats=2)
    assert r.flops > 0 and math.isfinite(r.flops)
    assert r.bf16_flops > 0 and math.isfinite(r.bf16_flops)
    assert r.bandwidth > 0 and math.isfinite(r.bandwidth)
    assert r.copy_bytes == 4 * 2**20
    assert r.fp16_flops is None
    assert floor.measure_rates("cpu", matmul_n=16, copy_mib=1, repeats=1, bf16=False).bf16_flops is None


def test_fit_prompt_exact_length(tiny):
    from lightning_sd.data.prompts import format_prompt

    _, tok = tiny
    for n in (40, 57, 90):
        text = step.fit_prompt(tok, "What is 2 + 3?", n)
        assert len(tok(format_prompt(tok, text), add_special_tokens=False)["input_ids"]) == n
    with pytest.raises(ValueError, match="prompt-len"):
        step.fit_prompt(tok, "What is 2 + 3?", 3)


def test_chunk_sizes_and_worker_argv():
    assert step.chunk_sizes("none,512, 0") == [None, 512, None]
    args = step.parse_args(["--model", "tiny", "--chunk-size", "none,8", "--steps", "2"])
    argv = step.worker_argv(args, 8)
    assert argv[-2:] == ["--chunk-size", "8"] and argv.count("--chunk-size") == 1
    assert step.parse_args(["--worker", "--out", "x", *argv]).chunk_size == "8"


def _tiny_args(*extra: str):
    return step.parse_args(["--model", "tiny", "--batch", "2", "--completion-len", "6", "--steps", "2",
                            "--warmup", "0", "--prompt-len", "48", *extra])


@pytest.fixture(scope="module")
def tiny_result():
    """One in-process worker run on the tiny model (2 steps), shared by the tests that read a result."""
    torch.manual_seed(0)
    return step.run_worker(_tiny_args())


def test_worker_runs_fixed_work_and_reports_phases(tiny_result):
    result = tiny_result
    assert len(result["steps"]) == 2
    for s in result["steps"]:
        assert s["rows"] == 2 and s["completion_width"] == 6 and s["prompt_width"] == 48
        assert s["teacher_prompt_width"] > 48  # the teacher also sees the solution
        for k in step.PHASES:
            assert s[k] >= 0.0 or k == "other"
        assert s["step"] >= s["generation"] + s["teacher_forward"] + s["backward"]
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["work"] == {"rows": 2, "prompt": 48, "teacher_prompt": result["steps"][0]["teacher_prompt_width"],
                              "completion": 6}
    assert result["floor"]["total"] > 0 and result["peak_rss"] > 0
    table = step.format_table(result)
    for word in ("generation", "teacher_forward", "student fwd+bwd", "optimizer", "x floor", "peak RSS",
                 "generated tokens/s", "trained tokens/s"):
        assert word in table
    if sys.platform.startswith("linux"):  # per-phase peaks; the overall peak covers them (the reset lowers ru_maxrss)
        phase_peaks = [s[f"rss_{k}"] for s in result["steps"]
                       for k in ("generation", "teacher_forward", "student_forward", "backward", "optimizer")]
        assert min(phase_peaks) > 0 and result["peak_rss"] >= max(phase_peaks)
        assert "peak RSS GiB" in table


def test_the_phases_are_disjoint_profiler_spans(tiny_result):
    """Each phase is a span of the Trainer's profiler; none overlaps another, so they add up to at most the step."""
    for s in tiny_result["steps"]:
        assert s["other"] >= -1e-6 and all(s[k] > 0 for k in PHASES_TIMED)


PHASES_TIMED = ("generation", "teacher_prompts", "teacher_forward", "student_forward", "backward", "optimizer")


def test_flags_and_set_become_overrides_of_train_configs():
    """The worker's run is train.py's config with the preset, the flags and `--set` (applied last), validated."""
    from lightning_sd.config import validate_config

    args = _tiny_args("--teacher", "ema", "--teacher-rate", "0.2", "--optimizer-in-backward", "--beta", "0.5",
                      "--set", "generation.lean_decode=false", "--set", "loss.beta=1.0")
    cfg = step.benchmark_config(args, 4)
    assert (cfg.model.name, cfg.teacher.kind, cfg.teacher.rate, cfg.loss.chunk_size) == ("tiny", "ema", 0.2, 4)
    assert cfg.optimizer.in_backward is True and cfg.generation.lean_decode is False
    assert cfg.loss.beta == 1.0  # --set wins over the flag
    assert cfg.loss.template == step.TEACHER_TEMPLATE == "{prompt}\n\n{solution}"
    assert cfg.generation.fixed_length is True and cfg.generation.n == 1 and cfg.trainer.gradient_clip_val is None
    assert cfg.trainer.max_steps == args.warmup + args.steps and cfg.data.max_prompt_length is None
    validate_config(cfg)
    argv = step.worker_argv(args, 4)
    assert step.parse_args(["--worker", "--out", "x", *argv]).set == ["generation.lean_decode=false", "loss.beta=1.0"]


def test_chunked_loss_matches_naive_loss():
    """The memory-bounded path computes the same loss on the same (seeded) rollouts."""
    naive = step.run_worker(_tiny_args("--steps", "1"))
    chunked = step.run_worker(_tiny_args("--steps", "1", "--chunk-size", "4"))
    assert chunked["losses"][0] == pytest.approx(naive["losses"][0], rel=1e-4, abs=1e-7)
    assert "chunk_size" in step.format_comparison([naive, chunked])


def test_random_rollouts_train_on_full_length_without_decoding():
    result = step.run_worker(_tiny_args("--steps", "1", "--rollouts", "random"))
    s = result["steps"][0]
    assert s["completion_width"] == 6 and s["trained_tokens"] == 2 * 6  # no stop token ends the mask
    assert "rollouts random" in step.format_table(result)


def test_cli_prints_table_from_a_fresh_process():
    proc = subprocess.run([sys.executable, str(BENCH / "step.py"), "--model", "tiny", "--batch", "2",
                           "--completion-len", "4", "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x floor" in proc.stdout and "step / floor" in proc.stdout


def test_vs_trl_report_ratio_line(tiny_result):
    vs = _load("vs_trl")
    ours = {**tiny_result, "steps": tiny_result["steps"][:1]}
    trl = {"steps": [{**{k: 2 * v for k, v in ours["steps"][0].items() if k in (*step.PHASES, "step")}}],
           "losses": [ours["losses"][0]], "peak_rss": ours["peak_rss"], "load": ours["load"], "trl": "x",
           "rates": ours["rates"]}
    report = vs.format_report([ours], [trl])
    assert report.splitlines()[-1] == "ratio: 0.500"
    # the tiny run is fp32 (32-true, no generation dtype): the floor lines name the fp32 rate
    assert "floor of this step (rollout fp32; teacher and student fp32: fp32 matmul" in report
    assert "rollout phase (rollout fp32: fp32 matmul" in report


def test_vs_trl_phase_floors_sum_the_measured_phases_the_floor_counts_together():
    vs = _load("vs_trl")
    mo = {"generation": 4.0, "teacher_forward": 2.0, "student_forward": 1.0, "backward": 3.0, "optimizer": 0.5,
          "other": 0.5, "step": 11.0}
    mt = {k: 2 * v for k, v in mo.items()}
    floor = {"generation": 2.0, "teacher_forward": 1.0, "student_fwd_bwd": 2.0, "optimizer": 0.25, "total": 5.25}
    lines = vs.phase_floors(mo, mt, floor)
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert rows["student_fwd_bwd"] == ["2.000", "2.00", "4.00"]  # (1 + 3) / 2, TRL twice that
    assert rows["generation"] == ["2.000", "2.00", "4.00"] and rows["optimizer"] == ["0.250", "2.00", "4.00"]
    assert lines[-1].endswith(f"{(11.0 - 4.0 + 2.0) / 5.25:.2f} x floor")


def test_vs_trl_runs_bf16_by_default_with_ours_sampling_from_a_bf16_copy():
    vs = _load("vs_trl")
    argv = vs._ours_argv(vs.parse_args([]))
    assert argv[argv.index("--precision") + 1] == "bf16-mixed"
    assert argv[argv.index("--generation-dtype") + 1] == "bf16" and argv[argv.index("--is-clip") + 1] == "2.0"
    fp32 = vs._ours_argv(vs.parse_args(["--fp32"]))
    assert fp32[fp32.index("--precision") + 1] == "32-true" and "--generation-dtype" not in fp32
    autocast = vs._ours_argv(vs.parse_args(["--autocast-rollouts"]))
    assert "--generation-dtype" not in autocast and autocast[autocast.index("--precision") + 1] == "bf16-mixed"
    # the bf16 fast path decodes with the compiled step; fp32, autocast rollouts and the flag turn it off
    assert "--compile-decode" in argv
    assert "--compile-decode" not in fp32 and "--compile-decode" not in autocast
    assert "--compile-decode" not in vs._ours_argv(vs.parse_args(["--no-compile-decode"]))
    # updates inside backward only when asked for
    assert "--optimizer-in-backward" not in argv
    assert "--optimizer-in-backward" in vs._ours_argv(vs.parse_args(["--fp32", "--optimizer-in-backward"]))


def test_scaling_table_and_plot_from_grid_rows(tmp_path):
    scaling = _load("scaling")

    def side(s):
        return {"step_s": s, "generation_s": s / 2, "peak_rss": 2 ** 30, "peak_gpu": None, "load": 1.0}

    rows = [{"batch": b, "length": n, "precision": "bf16", "tokens": b * n, "ours": side(0.01 * b * n),
             "trl": side(0.02 * b * n) if b * n <= 64 else None, "floor_s": 0.005 * b * n, "device_name": "cpu"}
            for b in (1, 8) for n in (8, 64)]
    table = scaling.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["precision", "batch", "length", "ours"]
    line = table[1].split()  # batch 1 x 8: ours 0.08 s, TRL 0.16 s, ratio 0.50, floor 0.04 s, 2.00x floor
    assert line[:8] == ["bf16", "1", "8", "0.08", "0.16", "0.50", "0.04", "2.00"]
    assert table[4].split()[4] == "-"  # batch 8 x 64: TRL skipped
    scaling.plot(rows, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 10_000
    point = scaling.point_args(scaling.parse_args([]), 8, 64, "fp32")
    assert (point.batch, point.completion_len, point.fp32, point.steps) == (8, 64, True, 1)


@pytest.mark.parametrize("native", [False, True])
def test_vs_trl_chooses_its_precision_by_the_cpu_and_says_why(monkeypatch, native):
    from lightning_sd import cpu_precision

    vs = _load("vs_trl")
    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu_precision, "bf16_slowdown", lambda: 9.0)
    args = vs.parse_args([])
    assert args.fp32 == (not native)
    assert ("--precision", "32-true" if not native else "bf16-mixed") == tuple(
        vs._ours_argv(args)[vs._ours_argv(args).index("--precision"):][:2])
    note = vs.precision_note(args)
    assert note.startswith("precision: fp32, because this CPU has no native bf16 matmul (a bf16 matmul ran 9.0x") \
        if not native else note.startswith("precision: bf16 mixed, because this CPU multiplies bf16 natively")
    assert vs.precision_note(vs.parse_args(["--fp32"])).endswith("(asked for, or the default off the CPU)")


def test_step_backends_runs_each_sampler_in_its_own_worker_and_tabulates():
    """The sampler comparison on the tiny model with the two built-in samplers (vLLM needs `make vllm`)."""
    backends = _load("step_backends")
    out = backends.main(["--batches", "2", "--lengths", "4", "--steps", "1", "--samplers", "lean decode,model forward",
                         "--extra", "--model tiny --prompt-len 48"])
    rows = out["rows"]
    assert [(r["batch"], r["length"], r["sampler"]) for r in rows] == [(2, 4, "lean decode"), (2, 4, "model forward")]
    for r in rows:
        assert 0 < r["rollout_s"] < r["step_s"] and r["peak_rss_gib"] > 0 and r["engine_start_s"] is None
    table = backends.format_table(rows)
    assert "| 2 x 4 | lean decode |" in table and "| 1.00x |" in table
