"""The trained model as a Hugging Face folder: written at the end of a run and from any checkpoint, loaded back
by transformers (and PEFT) with the student's own logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_wandb import TINY, compose_config, run_train

from lightning_sd.callbacks.checkpoint_io import CheckpointError
from lightning_sd.export import export_checkpoint, export_model
from lightning_sd.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RUN = TINY + ["eval.before=false", "eval.after=false", "callbacks.token_view_every=null", "optimizer.lr=1e-2",
              "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1"]
PROMPTS = ["What is the capital of France?", "2 + 3 ="]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def loaded(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_an_exported_student_loads_with_its_own_logits_tokenizer_and_chat_template(tmp_path):
    model, tok = load_model("tiny", seed=0)
    with torch.no_grad():  # a "trained" student: weights moved away from the seed's initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_model(model, tok, tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    back, back_tok = loaded(tmp_path / "model")
    torch.testing.assert_close(logits(back, back_tok), logits(model, tok), rtol=0, atol=1e-6)
    messages = [{"role": "user", "content": "hi"}]
    assert back_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert back.generation_config.eos_token_id == tok.eos_token_id  # generation stops where the run's did


def test_a_lora_student_exports_its_adapter_and_on_request_the_merged_model(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    from lightning_sd.lora import add_ema_adapter, apply_lora

    base, tok = load_model("tiny", seed=0)
    model = apply_lora(base, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    add_ema_adapter(model)  # the EMA teacher's adapter is not exported
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.05 * torch.randn_like(p))
    want = logits(model, tok)
    export_model(model, tok, tmp_path / "model", merge_lora=True)
    assert (tmp_path / "model" / "adapter_config.json").is_file() and not (tmp_path / "model" / "ema").exists()
    fresh, _ = load_model("tiny", seed=0)
    adapter = PeftModel.from_pretrained(fresh, tmp_path / "model")
    torch.testing.assert_close(logits(adapter, tok), want, rtol=0, atol=1e-6)
    merged, merged_tok = loaded(tmp_path / "model" / "merged")
    torch.testing.assert_close(logits(merged, merged_tok), want, rtol=0, atol=1e-5)
    assert "ema" in model.peft_config  # the run's model is left as it was


def test_a_run_ends_with_its_model_folder_and_a_checkpoint_exports_the_same_weights(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_train(RUN, run_dir)
    assert metrics["model_folder"] == str(run_dir / "model")
    at_end, tok = loaded(run_dir / "model")

    config = tmp_path / "config.yaml"  # what Hydra writes to <run folder>/.hydra/config.yaml
    OmegaConf.save(compose_config(RUN), config)
    out = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt", config=config)
    from_ckpt, _ = loaded(out)
    torch.testing.assert_close(logits(from_ckpt, tok), logits(at_end, tok), rtol=0, atol=0)
    untrained, _ = load_model("tiny", seed=0)
    assert not torch.allclose(logits(untrained, tok), logits(at_end, tok), atol=1e-4)  # it did train

    teacher = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "teacher", config=config,
                                teacher=True)  # the default EMA teacher: between the initial and the final student
    ema, _ = loaded(teacher)
    assert not torch.equal(logits(ema, tok), logits(at_end, tok))


def test_export_from_the_command_line_and_its_errors(tmp_path):
    run_dir = tmp_path / "run"
    run_train(RUN + ["teacher=frozen", "callbacks.export_model=false", "callbacks.keep_previous_checkpoint=false"],
              run_dir)
    assert not (run_dir / "model").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]  # no previous.ckpt
    config = run_dir / ".hydra" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    OmegaConf.save(compose_config(RUN + ["teacher=frozen"]), config)

    cmd = [sys.executable, "-m", "lightning_sd.export"]
    ok = subprocess.run(cmd + [str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "out")], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and "exported student" in ok.stdout
    bad = subprocess.run(cmd + [str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "t"), "--teacher"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "teacher is not saved" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x", config=config)


def test_the_quickstart_commands_that_use_the_trained_model_run(tmp_path):
    import re

    text = (ROOT / "docs" / "quickstart.md").read_text()
    section = text[text.index("## Use your trained model"):]
    python_block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bash_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    run_dir = tmp_path / "outputs" / "my-run"
    run_train(RUN, run_dir)
    config = run_dir / ".hydra" / "config.yaml"  # Hydra writes it in a real run; run_train does not
    config.parent.mkdir(exist_ok=True)
    OmegaConf.save(compose_config(RUN), config)
    env = {"PYTHONPATH": str(ROOT)}
    use = subprocess.run([sys.executable, "-c", python_block], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **env})
    assert use.returncode == 0, use.stderr[-2000:]
    assert bash_block.startswith("python -m lightning_sd.export ")
    export = subprocess.run([sys.executable, *bash_block.split()[1:]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env})
    assert export.returncode == 0, export.stderr[-2000:]
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
