"""What a preemptible cluster job meets: run folders that are moved or copied between a preemption and the
resume, corrupt checkpoints, SIGTERM/SIGINT from the scheduler, and runs whose every step is skipped."""

from __future__ import annotations

import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from test_wandb import TINY, run_train

from lightning_sd.callbacks.checkpoint_io import CheckpointError, payload_digest, seal, verify_checkpoint

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
