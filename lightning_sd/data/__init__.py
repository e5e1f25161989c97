"""The data layer: records and JSONL files, prompt formatting and encoding, built-in tasks with verifiers,
and the `PromptDataModule` that batches them for on-policy training.

`PromptDataModule` / `PromptCollator` are imported on first use, so records, prompts and tasks load
without importing Lightning.
"""

from typing import Any

from lightning_sd.data.prompts import (EncodedPrompts, PromptEncoder, encode_prompts, ensure_pad_token, format_prompt,
                                       has_chat_template)
from lightning_sd.data.records import DataError, load_jsonl, save_jsonl, validate_records
from lightning_sd.data.tasks import (TASKS, ArithmeticTask, FictionalFactsTask, JsonFormatTask, KnownFactsTask,
                                     RealCapitalsTask, Task, Verdict, extract_answer, get_task, safe_verify)

__all__ = ["TASKS", "ArithmeticTask", "DataError", "EncodedPrompts", "FictionalFactsTask", "JsonFormatTask",
           "KnownFactsTask", "PromptCollator", "PromptDataModule", "PromptEncoder", "RealCapitalsTask", "ResumableSampler", "Task", "Verdict",
           "encode_prompts", "ensure_pad_token", "extract_answer", "format_prompt", "get_task", "has_chat_template",
           "load_jsonl", "prompt_batch", "safe_verify", "save_jsonl", "validate_records"]


def __getattr__(name: str) -> Any:
    if name in ("PromptDataModule", "PromptCollator", "prompt_batch"):
        from lightning_sd.data import datamodule
        return getattr(datamodule, name)
    if name == "ResumableSampler":
        from lightning_sd.data.sampler import ResumableSampler
        return ResumableSampler
    raise AttributeError(f"module 'lightning_sd.data' has no attribute {name!r}")
