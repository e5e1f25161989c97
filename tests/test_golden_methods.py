"""Golden values: every method, built from the Hydra configs exactly as `train.py` builds it, gives the recorded
loss and gradients on two optimizer steps (tiny model, fixed seed). Guards refactors of the middle layer: a
change that alters any method's numbers fails here. The values were recorded before the redesign of the method
objects; rewrite them only for a change that is meant to alter a method's numbers:
`LIGHTNING_SD_WRITE_GOLDEN=1 pytest tests/test_golden_methods.py`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_sd.build import build_run
from lightning_sd.data.tasks import TASKS, ArithmeticTask, Verdict

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "methods.json"
COMMON = ["trainer.max_steps=2", "logger=none", "trainer.enable_checkpointing=false",
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
    "on_policy_kd": ["experiment=on_policy_kd_tiny"],
    "rl_feedback": ["experiment=rl_feedback_tiny"],
    "rl_feedback_mixed": ["experiment=rl_feedback_tiny", "loss.grpo_mix=0.5"],
    "grpo": ["experiment=grpo_tiny", "data.task=golden_parity"],
    "sft": ["experiment=sft_tiny"],
}


class ParityTask(ArithmeticTask):
    """Arithmetic prompts with a reward a random model's samples vary on (the completion's length parity), so
    that GRPO's group-normalized advantages are not all zero."""

    name = "golden_parity"

    def verify(self, record: dict, completion: str) -> Verdict:
        return Verdict(reward=float(len(completion) % 2))


class Record(Callback):
    """Per optimizer step: the loss and a fingerprint of the student's gradients (norm, and the projection on a
    fixed random direction per parameter)."""

    def __init__(self):
        self.steps: list[dict] = []
        self._loss = None

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
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + COMMON)
    seed_everything(cfg.seed, workers=True)
    run = build_run(cfg, run_dir=str(run_dir))
    recorder = Record()
    trainer = Trainer(**run.trainer_kwargs, callbacks=run.callbacks + [recorder], logger=False,
                      enable_model_summary=False)
    trainer.fit(run.module, datamodule=run.datamodule)
    return recorder.steps


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_gives_the_recorded_loss_and_gradients(case, monkeypatch, tmp_path):
    monkeypatch.setitem(TASKS, "golden_parity", ParityTask)
    steps = measure(CASES[case], tmp_path)
    assert len(steps) == 2
    assert any(n > 0 for s in steps for n in s["grad_norms"]), f"{case}: no gradient at all; the case tests nothing"
    if os.environ.get("LIGHTNING_SD_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[case] = steps
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(GOLDEN.read_text())[case]
    for i, (got, ref) in enumerate(zip(steps, want)):
        if ref["loss"] is not None:
            assert close(got["loss"], ref["loss"]), f"{case} step {i}: loss {got['loss']!r} != {ref['loss']!r}"
        for key in ("grad_norms", "grad_projections"):
            assert len(got[key]) == len(ref[key]), f"{case} step {i}: {key} count"
            bad = [j for j, (x, y) in enumerate(zip(got[key], ref[key])) if not close(x, y)]
            assert not bad, f"{case} step {i}: {key} differ for parameters {bad[:5]}"
