"""Prompt formatting and encoding: chat template without a duplicated BOS, plain-text fallback, left
padding, left truncation, pad token."""

from __future__ import annotations

import warnings

import pytest
import torch
from _tokenizers import bos_word_tokenizer, byte_tokenizer, load_smollm2_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sd.data.prompts import encode_prompts, ensure_pad_token, format_prompt, has_chat_template
from lightning_sd.data.records import DataError


@pytest.fixture(scope="session")
def smol():
    return load_smollm2_tokenizer()


def test_chat_template_matches_apply_chat_template_and_bos_is_not_duplicated(smol):
    assert has_chat_template(smol)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = format_prompt(smol, "What is 2 + 3?")
    assert text == smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    reference = smol.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    enc = encode_prompts(smol, [text], pad_token_id=smol.pad_token_id)
    assert enc.ids[0].tolist() == list(reference)
    bos = smol.convert_tokens_to_ids("<|im_start|>")
    assert enc.ids[0, 0].item() == bos and enc.ids[0, 1].item() != bos


def test_system_prompt_replaces_the_default(smol):
    text = format_prompt(smol, "Hi", system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert text == smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_smollm2_batch_is_left_padded_with_eos_pad(smol):
    texts = [format_prompt(smol, "Hi"), format_prompt(smol, "A much longer question about many things?")]
    enc = encode_prompts(smol, texts, pad_token_id=ensure_pad_token(smol))
    assert smol.pad_token_id == smol.eos_token_id == 2
    short = smol(texts[0], add_special_tokens=False)["input_ids"]
    pad = enc.ids.shape[1] - len(short)
    assert pad > 0 and enc.ids[0, :pad].eq(2).all() and enc.mask[0, :pad].eq(0).all()
    assert enc.ids[0, pad:].tolist() == short and enc.mask[0, pad:].eq(1).all() and enc.mask[1].eq(1).all()


def test_plain_text_fallback():
    tok = byte_tokenizer(pad=True)
    assert not has_chat_template(tok)
    assert format_prompt(tok, "What is 2 + 3?") == "What is 2 + 3?\n"
    assert format_prompt(tok, "Q", system="S") == "S\n\nQ\n"
    enc = encode_prompts(tok, [format_prompt(tok, "Q")])
    assert enc.ids.tolist() == [tok("Q\n", add_special_tokens=False)["input_ids"]]


def test_plain_text_fallback_keeps_exactly_one_bos():
    tok = bos_word_tokenizer()
    text = format_prompt(tok, "what is 2 + 3 ?")
    assert text == "<s>what is 2 + 3 ?\n"
    ids = encode_prompts(tok, [text], pad_token_id=0).ids[0].tolist()
    assert ids == tok("what is 2 + 3 ?")["input_ids"] and ids.count(1) == 1


def test_left_padding_and_mask():
    tok = byte_tokenizer(pad=True)
    pad = tok.pad_token_id
    enc = encode_prompts(tok, ["ab", "abcd", "a"])
    a, b, c, d = tok("abcd", add_special_tokens=False)["input_ids"]
    assert enc.ids.tolist() == [[pad, pad, a, b], [a, b, c, d], [pad, pad, pad, a]]
    assert enc.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert enc.ids.dtype == enc.mask.dtype == torch.long and enc.n_truncated == 0


def test_left_truncation_keeps_the_end_and_warns_once():
    tok = byte_tokenizer(pad=True)
    with pytest.warns(UserWarning, match=r"2 of 3 prompts were longer than max_prompt_length=4") as record:
        enc = encode_prompts(tok, ["abcdef", "xy", "123456789"], max_length=4)
    assert len(record) == 1 and enc.n_truncated == 2
    assert [tok.decode(row[m.bool()]) for row, m in zip(enc.ids, enc.mask)] == ["cdef", "xy", "6789"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_prompts(tok, ["abcdef"], max_length=4, warn=False).n_truncated == 1


def test_truncation_error_names_row_length_and_option():
    tok = byte_tokenizer(pad=True)
    with pytest.raises(DataError, match=r"prompt row 1 has 6 tokens, more than max_prompt_length=4.*truncation='left'"):
        encode_prompts(tok, ["ab", "abcdef"], max_length=4, truncation="error")


def test_bad_options():
    tok = byte_tokenizer(pad=True)
    with pytest.raises(DataError, match="truncation='right' must be 'left' or 'error'"):
        encode_prompts(tok, ["a"], truncation="right")
    with pytest.raises(DataError, match="max_prompt_length=0"):
        encode_prompts(tok, ["a"], max_length=0)
    with pytest.raises(DataError, match="row 1 encodes to zero tokens"):
        encode_prompts(tok, ["a", ""])


def test_ensure_pad_token():
    assert ensure_pad_token(byte_tokenizer(pad=True)) == byte_tokenizer(pad=True).pad_token_id
    tok = byte_tokenizer(eos=True)
    with pytest.warns(UserWarning, match=r"tokenizer 'tiny-bytes' has no pad token; using its eos token '<eos>'"):
        assert ensure_pad_token(tok) == tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once: the tokenizer now has a pad token
        assert ensure_pad_token(tok) == tok.eos_token_id == tok.pad_token_id
    with pytest.raises(DataError, match=r"tokenizer 'tiny-bytes' has neither a pad token nor an eos token.*pad_token"):
        ensure_pad_token(byte_tokenizer())


_TOK = byte_tokenizer(pad=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
                min_size=1, max_size=5),
       st.one_of(st.none(), st.integers(1, 20)))
def test_encode_property(texts, max_length):
    """Every row is its own tokens (last max_length of them), right-aligned, with a contiguous mask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = encode_prompts(_TOK, texts, max_length=max_length)
    width = enc.ids.shape[1]
    n_cut = 0
    for i, text in enumerate(texts):
        ids = _TOK(text, add_special_tokens=False)["input_ids"]
        kept = ids[-max_length:] if max_length else ids
        n_cut += len(kept) < len(ids)
        assert enc.ids[i, width - len(kept):].tolist() == kept
        assert enc.mask[i].tolist() == [0] * (width - len(kept)) + [1] * len(kept)
        assert enc.ids[i, : width - len(kept)].eq(_TOK.pad_token_id).all()
    assert enc.n_truncated == n_cut and width == enc.mask.sum(1).max()
