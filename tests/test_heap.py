"""`retain_freed_memory` (`trainer.retain_heap`): after it, freed CPU tensors stay in the process's heap for
reuse; without it, glibc returns a large freed block to the OS at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

PROBE = textwrap.dedent("""
    import sys, torch
    from lightning_sd.heap import retain_freed_memory
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    before = rss_mib()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest adaptive mmap threshold (32 MiB)
    del x
    print(applied, round(rss_mib() - before))
""")


def freed_block_kept(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, kept = out.split()
    return applied, int(kept)


def test_freed_memory_stays_in_the_heap_only_when_retained():
    applied, kept = freed_block_kept("retain")
    assert applied == "True"
    assert kept >= 60  # the 64 MiB block went back to the heap, not to the OS
    applied, kept = freed_block_kept("default")
    assert applied == "None" and kept < 8


@pytest.mark.parametrize("retain", [True, False])
def test_the_run_applies_trainer_retain_heap(monkeypatch, retain):
    from hydra import compose, initialize_config_dir

    import lightning_sd.heap as heap
    from lightning_sd.build import build_run

    calls = []
    monkeypatch.setattr(heap, "retain_freed_memory", lambda *a, **k: calls.append(1) or True)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "data.n_train=4", "data.n_eval=2",
                                                      f"trainer.retain_heap={str(retain).lower()}"])
    build_run(cfg)
    assert calls == ([1] if retain else [])
