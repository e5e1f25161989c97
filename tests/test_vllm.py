"""vLLM rollouts through the real engine (`generation.backend=vllm`), wherever vLLM is importable: on a CPU,
the environment `make vllm` builds (vLLM's CPU build), run by `make test-vllm`. Skipped elsewhere.

After each weight reload the engine must sample from exactly the student's distribution: its log-probs of
the tokens it sampled equal the student's own (`sampler_token_logprobs`, the same temperature / top-k / top-p),
so the importance weights are 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make vllm; make test-vllm)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from lightning_sd.models import load_model, smollm2_folder  # noqa: E402
from lightning_sd.rollout_backends.vllm import VllmBackend, VllmError  # noqa: E402
from lightning_sd.sampling import SamplingConfig, sampler_token_logprobs  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write one word about the sea."]
SETTINGS = {"plain": dict(temperature=1.0, top_k=0, top_p=1.0), "filtered": dict(temperature=0.7, top_k=20, top_p=0.9)}
# fp32 engine: the two implementations of the same fp32 network differ by kernel rounding only (measured at most
# 5e-5); a bf16 engine samples from bf16-rounded weights, so its log-probs are close, not equal (measured mean
# 0.04-0.05)
TOLERANCE = {"float32": {"max_abs": 1e-3, "weight": 1e-3}, "bfloat16": {"mean_abs": 0.08, "weight": 0.05}}


class Module:
    """What `VllmBackend.rollout` reads of the LightningModule."""

    def __init__(self, student, tokenizer):
        self.student, self.tokenizer, self.pad_token_id = student, tokenizer, tokenizer.pad_token_id or 0


@pytest.fixture(scope="module")
def student():
    model, tok = load_model("smollm2_135m")
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a training step's worth of change: the engine's own checkpoint is now stale
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01 * p.std())
    return model, tok


def prompt_batch(tok, questions=QUESTIONS):
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    ids = [x if isinstance(x, list) else x["input_ids"] for x in ids]
    width = max(map(len, ids))
    prompt_ids = torch.full((len(ids), width), tok.pad_token_id or 0, dtype=torch.long)
    prompt_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):  # left-padded, as the data module pads
        prompt_ids[i, width - len(x):] = torch.tensor(x)
        prompt_mask[i, width - len(x):] = 1
    return prompt_ids, prompt_mask


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def backend(request, student):
    model, tok = student
    return VllmBackend(str(smollm2_folder()), tok, dtype=request.param, max_prompt_length=128)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_after_a_reload_the_engine_samples_from_the_students_distribution(backend, student, setting):
    model, tok = student
    config = SamplingConfig(n=2, max_new_tokens=16, **SETTINGS[setting])
    prompt_ids, prompt_mask = prompt_batch(tok)
    rollout = backend.rollout(None, Module(model, tok), prompt_ids, prompt_mask, config, seed=1)
    assert rollout.completion_ids.shape[0] == 2 * len(QUESTIONS) and rollout.completion_mask.sum() > 0
    full = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_mask)], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attention).logits[:, prompt_ids.size(1) - 1:-1].float()
    ours = sampler_token_logprobs(logits, rollout.completion_ids, config)
    keep = rollout.completion_mask.bool()
    diff = (ours - rollout.logprobs)[keep].abs()
    weight = torch.exp(ours - rollout.logprobs)[keep]
    tol = TOLERANCE[backend.dtype]
    print(f"{backend.dtype} {setting}: |log S - log S_vllm| max {diff.max():.2e} mean {diff.mean():.2e}; importance "
          f"weight mean {weight.mean():.4f} [{weight.min():.3f}, {weight.max():.3f}] over {int(keep.sum())} tokens")
    if "max_abs" in tol:
        assert diff.max() <= tol["max_abs"]
    else:
        assert diff.mean() <= tol["mean_abs"]
    assert abs(float(weight.mean()) - 1.0) <= tol["weight"]


def test_the_engine_gives_the_process_its_thread_setting_back(backend):
    """vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process when its engine starts;
    training in the same process (and the user's own code) must still set its threads."""
    threads = torch.get_num_threads()
    backend.engine(16)
    assert torch.get_num_threads() == threads
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_prompt_longer_than_the_engine_allows_stops_before_the_weights_are_touched(backend, student):
    model, tok = student
    config = SamplingConfig(n=1, max_new_tokens=16)
    long_ids = torch.ones(1, 200, dtype=torch.long)  # max_prompt_length=128: max_model_len = 128 + 16
    backend._synced_step = None
    with pytest.raises(VllmError, match="data.max_prompt_length"):
        backend.rollout(None, Module(model, tok), long_ids, torch.ones_like(long_ids), config, seed=0)
    assert backend._synced_step is None


def test_an_architecture_vllm_does_not_know_names_the_way_out(tmp_path, student):
    _, tok = student
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NotARealModelForCausalLM"],
                                                    "model_type": "not_a_real_model"}))
    with pytest.raises(VllmError, match="generation.backend=hf"):
        VllmBackend(str(folder), tok, dtype="float32").engine(16)


