"""Surprisal: how unexpected each token and each word of a text is to a model, in bits (-log2 of its probability).

Items. A text is reported line by line (`by="line"`: each line with its line end; the text after a file's last line
end, if any, is its last line) or document by document (`by="document"`: a .txt file is one document, each record of
a .jsonl/.csv/... file one). With `carry_state=False` (the default) each item is scored on its own: from the
document-start token and a zero state, as `lm-lstm evaluate` scores a file that holds only that item. With
`carry_state=True` the state runs on from item to item, as reading-time studies of connected text need: the whole
file is one stream, scored exactly as `lm-lstm evaluate` scores it (documents joined by EOS), and each item takes
the tokens that start in it. Either way the surprisals of an item's tokens, converted to nats, add up to what
`lm-lstm evaluate` sums over the same text.

Words. A word is a maximal run of non-whitespace characters, so punctuation belongs to the word it touches ("table."
is one word), as for a word-level tokenizer. Each token's surprisal goes to the word that holds its first
non-whitespace character (by the tokenizer's character offsets); a token of whitespace only goes to the next word of
its item. Tokens after the item's last word (a line end, trailing whitespace, an EOS that ends a document) form the
item's `end`. So for a subword or character tokenizer a word's surprisal is the sum of its tokens', its leading space
included; for a word-level tokenizer each token is a word (an unknown word is reported as written, scored as
`<unk>`) and the end is the line's `<eos>`, shown as the line end it stands for. An item's words and end add up to
its tokens.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from transformers import PreTrainedTokenizerBase

from .evaluation import token_nlls
from .tokenization import document_start_id, eos_ends_lines

ITEMS = ("line", "document")
UNITS = ("token", "word")
FORMATS = ("tsv", "jsonl")
WORD = re.compile(r"\S+")


@dataclass
class Surprisals:
    """The surprisals (bits) of one item of a text: a line or a document."""

    index: int  # the item's position in the file (0-based), lines counted on across documents
    text: str  # the line (without its line end) or the document
    tokens: list[str]  # as the vocabulary names them
    token_bits: list[float]
    words: list[str]
    word_bits: list[float]
    end: str | None  # the decoded tokens after the last word (special tokens by name); None if there are none
    end_bits: float | None

    @property
    def total_bits(self) -> float:
        return sum(self.token_bits)


@dataclass
class _Encoded:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]  # character spans in `text`; (len, len) for an EOS added at the end


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, end: bool) -> _Encoded:
    """Tokenises `text` as `lm_lstm.data.tokenize_documents` does (in the same pieces), with character offsets; with
    `end`, the tokens end with EOS (added unless the text's last token is one)."""
    from .data import split_into_pieces  # imports `datasets`: only when scoring

    ids, offsets, start = [], [], 0
    for piece in split_into_pieces({"text": [text]})["text"]:
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        offsets += [(start + first, start + last) for first, last in encoded["offset_mapping"]]
        start += len(piece)
    eos = document_start_id(tokenizer)
    if end and text and (not ids or ids[-1] != eos):
        ids.append(eos)
        offsets.append((len(text), len(text)))
    return _Encoded(text, ids, offsets)


def _line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line of `text`, its line end included."""
    spans, start = [], 0
    while start < len(text):
        stop = text.find("\n", start)
        stop = len(text) if stop == -1 else stop + 1
        spans.append((start, stop))
        start = stop
    return spans


def _group(tokenizer: PreTrainedTokenizerBase, index: int, text: str, ids: list[int], offsets: list[tuple[int, int]],
           bits: list[float], is_line: bool) -> Surprisals:
    """One item's surprisals, its tokens grouped into words by the module docstring's rule (offsets in `text`)."""
    spans = [match.span() for match in WORD.finditer(text)]
    starts = [first for first, _ in spans]
    owner: list[int | None] = []  # the word each token goes to; None: the end
    for first, last in offsets:
        piece = text[first:last]
        if piece.strip():
            owner.append(bisect.bisect_right(starts, first + len(piece) - len(piece.lstrip())) - 1)
        else:
            owner.append(None)
    following = None
    for position in reversed(range(len(owner))):  # whitespace goes to the next word; after the last word: the end
        if owner[position] is None:
            owner[position] = following
        following = owner[position]
    word_bits: dict[int, float] = {}
    for word, value in zip(owner, bits):
        if word is not None:
            word_bits[word] = word_bits.get(word, 0.0) + value
    kept: list[list] = []  # [first, last, bits] of each word that tokens start in
    for word, (first, last) in enumerate(spans):
        if word in word_bits:
            kept.append([first, last, word_bits[word]])
        elif kept:  # no token starts in it (one ran on into it from the word before): part of that word
            kept[-1][1] = last
    end = [position for position, word in enumerate(owner) if word is None]
    shown = text  # a line is shown without its line end
    if is_line:
        shown = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    return Surprisals(
        index=index, text=shown, tokens=tokenizer.convert_ids_to_tokens(ids), token_bits=list(bits),
        words=[text[first:last] for first, last, _ in kept], word_bits=[value for _, _, value in kept],
        end=tokenizer.decode([ids[p] for p in end]) if end else None,
        end_bits=sum(bits[p] for p in end) if end else None,
    )


def _bits(model, start: int, ids: list[int], block_size: int) -> list[float]:
    if not ids:
        return []
    return (token_nlls(model, [start] + ids, block_size) / math.log(2)).tolist()


def surprisals(
    model,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    by: Literal["line", "document"] = "line",
    carry_state: bool = False,
    block_size: int = 512,
) -> list[Surprisals]:
    """Per-token and per-word surprisals (bits) of each line or document of `documents` (see the module docstring).

    `documents` are the texts of a file's documents (a .txt file is one); `block_size` is how many tokens go through
    the model at once (the state is carried across, so it does not change the result). Needs a fast tokenizer (for
    character offsets). Raises `ValueError` for an unknown `by` or a tokenizer without offsets or EOS.
    """
    if by not in ITEMS:
        raise ValueError(f"`by` must be one of {ITEMS}, got {by!r}.")
    if not tokenizer.is_fast:
        raise ValueError("Surprisals need a fast tokenizer (one with character offsets).")
    start = document_start_id(tokenizer)
    line_ends = eos_ends_lines(tokenizer)  # then every line ends with one EOS, which is scored
    items = (lambda text: _line_spans(text)) if by == "line" else (lambda text: [(0, len(text))])
    results: list[Surprisals] = []
    if not carry_state:
        for text in documents:
            for first, last in items(text):
                item = _encode(tokenizer, text[first:last], end=line_ends)
                bits = _bits(model, start, item.ids, block_size)
                results.append(_group(tokenizer, len(results), item.text, item.ids, item.offsets, bits, by == "line"))
        return results

    # One stream over the file, as `lm-lstm evaluate` scores it: every document ends with EOS but the last one
    # (unless its EOS is a line end); empty documents hold no tokens. Each item takes the tokens that start in it.
    last_document = max((number for number, text in enumerate(documents) if text), default=-1)
    encoded = [_encode(tokenizer, text, end=number < last_document or line_ends) for number, text in enumerate(documents)]
    bits = iter(_bits(model, start, [token for document in encoded for token in document.ids], block_size))
    for document in encoded:
        document_bits = [next(bits) for _ in document.ids]
        spans = items(document.text)
        chosen_by_item: list[list[int]] = [[] for _ in spans]  # the tokens that start in each item
        for position, (first, _) in enumerate(document.offsets):
            chosen_by_item[bisect.bisect_right(spans, (first, math.inf)) - 1].append(position)
        for (first, last), chosen in zip(spans, chosen_by_item):
            results.append(_group(
                tokenizer, len(results), document.text[first:last], [document.ids[p] for p in chosen],
                [(document.offsets[p][0] - first, document.offsets[p][1] - first) for p in chosen],
                [document_bits[p] for p in chosen], by == "line",
            ))
    return results


def file_surprisals(
    model,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    by: Literal["line", "document"] = "line",
    carry_state: bool = False,
    block_size: int = 512,
    text_column: str = "text",
) -> list[Surprisals]:
    """`surprisals` of a file's documents, read as `lm-lstm evaluate` reads them (`text_column` names the text of
    .json/.jsonl/.csv/.parquet records). Raises `lm_lstm.data.DataError` for a missing, empty or non-UTF-8 file."""
    from .data import load_documents  # imports `datasets`: only when reading a file

    documents = load_documents([str(path)], text_column)["text"]
    return surprisals(model, tokenizer, documents, by=by, carry_state=carry_state, block_size=block_size)


def _escape(text: str) -> str:
    """A TSV field: backslash, tab, line feed and carriage return written as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tsv_lines(items: Iterable[Surprisals], unit: Literal["token", "word"] = "word", by: str = "line") -> Iterator[str]:
    """Tab-separated rows (with a header) of the items' surprisals: item index, token or word index, its text (tabs
    and line ends escaped as \\t, \\n, \\r; backslashes doubled), surprisal in bits. With `unit="word"`, each item's
    end (if any) follows its words as a row with an empty word index."""
    if unit not in UNITS:
        raise ValueError(f"`unit` must be one of {UNITS}, got {unit!r}.")
    yield f"{by}\t{unit}\ttext\tsurprisal_bits"
    for item in items:
        names, bits = (item.tokens, item.token_bits) if unit == "token" else (item.words, item.word_bits)
        for position, (name, value) in enumerate(zip(names, bits)):
            yield f"{item.index}\t{position}\t{_escape(name)}\t{value:.6f}"
        if unit == "word" and item.end is not None:
            yield f"{item.index}\t\t{_escape(item.end)}\t{item.end_bits:.6f}"


def jsonl_lines(items: Iterable[Surprisals], unit: Literal["token", "word"] = "word", by: str = "line") -> Iterator[str]:
    """One JSON object per item: its index (key `by`), `text`, the `tokens` or `words`, and their `surprisal_bits`;
    with `unit="word"` also its `end` and `end_surprisal_bits` (null without end tokens)."""
    if unit not in UNITS:
        raise ValueError(f"`unit` must be one of {UNITS}, got {unit!r}.")
    for item in items:
        record = {by: item.index, "text": item.text}
        if unit == "token":
            record.update(tokens=item.tokens, surprisal_bits=item.token_bits)
        else:
            record.update(words=item.words, surprisal_bits=item.word_bits, end=item.end,
                          end_surprisal_bits=item.end_bits)
        yield json.dumps(record, ensure_ascii=False)


def write_surprisals(items: Iterable[Surprisals], out: TextIO, unit: str = "word", format: str = "tsv",
                     by: str = "line") -> None:
    """Writes the items as `tsv_lines` or `jsonl_lines` to `out`. Raises `ValueError` for an unknown format."""
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    for line in (tsv_lines if format == "tsv" else jsonl_lines)(items, unit, by):
        out.write(line + "\n")
