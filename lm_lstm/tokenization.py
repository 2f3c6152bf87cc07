"""Tokenizers trained from text files with `tokenizers`, wrapped as `PreTrainedTokenizerFast`.

Two kinds exact on any text (`decode(encode(text)) == text`, with or without `skip_special_tokens=True`): byte-level
BPE, and character level (one token per character seen in training; any other character becomes its UTF-8 bytes,
one byte token each). A third, word level (`word_tokenizer`), reads text as the classic word-level LSTM language
models do and is not exact. All load back with `AutoTokenizer.from_pretrained(folder)` without remote code.

User text is always text: the strings `</s>`, `<pad>`, `<unk>` in it are encoded as the characters they are
(`split_special_tokens=True`, saved in `tokenizer_config.json`); special tokens enter a sequence only where lm-lstm
puts them in by id. (`tokenizer.json` cannot record this: code that loads it with `tokenizers` alone must set
`Tokenizer.encode_special_tokens = True` itself.)

The byte-level BPE and character tokenizers have three special tokens: `<pad>`, `<unk>`, and `</s>`, which is both EOS and BOS. lm-lstm separates documents
with this one token, which ends each document and starts the next (as GPT-2's `<|endoftext|>` does), so it is the
token a model starts every document from: in training (`lm_lstm.data`), evaluation, the perplexity metric, generation
without a prompt (the generation config's `bos_token_id`), and libraries that start from the tokenizer's BOS (such as
lm-evaluation-harness). `document_start_id` names it.

Folders saved by earlier versions (BOS `<s>`, a token their models never saw; special-token strings in text read as
special tokens; character tokenizers that map unseen characters to `<unk>`) load unchanged with `AutoTokenizer`, so
code that reads their BOS still starts from `<s>`. lm-lstm's own loader, `load_tokenizer` (used by training,
evaluation, the metric and `lm-lstm generate`), makes their BOS the EOS token and reads special-token strings as
text, and a folder it saves (fine-tuning) keeps both. Their character tokenizers still map unseen characters to
`<unk>`: the models have no byte tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DOCUMENT_BOUNDARY = "</s>"
SPECIAL_TOKENS = {
    "pad_token": "<pad>", "bos_token": DOCUMENT_BOUNDARY, "eos_token": DOCUMENT_BOUNDARY, "unk_token": "<unk>"
}
SPECIAL_VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(SPECIAL_TOKENS.values()))  # ids 0, 1, 2 in new vocabularies
BYTE_TOKENS = 256  # `<0x00>` .. `<0xFF>`
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "char", "word")  # what `train_tokenizer` builds
LINE_END = "<eos>"  # a word-level tokenizer's token for a line end, as in PyTorch's word_language_model and AWD-LSTM
UNKNOWN_WORD = "<unk>"
LINE_BREAK = Regex(r"\r?\n")
BPE_MINIMUM_VOCABULARY = len(SPECIAL_VOCABULARY) + len(pre_tokenizers.ByteLevel.alphabet())  # 259
WORD_MINIMUM_VOCABULARY = 3  # `<eos>`, `<unk>` and one word


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # what batched generation needs; training batches come unpadded from `data`
        split_special_tokens=True,  # user text is text: "</s>" in it is four characters, not EOS
        **SPECIAL_TOKENS,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer of at most `vocab_size` tokens (special tokens included).

    Raises `ValueError` if `vocab_size` is below 259 (the special tokens and the 256 byte symbols).
    """
    if vocab_size < BPE_MINIMUM_VOCABULARY:
        raise ValueError(
            f"`vocab_size` of a byte-level BPE tokenizer must be at least {BPE_MINIMUM_VOCABULARY}, got {vocab_size}."
        )
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_VOCABULARY),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def train_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Builds a character-level tokenizer: one token per character of `texts`, UTF-8 byte tokens for any other.

    The vocabulary holds, in id order, the 3 special tokens, the characters of `texts` (sorted), and the byte tokens
    `<0xNN>` that a character outside the vocabulary is encoded as (one per UTF-8 byte; decoding joins them back),
    less those of the ASCII characters in the vocabulary, which are never needed: 259 tokens plus one per non-ASCII
    character seen (259 for Tiny Shakespeare, which is ASCII). It is a BPE model without merges and with byte
    fallback, so `tokenizers` and `transformers` load it as any other.
    """
    characters = sorted(set().union(*(set(text) for text in texts)))
    vocab = {token: idx for idx, token in enumerate((*SPECIAL_VOCABULARY, *characters))}
    for byte in range(BYTE_TOKENS):
        if not (byte < 0x80 and chr(byte) in vocab):
            vocab[f"<0x{byte:02X}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return _wrap(tokenizer)


def word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary` (the words in id order), as PyTorch's word_language_model example and
    AWD-LSTM read text: words are split at whitespace, every line end is the word `<eos>` (`LINE_END`), and a word
    outside the vocabulary is `<unk>` (`UNKNOWN_WORD`).

    `<eos>` is EOS, BOS and padding: it ends every line and so every document, and documents start from it. Text is
    not kept exactly: decoding joins the words of a line with single spaces and shows `<eos>` as a line end (with
    `skip_special_tokens=True`, `<eos>` and `<unk>` are dropped: see `text_decoding`). Like the example's corpora, the string "<eos>" in
    text is a line end. Raises `ValueError` if `vocabulary` lacks `<eos>` or repeats a word. Without `<unk>` in the
    vocabulary, encoding an unknown word raises an error.
    """
    vocab = {word: idx for idx, word in enumerate(vocabulary)}
    if len(vocab) != len(vocabulary):
        repeated = next(word for word in vocabulary if vocabulary.count(word) > 1)
        raise ValueError(f"The vocabulary repeats the word {repeated!r}.")
    if LINE_END not in vocab:
        raise ValueError(f"A word-level vocabulary needs the line-end word {LINE_END!r}.")
    unknown = UNKNOWN_WORD if UNKNOWN_WORD in vocab else None
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
    tokenizer.normalizer = normalizers.Replace(LINE_BREAK, f" {LINE_END} ")
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Sequence([  # words joined by spaces, each `<eos>` a line end without spaces around it
        decoders.Replace(LINE_END, "\n"), decoders.WordPiece(prefix="\0", cleanup=False), decoders.Fuse(),
        decoders.Replace(" \n", "\n"), decoders.Replace("\n ", "\n"),
    ])
    special = {"pad_token": LINE_END, "bos_token": LINE_END, "eos_token": LINE_END}
    if unknown:
        special["unk_token"] = unknown
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, padding_side="left",
        split_special_tokens=True, **special,
    )


