"""Exact resume: 6 steps straight == 3 steps + resume from `last.ckpt` + 3 steps (losses, data order, random
draws, student and EMA teacher weights), and a SIGKILL during a checkpoint write leaves a loadable
`last.ckpt`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from conftest import StopAfter

from lightning_sd.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_sd.callbacks.rng import RngState
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.models import load_model
from lightning_sd.module import SelfDistillationModule
from lightning_sd.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]



class Probe(Callback):
    """Per training batch: the record ids, one draw from each global generator (so that a wrong restore
    shows), and the loss."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"ids": [r["id"] for r in batch.records], "torch": float(torch.rand(())),
                           "numpy": float(np.random.rand()), "python": random.random()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = float(outputs["loss"])
        self.steps[-1]["completion"] = batch.completion_text[0]


def build(n_records: int):
    """A fresh module + data module, as a new process would build them (same initial weights)."""
    model, tok = load_model("tiny", seed=0)
    for m in model.modules():  # dropout makes the student forward draw from the global torch generator
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.2
    records = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(n_records)]
    dm = PromptDataModule(tok, records=records, batch_size=2, seed=3)
    module = SelfDistillationModule(
        model, tok, teacher="ema", teacher_kwargs={"rate": 0.3}, loss={"template": "answer_hint", "beta": 0.5},
        optimizer={"lr": 3e-3}, scheduler={"name": "linear", "warmup_steps": 2}, task=None)
    return module, dm


def fit(tmp: Path, n_records: int, stop_after: int | None = None, ckpt_path=None):
    module, dm = build(n_records)
    probe = Probe()
    callbacks = [RngState(), OnPolicyGeneration(SamplingConfig(n=2, max_new_tokens=6, temperature=1.3)), probe,
                 StopAfter(stop_after),
                 ModelCheckpoint(dirpath=tmp / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=1)]
    trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                      num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, probe


@pytest.mark.parametrize("n_records", [8, 6], ids=["mid-epoch", "epoch-boundary"])
def test_three_plus_three_steps_equal_six(tmp_path, n_records):
    """8 records / batch 2: the checkpoint after step 3 is mid-epoch; 6 records: it ends epoch 0. Either way the
    resumed run must replay the uninterrupted one."""
    seed_everything(0)
    straight, p_straight = fit(tmp_path / "a", n_records)
    seed_everything(0)
    fit(tmp_path / "b", n_records, stop_after=3)
    seed_everything(123)  # a different process state: everything must come from the checkpoint
    resumed, p_resumed = fit(tmp_path / "b", n_records, ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))

    assert len(p_straight.steps) == 6 and len(p_resumed.steps) == 3
    for a, b in zip(p_straight.steps[3:], p_resumed.steps):
        assert a["ids"] == b["ids"]  # data order
        assert (a["torch"], a["numpy"], a["python"]) == (b["torch"], b["numpy"], b["python"])  # every generator
        assert a["completion"] == b["completion"]  # on-policy samples
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert len({s["loss"] for s in p_straight.steps}) > 1  # the losses move: the comparison means something
    for name, p in straight.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[name], p, atol=1e-6, rtol=0)
    ema_a, ema_b = straight.teacher.model.state_dict(), resumed.teacher.model.state_dict()
    for name, p in ema_a.items():
        torch.testing.assert_close(ema_b[name], p, atol=1e-6, rtol=0)
    moved = max((ema_a[k] - v).abs().max().item() for k, v in build(n_records)[0].teacher.model.state_dict().items())
    assert moved > 1e-4  # the EMA teacher really moved away from the initial weights


