"""Tokenizers trained from text files with `tokenizers`, wrapped as `PreTrainedTokenizerFast`.

Two kinds: byte-level BPE (any UTF-8 text round-trips exactly) and character level (one token per character seen in
training; others map to `<unk>`). Both carry the same four special tokens, and load back with
`AutoTokenizer.from_pretrained(folder)` without remote code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TokenizerKind = Literal["bpe", "char"]
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "char")


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # what batched generation needs; training batches come unpadded from `data`
        **SPECIAL_TOKENS,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer of at most `vocab_size` tokens (special tokens included)."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"`vocab_size` of a byte-level BPE tokenizer must be at least {minimum}, got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def train_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Builds a character-level tokenizer over the characters of `texts`, in sorted order after the special tokens."""
    characters = sorted(set().union(*(set(text) for text in texts)))
    vocab = {token: idx for idx, token in enumerate(SPECIAL_TOKENS.values())}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer)


def train_tokenizer(texts: Iterable[str], kind: TokenizerKind = "bpe", vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Trains a tokenizer of the given kind (`"bpe"` or `"char"`; `vocab_size` applies to BPE)."""
    if kind == "bpe":
        return train_bpe_tokenizer(texts, vocab_size)
    if kind == "char":
        return train_char_tokenizer(texts)
    raise ValueError(f"`kind` must be one of {TOKENIZER_KINDS}, got {kind!r}.")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """Loads an existing tokenizer (a folder or a Hub name) and makes sure it has EOS and padding tokens."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer {name_or_path} has no EOS token, which separates documents in training.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