def train_word_tokenizer(texts: Iterable[str], vocab_size: int = 10000, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Trains a `word_tokenizer`: `<eos>`, `<unk>`, then the words of `texts` seen at least `min_frequency` times, most
    frequent first, up to `vocab_size` entries in all. Any other word is `<unk>`.

    Raises `ValueError` if `vocab_size` < 3, `min_frequency` < 1, or no word is seen `min_frequency` times.
    """
    if vocab_size < WORD_MINIMUM_VOCABULARY:
        raise ValueError(
            f"`vocab_size` of a word-level tokenizer must be at least {WORD_MINIMUM_VOCABULARY}, got {vocab_size}."
        )
    if min_frequency < 1:
        raise ValueError(f"`min_frequency` must be at least 1, got {min_frequency}.")
    counter = Tokenizer(models.WordLevel(unk_token=UNKNOWN_WORD))
    counter.normalizer = normalizers.Replace(LINE_BREAK, " ")  # counts words only; line ends are `<eos>` anyway
    counter.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[LINE_END, UNKNOWN_WORD],
        show_progress=False,
    )
    counter.train_from_iterator(texts, trainer=trainer)
    ranked = sorted(counter.get_vocab().items(), key=lambda item: item[1])
    words = [word for word, _ in ranked if word not in (LINE_END, UNKNOWN_WORD)]
    if not words:
        raise ValueError(f"No word of the training text occurs at least --min_frequency {min_frequency} times: the "
                         "vocabulary would be <eos> and <unk> alone.")
    return word_tokenizer([LINE_END, UNKNOWN_WORD, *words][:vocab_size])


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Trains a tokenizer of the given kind (one of `TOKENIZER_KINDS`; `vocab_size` applies to BPE and word,
    `min_frequency` to word).

    Raises `ValueError` for an unknown kind."""
    if kind == "bpe":
        return train_bpe_tokenizer(texts, vocab_size)
    if kind == "char":
        return train_char_tokenizer(texts)
    if kind == "word":
        return train_word_tokenizer(texts, vocab_size, min_frequency)
    raise ValueError(f"`kind` must be one of {TOKENIZER_KINDS}, got {kind!r}.")


def tokenizer_kind(tokenizer: PreTrainedTokenizerBase) -> str:
    """What a model card calls the tokenizer: "character-level" (lm-lstm's, new or old), "word-level", "byte-level
    BPE", or the name of its `tokenizers` model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "custom"
    model = json.loads(backend.to_str())["model"]
    if model["type"] == "WordLevel" and LINE_END in model["vocab"]:
        return "word-level"
    if model["type"] == "WordLevel" or model["type"] == "BPE" and not model["merges"]:  # WordLevel: earlier versions
        return "character-level"
    return {"BPE": "byte-level BPE"}.get(model["type"], model["type"])


def document_start_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the token lm-lstm models start every document from: EOS, which also ends every document.

    Training, evaluation, the perplexity metric and generation without a prompt all start documents from it;
    tokenizers made or loaded by lm-lstm also name it as their BOS. Raises `ValueError` if the tokenizer has no EOS.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token, which lm-lstm ends and starts documents with.")
    return tokenizer.eos_token_id


def eos_ends_lines(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's EOS is a line end, as a word-level tokenizer's `<eos>` is (it encodes "\\n" as EOS).

    Then every line of a text, its last one included, ends with exactly one EOS, which counts as a token of the text
    (a word, in per-word perplexity). Otherwise EOS only separates documents and stands for no text.
    """
    return tokenizer("\n", add_special_tokens=False)["input_ids"] == [document_start_id(tokenizer)]


def text_decoding(tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """`decode()` options that turn generated ids into the text they stand for: special tokens skipped, except where
    EOS is a line end (`eos_ends_lines`: word-level tokenizers decode it as one, and `<unk>` as written)."""
    return {"skip_special_tokens": not eos_ends_lines(tokenizer)}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> BatchEncoding:
    """`generate()` inputs for one prompt: `input_ids` and `attention_mask` of shape (1, tokens), as tensors.

    The prompt is text (no special tokens are added); an empty prompt gives the document-start token alone, so that
    generation starts a new document as the model was trained to.
    """
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if inputs["input_ids"].shape[1] == 0:
        start = [[document_start_id(tokenizer)]]
        inputs = BatchEncoding({"input_ids": start, "attention_mask": [[1]]}, tensor_type="pt")
    return inputs


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Loads an existing tokenizer (a folder or a Hub name) for lm-lstm: special-token strings in text are read as
    text, BOS is the EOS token (`document_start_id`), and a tokenizer without a padding token pads with EOS.

    Folders written by earlier lm-lstm versions name `<s>` as BOS; models were trained to start documents from EOS
    all the same, and so is a new model trained with any loaded tokenizer. Raises `ValueError` if it has no EOS.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), split_special_tokens=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer {name_or_path} has no EOS token, which separates documents in training.")
    tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
