"""What a preemptible cluster job meets: run folders that are moved or copied between a preemption and the
resume, corrupt checkpoints, SIGTERM/SIGINT from the scheduler, and runs whose every step is skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from test_wandb import TINY, run_train

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
