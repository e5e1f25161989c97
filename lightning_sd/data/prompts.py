"""Prompt text and prompt tokens: chat template, left padding, truncation, pad token.

Student and teacher prompts must be built the same way (the chat template applied to both sides, or to
neither), so everything goes through `format_prompt` then `encode_prompts`, which `PromptEncoder` holds together
with a run's prompt settings (system prompt, length limit, truncation, pad token):

- `format_prompt` applies the tokenizer's chat template with `add_generation_prompt=True`. A tokenizer
  without a chat template gets plain text: `"{system}\\n\\n{text}\\n"` (or `"{text}\\n"`), preceded by the
  BOS token text when the tokenizer itself would add a BOS.
- `encode_prompts` tokenizes the formatted text with `add_special_tokens=False` (the formatted text already
  holds the special tokens; adding them again would duplicate BOS on Llama-style tokenizers) and left-pads,
  so that generated tokens line up on the right for every row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sd.data.records import DataError


@dataclass
class EncodedPrompts:
    ids: torch.Tensor  # LongTensor[B, P], left-padded
    mask: torch.Tensor  # LongTensor[B, P], 0 on padding
    n_truncated: int  # rows cut from the left to fit max_length
    texts: list[str] = field(default_factory=list)  # the formatted prompts (`PromptEncoder.encode`)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer: Any) -> bool:
    """True when plain `tokenizer(text)` would put a BOS in front (Llama-style tokenizers)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def format_prompt(tokenizer: Any, text: str, system: str | None = None) -> str:
    """The prompt as the model should see it, ending where the assistant's reply begins."""
    if has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = f"{system}\n\n{text}\n" if system else f"{text}\n"
    return (tokenizer.bos_token + body) if _adds_bos(tokenizer) else body


def record_system(record: dict, default: str | None = None) -> str | None:
    """The system prompt of a record: its own `system` field (a chat dataset's system message), else `default`
    (`data.system_prompt`)."""
    return record.get("system") or default


def ensure_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad id. Without one, sets `tokenizer.pad_token = tokenizer.eos_token` (warning once:
    the next call finds it set); without either, raises `DataError`. Padding is always masked, so reusing
    EOS is safe."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        warnings.warn(f"tokenizer {_name(tokenizer)} has no pad token; using its eos token"
                      f" {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) for padding", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
        return int(tokenizer.eos_token_id)
    raise DataError(f"tokenizer {_name(tokenizer)} has neither a pad token nor an eos token; set one, e.g."
                    f" `tokenizer.pad_token = '<pad>'` for a token in its vocabulary")


def _name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


TRUNCATIONS = ("left", "error")  # a prompt longer than its limit loses its beginning (the default), or is an error
TRUNCATION = TRUNCATIONS[0]


def check_truncation(truncation: str) -> None:
    """`DataError` unless `truncation` is one of `TRUNCATIONS`."""
    if truncation not in TRUNCATIONS:
        raise DataError(f"truncation={truncation!r} must be 'left' or 'error'")


def encode_prompts(tokenizer: Any, texts: list[str], *, max_length: int | None = None, truncation: str = TRUNCATION,
                   pad_token_id: int | None = None, warn: bool = True) -> EncodedPrompts:
    """Tokenize formatted prompts and left-pad them to the longest row.

    Rows longer than `max_length` keep their last `max_length` tokens (`truncation="left"`, one warning per
    call with the count unless `warn=False`) or raise `DataError` naming the row (`truncation="error"`).
    `pad_token_id` defaults to `ensure_pad_token(tokenizer)`.
    """
    check_truncation(truncation)
    if max_length is not None and max_length < 1:
        raise DataError(f"max_prompt_length={max_length} must be a positive number of tokens (or None)")
    if not texts:
        raise DataError("encode_prompts got no prompts")
    pad = ensure_pad_token(tokenizer) if pad_token_id is None else pad_token_id
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n_truncated = 0
    for i, row in enumerate(rows):
        if not row:
            raise DataError(f"prompt row {i} encodes to zero tokens: {texts[i]!r}")
        if max_length is not None and len(row) > max_length:
            if truncation == "error":
                raise DataError(f"prompt row {i} has {len(row)} tokens, more than max_prompt_length={max_length};"
                                f" raise max_prompt_length or set truncation='left'")
            rows[i] = row[-max_length:]
            n_truncated += 1
    if n_truncated and warn:
        warnings.warn(f"{n_truncated} of {len(rows)} prompts were longer than max_prompt_length={max_length}"
                      f" tokens and lost their beginning (truncation='left')", stacklevel=2)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return EncodedPrompts(ids=ids, mask=mask, n_truncated=n_truncated)


@dataclass
class PromptEncoder:
    """A run's prompt settings and the one way prompts become tokens: each text chat-formatted (`format_prompt`,
    with its record's system prompt, else `system_prompt`), tokenized and left-padded (`encode_prompts`; longer
    than `max_length`: cut from the left, or an error with `truncation="error"`). `pad_token_id` defaults to
    `ensure_pad_token(tokenizer)`. Student prompts, teacher prompts and evaluation prompts all go through one."""

    tokenizer: Any
    system_prompt: str | None = None
    max_length: int | None = None
    truncation: str = TRUNCATION
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = ensure_pad_token(self.tokenizer)

    def format(self, text: str, record: dict | None = None) -> str:
        """`text` as the model sees it, with `record`'s own system prompt when it has one."""
        return format_prompt(self.tokenizer, text, record_system(record or {}, self.system_prompt))

    def encode(self, texts: list[str], records: list[dict | None] | None = None, *, warn: bool = True,
               formatted: bool = False) -> EncodedPrompts:
        """`[B, P]` left-padded ids and mask of `texts` (each formatted with the record at the same index, unless
        `formatted`), with the formatted texts."""
        if not formatted:
            texts = [self.format(t, r) for t, r in zip(texts, records or [None] * len(texts))]
        enc = encode_prompts(self.tokenizer, texts, max_length=self.max_length, truncation=self.truncation,
                             pad_token_id=self.pad_token_id, warn=warn)
        enc.texts = list(texts)
        return enc

    def records(self, records: list[dict], *, warn: bool = True) -> EncodedPrompts:
        """The student prompts of `records` (their `prompt` field)."""
        return self.encode([r["prompt"] for r in records], records, warn=warn)