KILL_WORKER = r'''
import io, os, sys, time
import torch
from pathlib import Path
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sd.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.models import load_model
from lightning_sd.module import SelfDistillationModule
from lightning_sd.sampling import SamplingConfig

torch.set_num_threads(1)
out, mode = Path(sys.argv[1]), sys.argv[2]
real_save, saves = torch.save, [0]


def slow_save(obj, f, *args, **kwargs):
    """torch.save that stops halfway through the file on the second checkpoint (and waits to be killed)."""
    saves[0] += 1
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    fh.write(data[: len(data) // 2])
    fh.flush()
    if saves[0] >= 2:
        (out / "writing").write_text(str(saves[0]))
        time.sleep(300)
    fh.write(data[len(data) // 2:])
    if fh is not f:
        fh.close()


torch.save = slow_save


class NaiveIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)


model, tok = load_model("tiny", seed=0)
dm = PromptDataModule(tok, records=[{"prompt": f"q{i}", "answer": "1"} for i in range(8)], batch_size=2)
module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": 0.1},
                                loss={"template": "answer_hint"})
trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=4)),
                             ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                             every_n_train_steps=1)],
                  plugins=[AtomicCheckpointIO() if mode == "atomic" else NaiveIO()])
trainer.fit(module, datamodule=dm)
'''


def start_worker(folder: Path, mode: str) -> subprocess.Popen:
    folder.mkdir()
    script = folder / "worker.py"
    script.write_text(KILL_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(folder), mode], env=env, cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when_writing(workers: dict[Path, subprocess.Popen], timeout_s: float = 300) -> None:
    """SIGKILL each worker as soon as it is halfway through writing its second checkpoint."""
    deadline = time.monotonic() + timeout_s
    try:
        pending = dict(workers)
        while pending:
            for folder, proc in list(pending.items()):
                if (folder / "writing").exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    del pending[folder]
                elif proc.poll() is not None:
                    pytest.fail(f"worker exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "a worker never reached its second checkpoint"
            time.sleep(0.2)
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert all(proc.returncode == -signal.SIGKILL for proc in workers.values())


def test_sigkill_during_checkpoint_write_leaves_loadable_last_checkpoint(tmp_path):
    """Two training subprocesses are killed halfway through writing their step-2 checkpoint: with
    `AtomicCheckpointIO` `last.ckpt` is still the complete step-1 checkpoint; the control, a writer that
    overwrites in place, is left corrupt (so the kill really lands mid-write)."""
    atomic, naive = tmp_path / "atomic", tmp_path / "naive"
    kill_when_writing({atomic: start_worker(atomic, "atomic"), naive: start_worker(naive, "naive")})

    last = atomic / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # the previous, complete checkpoint
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"])  # the EMA teacher is training state
    assert ckpt["optimizer_states"] and "PromptDataModule" in ckpt
    stale = list(last.parent.glob(".last.ckpt.tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the killed write went to a temp file
    from lightning_sd.callbacks.checkpoint_io import remove_stale_temps

    assert remove_stale_temps(last) == stale and not stale[0].exists()  # what the next save does first

    with pytest.raises(Exception):
        torch.load(naive / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_train_py_ckpt_path_last_continues_the_run_folder(tmp_path):
    """Through `train.py`: 2 steps, then `ckpt_path=last` in the same run folder up to 4 steps, equals 4 steps
    straight (losses per step, final weights); the first part's metrics.csv is kept."""
    from test_wandb import TINY, run_train

    base = TINY + ["trainer.checkpoint_every_n_steps=1", "eval.before=false", "eval.after=false",
                   "callbacks.token_view_every=null", "optimizer.lr=1e-3"]
    run_train(base + ["trainer.max_steps=4"], tmp_path / "straight")
    run_train(base + ["trainer.max_steps=2"], tmp_path / "split")
    run_train(base + ["trainer.max_steps=4", "ckpt_path=last"], tmp_path / "split")

    def losses(path: Path) -> dict[int, float]:
        rows = [line.split(",") for line in path.read_text().splitlines()]
        col = rows[0].index("train/loss")
        return {int(r[1]): float(r[col]) for r in rows[1:] if r[col]}

    straight = losses(tmp_path / "straight" / "metrics.csv")
    first, second = losses(tmp_path / "split" / "metrics.1.csv"), losses(tmp_path / "split" / "metrics.csv")
    assert sorted(first) == [0, 1] and sorted(second) == [2, 3]
    for step, value in {**first, **second}.items():
        assert value == pytest.approx(straight[step], abs=1e-6)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt': no such file"):
        run_train(base + ["ckpt_path=nope.ckpt"], tmp_path / "other")
