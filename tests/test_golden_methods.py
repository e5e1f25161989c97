"""Golden values: every method, built from the Hydra configs exactly as `train.py` builds it, gives the recorded
loss and gradients on two optimizer steps (tiny model, fixed seed). Guards refactors of the middle layer: a
change that alters any method's numbers fails here.

The cases run in float64 end to end (`model.dtype=float64`: the model, the sampler's distribution, the teacher
and every loss term), with the tiny Llama's norm and rotary embedding, which transformers computes in float32
whatever the weights, computed in float64 too (`float64_llama`). The recorded values therefore do not depend on
which CPU kernels ran them: vectorized float32 reductions and matmuls round differently on AVX2, AVX-512 and
scalar code (1e-5 relative after two steps), float64 ones agree to 1e-12 (4e-10 for a loss that is the difference
of two terms 200 times its size). The tolerance (`RTOL`) sits between that and any real change. The tiny models'
weights are drawn in float64 too (`model.dtype=float64` does that), since float32 draws also depend on kernels. `test_golden_values_do_not_depend_on_the_cpu_kernels` reruns the cases under
other kernel choices and compares them with the same record.

Rewrite the record only for a change that is meant to alter a method's numbers:
`LIGHTNING_SD_WRITE_GOLDEN=1 pytest tests/test_golden_methods.py`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "methods.json"
COMMON = ["model.dtype=float64", "trainer.max_steps=2", "logger=none", "trainer.enable_checkpointing=false",
          "trainer.enable_progress_bar=false", "callbacks.token_view_every=null", "eval.before=false",
          "eval.after=false"]
CASES = {
    "self_critique": ["experiment=self_critique_tiny"],
    "self_critique_value_clip": ["experiment=self_critique_tiny", "loss.entry_clip_mode=value", "loss.entry_clip=0.002"],
    "self_critique_gradient_clip": ["experiment=self_critique_tiny", "loss.entry_clip=0.002"],
    "self_critique_chunked": ["experiment=self_critique_tiny", "loss.chunk_size=5"],
    "self_critique_contrast": ["experiment=self_critique_tiny", "loss.contrast=0.5"],
    "self_critique_ema_jsd_topk": ["experiment=self_critique_tiny", "teacher=ema", "teacher.rate=0.5",
                                   "loss.beta=0.5", "loss.support=topk", "loss.top_k=8", "loss.entry_clip=null"],
    "distill_reverse_sampled": ["experiment=self_critique_tiny", "loss=distill", "loss.beta=1.0",
                                "loss.support=sampled", "loss.template=answer_note", "loss.skip_first=2"],
    "continual": ["experiment=continual_tiny"],
    "on_policy_kd": ["experiment=on_policy_kd_tiny", "teacher.model.dtype=float64"],
    "rl_feedback": ["experiment=rl_feedback_tiny"],
    "rl_feedback_mixed": ["experiment=rl_feedback_tiny", "loss.grpo_mix=0.5"],
    "grpo": ["experiment=grpo_tiny", "data.task=golden_parity"],
    "sft": ["experiment=sft_tiny"],
}
# float64 runs of one case under different kernels differ by < 1e-11 relative, 4e-10 where a loss cancels; scaling
# one method term by 1e-6 moves the numbers 100 times more than the tolerance (`test_the_tolerance_catches_...`)
RTOL, ATOL = 1e-8, 1e-15

# CPU kernel choices that change how float32 rounds on an x86 machine: scalar ATen kernels everywhere, and what an
# AVX2-only CPU runs (ATen, oneDNN and MKL capped at AVX2; the same as native on a CPU without AVX-512)
KERNEL_SETTINGS = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def _rms_norm_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm in float64 for float64 inputs (transformers always normalizes in float32)."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def _rotary_float64(original):
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """The default rotary embedding's cos/sin in float64 for float64 inputs (inverse frequencies included)."""
        if x.dtype != torch.float64 or self.rope_type != "default":
            return original(self, x, position_ids)
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        steps = torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim
        inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** steps)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return forward


def float64_llama(patch) -> None:
    """Make transformers' Llama compute its norms and rotary embedding in float64 when its weights are float64.
    `patch(obj, name, value)`: `monkeypatch.setattr` in a test, `setattr` in a subprocess."""
    from transformers.models.llama import modeling_llama as llama

    patch(llama.LlamaRMSNorm, "forward", _rms_norm_float64)
    patch(llama.LlamaRotaryEmbedding, "forward", _rotary_float64(llama.LlamaRotaryEmbedding.forward))


def golden_parity_task():
    """Arithmetic prompts with a reward a random model's samples vary on (the completion's length parity), so
    that GRPO's group-normalized advantages are not all zero."""
    from lightning_sd.data.tasks import ArithmeticTask, Verdict

    class ParityTask(ArithmeticTask):
        name = "golden_parity"

        def verify(self, record: dict, completion: str) -> Verdict:
            return Verdict(reward=float(len(completion) % 2))

    return ParityTask


