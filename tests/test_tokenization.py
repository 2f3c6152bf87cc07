"""Tokenizers: exact round trips of any text, special tokens only by id, loading with AutoTokenizer, old folders."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lm_lstm.tokenization import (
    SPECIAL_TOKENS, document_start_id, encode_prompt, eos_ends_lines, load_tokenizer, tokenizer_kind,
    train_char_tokenizer, train_tokenizer, word_tokenizer,
)

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "  leading and trailing spaces, tabs\tand\r\nWindows newlines  ",
    "Ünïcödé: 日本語のテキスト, emoji 🤖🎭, RTL שלום, combining e\u0301",
    "",
]
SPECIAL_STRINGS = ["<s>", "</s>", "<pad>", "<unk>"]
MARKUP = "<p>Price: <s>old</s> new; use <pad> or <unk> tags</p>"
# Saved by lm-lstm 159cde5 (`train_char_tokenizer` on SAMPLES[0]): BOS "<s>", special-token strings read as special
# tokens, unseen characters mapped to "<unk>".
LEGACY_CHAR_TOKENIZER = Path(__file__).with_name("data") / "legacy_char_tokenizer"


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return train_tokenizer([shakespeare_text[:200_000]], kind="bpe", vocab_size=600)


@pytest.fixture(scope="module")
def tokenizers(bpe, char_tokenizer, tmp_path_factory):
    """Both kinds as trained, and as `AutoTokenizer` loads them back from a saved folder."""
    found = {"bpe": bpe, "char": char_tokenizer}
    for kind, tokenizer in list(found.items()):
        folder = tmp_path_factory.mktemp(kind)
        tokenizer.save_pretrained(folder)
        found[f"{kind} reloaded"] = AutoTokenizer.from_pretrained(folder)
    return found


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_bpe_round_trips_any_utf8(bpe, text):
    ids = bpe(text, add_special_tokens=False).input_ids
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_and_respects_the_vocabulary_size(bpe):
    assert len(bpe) == 600
    assert len(bpe("the king and the queen").input_ids) < len("the king and the queen")


TEXTS = st.lists(st.one_of(st.text(max_size=12), st.sampled_from([*SPECIAL_STRINGS, "<0xE9>", "<|endoftext|>"])),
                 max_size=8).map("".join)


@pytest.mark.parametrize("name", ["bpe", "char", "bpe reloaded", "char reloaded"])
@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_any_text_round_trips_and_holds_no_special_token(tokenizers, name, text):
    tokenizer = tokenizers[name]
    ids = tokenizer.encode(text)  # the default `add_special_tokens=True` adds nothing either
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["bpe", "char", "bpe reloaded", "char reloaded"])
def test_special_token_strings_in_text_are_text(tokenizers, name):
    tokenizer = tokenizers[name]
    ids = tokenizer(MARKUP).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == MARKUP
    assert not set(ids) & set(tokenizer.all_special_ids)
    if name.startswith("char"):
        assert len(ids) == len(MARKUP) == 53  # one token a character ("<", "/", ">" by byte fallback); was 40


def test_char_tokenizer_is_one_token_per_character_with_byte_fallback(char_tokenizer, shakespeare_text):
    text = shakespeare_text[:500]
    ids = char_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and char_tokenizer.decode(ids) == text
    # 3 special tokens, 65 characters (all ASCII), and byte tokens for the 256 - 65 other bytes
    assert len(char_tokenizer) == 3 + 65 + 191
    ids = char_tokenizer("é<", add_special_tokens=False).input_ids  # neither is in Tiny Shakespeare
    assert char_tokenizer.convert_ids_to_tokens(ids) == ["<0xC3>", "<0xA9>", "<0x3C>"]
    assert char_tokenizer.decode(ids) == "é<"


def test_char_tokenizer_gives_seen_non_ascii_characters_one_token():
    tokenizer = train_char_tokenizer(["añb", "日"])
    assert len(tokenizer) == 3 + 256 + 2  # "a" and "b" replace their byte tokens; "ñ" and "日" add one each
    assert tokenizer.convert_ids_to_tokens(tokenizer("ñ日a", add_special_tokens=False).input_ids) == ["ñ", "日", "a"]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_tokenizer_loads_with_auto_tokenizer_and_keeps_special_tokens(kind, shakespeare_text, tmp_path):
    tokenizer = train_tokenizer([shakespeare_text[:50_000]], kind=kind, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for name, token in SPECIAL_TOKENS.items():
        assert getattr(loaded, name) == token
        assert getattr(loaded, f"{name}_id") == tokenizer.convert_tokens_to_ids(token)
    # BOS is EOS: one token ends each document and starts the next
    assert len({loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id}) == 3
    assert loaded.bos_token_id == loaded.eos_token_id == document_start_id(loaded)
    assert loaded.split_special_tokens
    assert loaded("ROMEO: O").input_ids == tokenizer("ROMEO: O").input_ids
    assert loaded(MARKUP).input_ids == tokenizer(MARKUP).input_ids
    assert loaded.padding_side == "left"
    assert load_tokenizer(tmp_path).eos_token == "</s>"


def test_tokenizer_kinds_for_model_cards(tokenizers):
    assert tokenizer_kind(tokenizers["char reloaded"]) == "character-level"
    assert tokenizer_kind(tokenizers["bpe reloaded"]) == "byte-level BPE"
    assert tokenizer_kind(AutoTokenizer.from_pretrained(LEGACY_CHAR_TOKENIZER)) == "character-level"


def test_folders_saved_by_earlier_versions_still_load(tmp_path):
    plain = AutoTokenizer.from_pretrained(LEGACY_CHAR_TOKENIZER)
    assert (plain.bos_token, plain.eos_token) == ("<s>", "</s>")  # as saved: third-party code sees it unchanged
    assert plain.eos_token_id in plain("hear </s> me").input_ids
    tokenizer = load_tokenizer(LEGACY_CHAR_TOKENIZER)
    assert tokenizer("hear me").input_ids == plain("hear me").input_ids  # the same vocabulary
    assert tokenizer.bos_token == "</s>"
    assert tokenizer.bos_token_id == document_start_id(tokenizer) == plain.eos_token_id
    assert plain.eos_token_id not in tokenizer("hear </s> me").input_ids  # text ("<", "/", ">" are unseen: <unk>)
    assert encode_prompt(tokenizer, "").input_ids.tolist() == [[plain.eos_token_id]]
    tokenizer.save_pretrained(tmp_path)  # what fine-tuning writes
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.bos_token == "</s>" and again.split_special_tokens


def test_prompts_are_text_and_an_empty_one_is_the_document_start(char_tokenizer):
    empty = encode_prompt(char_tokenizer, "")
    assert empty.input_ids.tolist() == [[char_tokenizer.eos_token_id]] and empty.attention_mask.tolist() == [[1]]
    inputs = encode_prompt(char_tokenizer, "KING</s>")
    assert inputs.input_ids.tolist() == [char_tokenizer("KING</s>", add_special_tokens=False).input_ids]
    assert inputs.input_ids.shape == inputs.attention_mask.shape == (1, 8)


def test_bad_tokenizer_options():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["abc"], kind="words")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], kind="bpe", vocab_size=100)
    no_eos = train_char_tokenizer(["abc"])
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        document_start_id(no_eos)


def test_word_tokenizer_reads_text_as_the_word_language_model_example(tmp_path):
    tokenizer = train_tokenizer(["the cat sat\nthe dog sat on the mat\n", "a cat"], kind="word", vocab_size=6)
    assert tokenizer.convert_ids_to_tokens(range(len(tokenizer))) == ["<eos>", "<unk>", "the", "cat", "sat", "a"]
    assert tokenizer_kind(tokenizer) == "word-level"
    assert document_start_id(tokenizer) == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    ids = tokenizer("the cat ate\r\n  a\tcat\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "cat", "<unk>", "<eos>", "a", "cat", "<eos>"]
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("the cat ate\n")["input_ids"] == [2, 3, 1, 0]
    assert eos_ends_lines(tokenizer) and eos_ends_lines(load_tokenizer(tmp_path))
    assert not eos_ends_lines(train_char_tokenizer(["a\nb"]))
    with pytest.raises(ValueError, match="<eos>"):
        word_tokenizer(["<unk>", "a"])
    with pytest.raises(ValueError, match="repeats the word 'a'"):
        word_tokenizer(["<eos>", "a", "a"])
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["a"], kind="word", min_frequency=0)
    with pytest.raises(ValueError, match="No word of the training text occurs at least --min_frequency 3 times"):
        train_tokenizer(["a a b\nb c\n"], kind="word", min_frequency=3)
