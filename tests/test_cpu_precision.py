"""The bf16 capability check and its warning, both ways, by faking what oneDNN reports."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from test_wandb import TINY, compose_config

from lightning_sd import cpu_precision
from lightning_sd.cpu_precision import (
    bf16_settings,
    native_bf16,
    warn_if_bf16_is_emulated,
)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_precision, "_warned", set())
    monkeypatch.setattr(cpu_precision, "bf16_slowdown", lambda: 9.0)


def test_the_settings_that_compute_in_bf16_are_named():
    assert bf16_settings("32-true", None, "float32") == []
    assert bf16_settings("bf16-mixed", "bf16", "bfloat16") == ["trainer.precision=bf16-mixed", "generation.dtype=bf16",
                                                               "model.dtype=bfloat16"]


def test_emulated_bf16_warns_once_with_the_slowdown_and_the_fp32_settings(fresh, monkeypatch):
    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"trainer.precision=bf16-mixed: .*no native bf16.*9.0x slower.*"
                                         r"trainer.precision=32-true"):
        assert warn_if_bf16_is_emulated(["trainer.precision=bf16-mixed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_bf16_is_emulated(["trainer.precision=bf16-mixed"])  # once
        assert not warn_if_bf16_is_emulated([])  # fp32: nothing to say


def test_native_bf16_does_not_warn(fresh, monkeypatch):
    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_bf16_is_emulated(["generation.dtype=bf16"])


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_run_is_warned_at_start_up_only_where_bf16_is_emulated(fresh, monkeypatch, native):
    from lightning_sd.build import build_run

    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: native)
    cfg = compose_config(TINY + ["trainer.precision=bf16-mixed"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_run(cfg)
    assert any("no native bf16" in str(w.message) for w in caught) == (not native)


def test_the_check_follows_the_oneDNN_limit_in_a_fresh_process():
    """Under `ONEDNN_MAX_CPU_ISA=AVX2` (what an AVX2-only CPU runs) oneDNN has no bf16 kernels."""
    code = "from lightning_sd.cpu_precision import native_bf16; print(native_bf16())"
    limited = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                             capture_output=True, text=True, timeout=120)
    assert limited.stdout.strip() == "False", limited.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == str(native_bf16())  # the same answer in and out of this process
