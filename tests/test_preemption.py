"""What a preemptible cluster job meets: run folders that are moved or copied between a preemption and the
resume, corrupt checkpoints, SIGTERM/SIGINT from the scheduler, and runs whose every step is skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_wandb import TINY, run_train
from train import resolve_ckpt_path

from lightning_sd.callbacks.checkpoint_io import CheckpointError, payload_digest, seal, verify_checkpoint
from lightning_sd.callbacks.run_checkpoint import Interrupted, RunCheckpoint

ROOT = Path(__file__).resolve().parents[1]

BASE = TINY + ["eval.before=false", "eval.after=false", "callbacks.token_view_every=null", "optimizer.lr=1e-3",
               "trainer.checkpoint_every_n_steps=1"]


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_resume_from_a_copied_run_folder_twice_makes_progress_both_times(tmp_path):
    """`cp -a` of a run folder, resumed with `ckpt_path=last` in the copy (then the copy of the copy): each
    resume continues from the previous one's newest state, `last.ckpt` is that state, and no `last-v1.ckpt`
    appears; the result equals an uninterrupted run."""
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    run_train(BASE + ["trainer.max_steps=2"], first)
    shutil.copytree(first, second, symlinks=True)
    run_train(BASE + ["trainer.max_steps=4", "ckpt_path=last"], second)
    assert step_of(second / "checkpoints" / "last.ckpt") == 4
    shutil.copytree(second, third, symlinks=True)
    run_train(BASE + ["trainer.max_steps=6", "ckpt_path=last"], third)

    assert step_of(first / "checkpoints" / "last.ckpt") == 2  # the originals are left as they were
    assert step_of(second / "checkpoints" / "last.ckpt") == 4
    assert step_of(third / "checkpoints" / "last.ckpt") == 6
    assert not [n for n in checkpoint_files(third) if n.startswith("last-")]
    saved = torch.load(third / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert str(tmp_path) not in repr(saved["callbacks"])  # no absolute path is kept in the checkpoint

    straight = tmp_path / "straight"
    run_train(BASE + ["trainer.max_steps=6"], straight)
    reference = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in reference["state_dict"].items():
        torch.testing.assert_close(saved["state_dict"][k], v, atol=1e-6, rtol=0)


def corrupt_tensor_bytes(path: Path) -> None:
    """Overwrite the middle of the largest tensor stored in the checkpoint (a zip archive) with garbage, as a
    bad disk or a broken copy would: the file still loads."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 4)
        f.write(b"\xff" * (info.file_size // 2))  # 0xffffffff is a NaN in float32


def test_damaged_checkpoint_is_refused_and_the_previous_one_is_used(tmp_path):
    run_dir = tmp_path / "run"
    run_train(BASE + ["trainer.max_steps=2"], run_dir)
    assert checkpoint_files(run_dir) == ["last.ckpt", "previous.ckpt"]  # the newest state and one fallback
    last = run_dir / "checkpoints" / "last.ckpt"
    assert step_of(last) == 2 and step_of(run_dir / "checkpoints" / "previous.ckpt") == 1
    corrupt_tensor_bytes(last)
    torch.load(last, map_location="cpu", weights_only=False)  # torch itself does not notice

    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))}: damaged: .*previous\.ckpt"):
        run_train(BASE + ["trainer.max_steps=3", f"ckpt_path={last}"], tmp_path / "other")
    with pytest.warns(UserWarning, match=r"FALLING BACK to .*previous\.ckpt \(step 1\): .*last\.ckpt: damaged"):
        run_train(BASE + ["trainer.max_steps=3", "ckpt_path=last"], run_dir)
    assert checkpoint_files(run_dir) == ["last.ckpt", "last.ckpt.corrupt", "previous.ckpt"]
    assert step_of(last) == 3 and step_of(run_dir / "checkpoints" / "previous.ckpt") == 2
    verify_checkpoint(last)

    last.unlink()  # as if the job was killed between the two renames of a save
    with pytest.warns(UserWarning, match=r"FALLING BACK to .*previous\.ckpt \(step 2\): .*last\.ckpt is missing"):
        assert resolve_ckpt_path("last", str(run_dir)) == str(run_dir / "checkpoints" / "previous.ckpt")