class Record(Callback):
    """Per optimizer step: the loss and a fingerprint of the student's gradients (norm, and the projection on a
    fixed random direction per parameter)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps[-1]["loss"] = float(loss.detach()) if torch.is_tensor(loss) else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        gen = torch.Generator().manual_seed(1234)
        norms, projections = [], []
        for p in pl_module.student.parameters():
            if not p.requires_grad:
                continue
            direction = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            g = torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else p.grad.double()
            norms.append(float(g.norm()))
            projections.append(float((g * direction).sum()))
        self.steps.append({"grad_norms": norms, "grad_projections": projections})


def measure(overrides: list[str], run_dir: Path) -> list[dict]:
    """Two optimizer steps of the run `train.py` would build from `overrides` (after `COMMON`): per step, the
    loss and the gradient fingerprint. Needs the `golden_parity` task registered and `float64_llama` applied."""
    from lightning_sd.build import build_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=COMMON + overrides)
    seed_everything(cfg.seed, workers=True, verbose=False)
    run = build_run(cfg, run_dir=str(run_dir))
    recorder = Record()
    trainer = Trainer(**run.trainer_kwargs, callbacks=run.callbacks + [recorder], logger=False,
                      enable_model_summary=False)
    trainer.fit(run.module, datamodule=run.datamodule)
    return recorder.steps


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def mismatches(case: str, steps: list[dict], want: list[dict]) -> list[str]:
    """What differs between measured `steps` and the recorded `want` of one case, beyond the tolerance."""
    if len(steps) != len(want):
        return [f"{case}: {len(steps)} steps, recorded {len(want)}"]
    found = []
    for i, (got, ref) in enumerate(zip(steps, want)):
        if (got["loss"] is None) != (ref["loss"] is None) or (ref["loss"] is not None
                                                                and not close(got["loss"], ref["loss"])):
            found.append(f"{case} step {i}: loss {got['loss']!r} != {ref['loss']!r}")
        for key in ("grad_norms", "grad_projections"):
            if len(got[key]) != len(ref[key]):
                found.append(f"{case} step {i}: {len(got[key])} {key}, recorded {len(ref[key])}")
                continue
            bad = [j for j, (x, y) in enumerate(zip(got[key], ref[key])) if not close(x, y)]
            if bad:
                worst = max(bad, key=lambda j: abs(got[key][j] - ref[key][j]) / max(abs(ref[key][j]), 1e-300))
                found.append(f"{case} step {i}: {key} differ for parameters {bad[:5]} (e.g. {got[key][worst]!r} "
                             f"!= {ref[key][worst]!r})")
    return found


@pytest.fixture
def golden_env(monkeypatch):
    from lightning_sd.data.tasks import TASKS

    monkeypatch.setitem(TASKS, "golden_parity", golden_parity_task())
    float64_llama(monkeypatch.setattr)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_gives_the_recorded_loss_and_gradients(case, golden_env, tmp_path):
    steps = measure(CASES[case], tmp_path)
    assert len(steps) == 2
    assert any(n > 0 for s in steps for n in s["grad_norms"]), f"{case}: no gradient at all; the case tests nothing"
    if os.environ.get("LIGHTNING_SD_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[case] = steps
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert not mismatches(case, steps, json.loads(GOLDEN.read_text())[case])


def test_the_tolerance_catches_a_small_change(golden_env, tmp_path, monkeypatch):
    """Scaling one method term by one part in a million (every token's divergence) is caught: the record is
    sharp enough for the smallest deliberate edit of a loss."""
    import lightning_sd.objectives as objectives

    original = objectives.per_token_divergence

    def nudged(*args, **kwargs):
        return original(*args, **kwargs) * (1 + 1e-6)

    monkeypatch.setattr(objectives, "per_token_divergence", nudged)
    steps = measure(CASES["self_critique"], tmp_path)
    assert mismatches("self_critique", steps, json.loads(GOLDEN.read_text())["self_critique"])


def _run_cases_in_subprocess(env_extra: dict[str, str], tmp_path: Path) -> dict:
    env = {**os.environ, **env_extra}  # its own torch.compile cache: code compiled under other kernels crashes
    env["TORCHINDUCTOR_CACHE_DIR"] = os.environ["TORCHINDUCTOR_CACHE_DIR"] + "_" + "_".join(env_extra.values())
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())


def float32_probe(run_dir: Path) -> list[dict]:
    """One case's numbers in float32, as the record once was: they change with the CPU kernels."""
    return measure(CASES["self_critique"] + ["model.dtype=float32"], run_dir)


@pytest.mark.parametrize("setting", sorted(KERNEL_SETTINGS))
def test_golden_values_do_not_depend_on_the_cpu_kernels(setting, tmp_path):
    """Every case under other CPU kernels gives the same record, and those kernels really do change float32
    results on this machine (otherwise the comparison would prove nothing, and the test is skipped)."""
    other = _run_cases_in_subprocess(KERNEL_SETTINGS[setting], tmp_path)
    if float32_probe(tmp_path / "probe") == other["float32_probe"]:
        pytest.skip(f"{KERNEL_SETTINGS[setting]} changes no float32 result on this CPU (its native kernels are "
                    "the same)")
    want = json.loads(GOLDEN.read_text())
    found = [m for case in sorted(CASES) for m in mismatches(case, other["cases"][case], want[case])]
    assert not found, f"under {KERNEL_SETTINGS[setting]}:\n" + "\n".join(found)


def _main(out: str) -> None:
    """Subprocess entry: every case in float64, and a float32 probe of the kernels (one case's float32 numbers,
    which differ between kernel choices), written as JSON to `out`."""
    import logging
    import tempfile
    import warnings

    from lightning_sd.data.tasks import TASKS

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    TASKS["golden_parity"] = golden_parity_task()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        probe = float32_probe(Path(tmp) / "probe")
        float64_llama(setattr)
        cases = {case: measure(overrides, Path(tmp) / case) for case, overrides in sorted(CASES.items())}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"float32_probe": probe, "cases": cases}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main(sys.argv[1])