def test_an_engine_that_fails_to_load_its_weights_names_the_way_out(tmp_path, student):
    _, tok = student
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_folder() / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VllmError, match="did not start"):
        VllmBackend(str(folder), tok, dtype="float32").engine(16)


def test_train_py_with_vllm_rollouts_runs_end_to_end(tmp_path):
    """The default job with vLLM rollouts, shortened: the engine starts, reloads weights each step, the
    importance weights stay about 1, the run finishes and exports the model."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "generation.backend=vllm", "loss.is_clip=2.0", "loss.lmbda=1.0",
           "trainer.max_steps=2", "data.n_train=8", "data.n_eval=4", "data.probes=[]", "eval.before=false",
           "callbacks.token_view_every=null", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # the backend's own settings
    env["WANDB_MODE"] = "offline"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    weight = metrics["train_diagnostics"]["importance_weight"]
    assert abs(weight - 1.0) < 1e-3, weight
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_vllm_loads_an_exported_model_and_decodes_greedily_as_transformers(tmp_path, student):
    """The exported folder (`<run folder>/model/`) serves: vLLM's greedy tokens equal transformers' greedy
    tokens on a few prompts."""
    import vllm
    from transformers import AutoModelForCausalLM

    from lightning_sd.export import export_model

    model, tok = student
    folder = tmp_path / "model"
    export_model(model, tok, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=12, detokenize=False)
    prompt_ids, prompt_mask = prompt_batch(tok)
    for ids, mask in zip(prompt_ids, prompt_mask):
        prompt = ids[mask.bool()].tolist()
        theirs = list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)
        ours = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        assert theirs == ours[:len(theirs)] and len(theirs) >= 1


def test_the_rollout_benchmark_runs_and_reports_every_sampler(tmp_path):
    out = tmp_path / "rollouts.json"
    proc = subprocess.run([sys.executable, "experiments/benchmarks/rollout_backends.py", "--batches", "2", "--lengths",
                           "4", "--rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["sampler"] for r in result["rows"]} == {"vllm (reload + generate)", "ours, lean decode",
                                                      "ours, model forward", "transformers generate"}
    assert result["engine_start_s"] > 0 and all(r["median_s"] > 0 for r in result["rows"])


def test_the_step_benchmark_trains_with_vllm_rollouts(tmp_path):
    """The whole training step with the engine's rollouts, built as train.py builds it (step.py through
    build_run): it trains, and the engine's start-up is recorded apart from the measured step."""
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, "experiments/benchmarks/step_backends.py", "--batches", "2", "--lengths",
                           "4", "--steps", "1", "--samplers", "vllm", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["sampler"] == "vllm" and row["engine_start_s"] > 0 and 0 < row["rollout_s"] < row["step_s"]
    assert result["commit"] and result["machine"]["cpu_count"]