def test_non_finite_checkpoint_is_neither_written_nor_resumed(tmp_path):
    run_dir = tmp_path / "run"
    run_train(BASE + ["trainer.max_steps=1"], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.endswith("embed_tokens.weight"))
    ckpt["state_dict"][name][0, :3] = float("nan")
    with pytest.raises(CheckpointError, match=rf"not writing x/last\.ckpt: .* non-finite values \(3 in {name}"):
        seal(ckpt, "x/last.ckpt")
    ckpt["integrity"]["sha256"] = payload_digest(ckpt)  # a consistent record: the values themselves are refused
    torch.save(ckpt, last)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))}: holds \d+ non-finite values \(3 in {name}"):
        run_train(BASE + ["trainer.max_steps=2", f"ckpt_path={last}"], run_dir)


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    noise, weights = tmp_path / "noise.ckpt", tmp_path / "weights.pt"
    noise.write_bytes(os.urandom(5000))
    torch.save({"weight": torch.zeros(2)}, weights)
    for path in (noise, weights):
        with pytest.raises(CheckpointError, match="not a checkpoint of this project") as err:
            run_train(BASE + [f"ckpt_path={path}"], tmp_path / "run")
        assert str(path) in str(err.value) and "weights_only" not in str(err.value)


def start_train(args: list[str], run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_during_training(args: list[str], run_dir: Path, signum: int, timeout_s: float = 600) -> tuple:
    """Start `train.py` with a token view written every step, send `signum` once a step is done; returns
    (exit status, seconds from the signal to the exit, output)."""
    proc = start_train(args + ["callbacks.token_view_every=1"], run_dir)
    deadline = time.monotonic() + timeout_s
    try:
        while not list((run_dir / "token_views").glob("step_*.html")):
            assert proc.poll() is None, f"train.py exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "train.py never finished a step"
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, time.monotonic() - t0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


GRACE_S = 10
RUN = [a for a in BASE if not a.startswith(("trainer.checkpoint_every_n_steps", "callbacks.token_view_every"))] + [
    "trainer.max_steps=1000", "trainer.checkpoint_every_n_steps=null"]


def test_sigterm_saves_last_checkpoint_and_exits_143_within_the_grace_period(tmp_path):
    """SIGTERM mid-run: the step finishes, `last.ckpt` holds it (no periodic save would have: checkpoints are
    written at step 1000 only), `metrics.json` is marked interrupted, the resume command is printed, the exit
    status is 143, all within the grace period; the checkpoint resumes bit for bit."""
    run_dir = tmp_path / "run"
    status, seconds, out = signal_during_training(RUN, run_dir, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out[-3000:]
    assert seconds < GRACE_S, f"{seconds:.1f} s from SIGTERM to exit"
    last = run_dir / "checkpoints" / "last.ckpt"
    step = step_of(last)
    verify_checkpoint(last)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] == {"signal": "SIGTERM", "exit_status": 143, "step": step,
                                      "checkpoint": str(last), "abandoned_step": False}
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in out and "trainer.max_steps=1000" in out

    resumed, straight = run_dir, tmp_path / "straight"
    common = [a for a in RUN if not a.startswith("trainer.max_steps")] + [f"trainer.max_steps={step + 2}"]
    run_train(common + ["ckpt_path=last"], resumed)
    run_train(common, straight)
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(last, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == step + 2
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0)


def test_sigint_saves_last_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    status, seconds, out = signal_during_training(RUN, run_dir, signal.SIGINT)
    assert status == 128 + signal.SIGINT and seconds < GRACE_S, out[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"]["signal"] == "SIGINT"
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == metrics["interrupted"]["step"] >= 1


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From step 2 on every loss is NaN: the run skips `loss.nonfinite_limit` steps in a row, then stops with an
    error naming the checkpoint to resume from; that checkpoint verifies (finite weights)."""
    from lightning_sd.module import SelfDistillationModule

    compute_loss = SelfDistillationModule.compute_loss

    def nan_from_step_2(self, *args, **kwargs):
        out = compute_loss(self, *args, **kwargs)
        if self.global_step >= 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SelfDistillationModule, "compute_loss", nan_from_step_2)
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(from step 2\) had a non-finite loss .*"
                                                 r"loss\.nonfinite_limit=3\).*checkpoints/last\.ckpt keeps the last good"):
        run_train(BASE + ["trainer.max_steps=20", "loss.nonfinite_limit=3"], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert 2 <= step_of(last) < 20
    verify_checkpoint(last)
    assert not (run_dir / "metrics.json").exists()  # the run did not end as if it had finished


def test_a_second_signal_abandons_the_step_at_once(tmp_path):
    """The first signal only asks for a stop at the end of the step; the second raises `Interrupted` (exit
    status 143) right away, naming the checkpoint already on disk."""
    callback = RunCheckpoint(tmp_path / "checkpoints")
    callback._on_signal(signal.SIGTERM, None)
    with pytest.raises(Interrupted) as stop:
        callback._on_signal(signal.SIGTERM, None)
    assert stop.value.code == 143 and stop.value.abandoned and stop.value.checkpoint is None
    assert stop.value.record()["signal"] == "SIGTERM"


def test_a_resumed_run_keeps_the_evaluation_before_training(tmp_path):
    """The resumed part does not evaluate before training again: it carries the first part's result over."""
    run_dir = tmp_path / "run"
    with_eval = [a for a in BASE if a != "eval.before=false"] + ["eval.before=true"]
    first = run_train(with_eval + ["trainer.max_steps=1"], run_dir)
    run_train(with_eval + ["trainer.max_steps=2", "ckpt_path=last"], run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_before"] == json.loads(json.dumps(first["eval_before"], default=str))
    assert metrics["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")


def test_a_resume_hashes_its_checkpoint_once_and_a_file_changed_since_is_checked_again(tmp_path, monkeypatch):
    """`train.py` verifies the checkpoint before Lightning loads it through the checkpoint IO: the load does not
    hash the same unchanged file again; a file that changed after it was verified is verified again."""
    from lightning_sd.callbacks import checkpoint_io
    from lightning_sd.callbacks.checkpoint_io import AtomicCheckpointIO

    run_dir = tmp_path / "run"
    run_train(BASE + ["trainer.max_steps=1"], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    digests = []
    real = checkpoint_io.payload_digest
    monkeypatch.setattr(checkpoint_io, "payload_digest", lambda ckpt: digests.append(1) or real(ckpt))
    assert resolve_ckpt_path("last", str(run_dir)) == str(last)
    loaded = AtomicCheckpointIO().load_checkpoint(str(last))
    assert len(digests) == 1 and loaded["global_step"] == 1

    corrupt_tensor_bytes(last)
    os.utime(last, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later write, whatever the clock's resolution
    with pytest.raises(CheckpointError, match="damaged"):
        AtomicCheckpointIO().load_checkpoint(str(last))
    assert len(digests) == 2
