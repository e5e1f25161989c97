"""Shared fixtures: tiny random models built in-process (no downloads) and batches in the data-module format."""

from __future__ import annotations

import os
import tempfile

# torch.compile's on-disk cache is not keyed by the CPU kernel choice: code compiled under one ATEN_CPU_CAPABILITY
# (or oneDNN/MKL instruction limit) and loaded under another computes NaN or crashes. One cache per choice (the
# suite runs under several), set before Lightning is imported: importing it sets its own cache folder.
KERNEL_CHOICE = "_".join(os.environ.get(k, "native") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                                  "MKL_ENABLE_INSTRUCTIONS"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                               f"torchinductor_lightning_sd_{KERNEL_CHOICE}"))

import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is faster than two (no OpenMP spin)


class StopAfter(Callback):
    """Ends the run after `n` optimizer steps, as a preemption would (the schedule still plans for max_steps)."""

    def __init__(self, n: int | None):
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.n is not None and trainer.global_step >= self.n:
            trainer.should_stop = True


def make_batch(tokenizer, records: list[dict]):
    """A `StepBatch` as `PromptDataModule` yields it: records + left-padded chat-formatted prompt ids."""
    from lightning_sd.data.datamodule import prompt_batch

    return prompt_batch(tokenizer, records)


@pytest.fixture
def tiny():
    """(model, tokenizer): 2-layer random Llama with the in-process byte tokenizer."""
    from lightning_sd.models import load_model

    return load_model("tiny", seed=0)


RECORDS = [
    {"id": "a", "prompt": "What is 2 + 3?", "solution": "2 + 3 = 5. The answer is 5.", "answer": "5"},
    {"id": "b", "prompt": "Tom has 7 apples and buys 5 more. How many apples does he have?",
     "solution": "7 + 5 = 12. The answer is 12.", "answer": "12"},
    {"id": "c", "prompt": "9 - 4?", "solution": "9 - 4 = 5. The answer is 5.", "answer": "5"},
    {"id": "d", "prompt": "Compute 10 + 10 + 1, please, and show your work.",
     "solution": "10 + 10 = 20. 20 + 1 = 21. The answer is 21.", "answer": "21"},
]


@pytest.fixture
def records():
    return [dict(r) for r in RECORDS]
