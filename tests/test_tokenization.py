"""Tokenizers: exact round trips, special tokens, loading with AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from lm_lstm.tokenization import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "  leading and trailing spaces, tabs\tand\r\nWindows newlines  ",
    "Ünïcödé: 日本語のテキスト, emoji 🤖🎭, RTL שלום, combining e\u0301",
    "",
]


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return train_tokenizer([shakespeare_text[:200_000]], kind="bpe", vocab_size=600)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_bpe_round_trips_any_utf8(bpe, text):
    ids = bpe(text, add_special_tokens=False).input_ids
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_and_respects_the_vocabulary_size(bpe):
    assert len(bpe) == 600
    assert len(bpe("the king and the queen").input_ids) < len("the king and the queen")


def test_char_tokenizer_is_one_token_per_character(char_tokenizer, shakespeare_text):
    text = shakespeare_text[:500]
    ids = char_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and char_tokenizer.decode(ids) == text
    assert len(char_tokenizer) == 65 + len(SPECIAL_TOKENS)
    assert char_tokenizer.decode(char_tokenizer("é", add_special_tokens=False).input_ids) == "<unk>"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_tokenizer_loads_with_auto_tokenizer_and_keeps_special_tokens(kind, shakespeare_text, tmp_path):
    tokenizer = train_tokenizer([shakespeare_text[:50_000]], kind=kind, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for name, token in SPECIAL_TOKENS.items():
        assert getattr(loaded, name) == token
        assert getattr(loaded, f"{name}_id") == tokenizer.convert_tokens_to_ids(token)
    assert len({loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id}) == 4
    assert loaded("ROMEO: O").input_ids == tokenizer("ROMEO: O").input_ids
    assert loaded.padding_side == "left"
    assert load_tokenizer(tmp_path).eos_token == "</s>"


def test_bad_tokenizer_options():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["abc"], kind="words")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], kind="bpe", vocab_size=100)
