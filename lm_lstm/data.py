"""Text data for training and evaluation: files or Hub datasets -> token blocks, through `datasets`.

A `.txt` file is one document; each record of a `.json`/`.jsonl`/`.csv`/`.parquet` file or Hub dataset is one
document. Documents are cut into pieces at line boundaries (so tokenisation runs in parallel and in bounded memory),
tokenised, joined with the EOS token after each document, and grouped into blocks of `block_size` tokens. Every
step is a `Dataset.map`, so the `datasets` cache lets a second run skip the work.

Nothing here holds the whole text or its tokens in memory: a `.txt` file is read in chunks and cut into pieces as it
is read (`load_text_datasets`, which also carves the validation text by character position while reading), the
pieces and their tokens are Arrow datasets, memory-mapped from the `datasets` cache, and each map works on a bounded
batch of pieces (`TOKENIZE_BATCH_PIECES`). Pieces end at line ends; a line longer than `LONG_LINE_PIECES` pieces is
cut before a space, so a file without line ends is read in bounded memory too (`cut_pieces`).

Every document ends with exactly one EOS. With a word-level tokenizer, whose EOS `<eos>` is also the line end
(`eos_ends_lines`), a document whose text ends with a line end already ends with it, and gets no second one; a
document that does not gets one, which ends its last line: every line ends with one `<eos>`, as in PyTorch's
word_language_model example.

Each token carries the UTF-8 bytes of the text it stands for (`token_bytes`): the text from the end of the token
before it (in the same piece) to its own end, so whitespace counts with the token after it, and a piece's trailing
text with its last token. The bytes of a piece's tokens add up to the bytes of the piece, whatever the tokenizer
(decoding, which a word-level tokenizer does not do exactly, is never used), and bits per byte divides by the bytes
of the scored tokens. An EOS added at a document's end stands for the document's trailing whitespace, if any.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from .tokenization import document_start_id

DEFAULT_CORPUS = Path(__file__).with_name("corpus") / "tiny_shakespeare.txt"
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PIECE_CHARS = 1 << 16  # documents are tokenised in pieces of about this many characters
LONG_LINE_PIECES = 16  # a line longer than this many pieces is cut at a space (`cut_pieces`)
TOKENIZE_BATCH_PIECES = 32  # pieces per tokenisation batch: about 2 MB of text, whatever the corpus size
_SNIFF_BYTES = 1 << 20
READ_SPLIT = "documents"  # the split record files are read as: `datasets` says "Generating documents split"


class DataError(ValueError):
    """A data file or dataset that cannot be used; the message names it and says why."""


def utf8_chunks(path: str | Path) -> Iterator[str]:
    """The text of the file at `path`, decoded as UTF-8 in chunks of about a megabyte.

    Raises `DataError` naming the file and the offset of the first byte that is not UTF-8.
    """
    with Path(path).open("rb") as handle:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0  # of the chunk read next
        while chunk := handle.read(_SNIFF_BYTES):
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the chunk before
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}: not UTF-8 text (invalid byte at offset {offset - pending + error.start})."
                ) from None
            yield text
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (it ends inside a multi-byte character).") from None


def check_text_file(path: str | Path) -> Path:
    """Returns `path` if it is a readable, non-empty UTF-8 file with some non-whitespace text; raises `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(BUILDERS)}.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    if suffix == ".parquet":
        return path
    has_text = False
    for text in utf8_chunks(path):
        if "\x00" in text:
            raise DataError(f"{path}: not a text file (it contains NUL bytes).")
        has_text = has_text or not text.isspace() and text != ""
    if not has_text:
        raise DataError(f"{path}: the file holds only whitespace.")
    return path


@dataclass
class DataSource:
    """Where the text comes from: local files or a Hub dataset, and how to carve a validation split."""

    train_files: list[str] | None = None
    validation_files: list[str] | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    text_column: str = "text"
    validation_split_percentage: float = 10.0

    def __post_init__(self) -> None:
        if not self.train_files and not self.dataset_name:
            self.train_files = [str(DEFAULT_CORPUS)]
        if not 0 < self.validation_split_percentage < 100:
            raise DataError(
                f"--validation_split_percentage must be between 0 and 100, got {self.validation_split_percentage}."
            )


def _builder(files: list[str]) -> str:
    """The `datasets` builder that reads `files` (checked: readable, non-empty text); raises `DataError` for a mix."""
    for path in files:
        check_text_file(path)
    suffixes = sorted({Path(p).suffix.lower() for p in files})
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"All data files must be of one kind, got {', '.join(suffixes)}.")
    return builders.pop()


def load_documents(files: list[str], text_column: str = "text") -> Dataset:
    """Loads local files (all of one kind) as a dataset of documents with a single `text` column.

    A `.txt` file is one document, held whole in one row: `load_pieces` reads large files in bounded memory."""
    builder = _builder(files)
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files={READ_SPLIT: files}, split=READ_SPLIT, **options)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        suffix = Path(files[0]).suffix.lower()
        raise DataError(f"{', '.join(files)}: cannot be read as {suffix} ({message}).") from None
    except ValueError as error:  # `datasets` reads a split without rows as an error
        if "corresponds to no data" not in str(error):
            raise
        raise DataError(f"{', '.join(files)}: holds no records (only a header, or an empty list).") from None
    return _text_column_only(dataset, text_column, ", ".join(files))


def read_text(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The text of a file from character `start` to `stop` (None: its end), in chunks of about a million characters,
    read as `datasets`' text builder reads it: UTF-8, with universal newlines ("\\r\\n" and "\\r" read as "\\n")."""
    position = 0  # of the chunk read next
    with Path(path).open(encoding="utf-8") as handle:
        while (stop is None or position < stop) and (chunk := handle.read(_SNIFF_BYTES)):
            if position + len(chunk) > start:
                yield chunk[max(0, start - position) : None if stop is None else stop - position]
            position += len(chunk)


def cut_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """Cuts a text, given in chunks, into the pieces it is tokenised in: each runs to the first line end at least
    `PIECE_CHARS` characters after its start (the last, to the end of the text). A line longer than
    `LONG_LINE_PIECES` pieces is cut before its last space within that length (or at that length, if it has none),
    so that a file of one long line is read and tokenised in bounded memory too: a space starts a token in every
    tokenizer here (characters, words, byte-level BPE), so the pieces' tokens are those of the whole line."""
    parts: list[str] = []  # the text of the piece being read
    length = 0
    for chunk in chunks:
        reach = max(0, PIECE_CHARS - length)  # where in `chunk` a line end may end the piece
        while (stop := chunk.find("\n", reach)) != -1:
            yield "".join([*parts, chunk[: stop + 1]])
            chunk, parts, length, reach = chunk[stop + 1 :], [], 0, PIECE_CHARS
        if chunk:
            parts.append(chunk)
            length += len(chunk)
        longest = LONG_LINE_PIECES * PIECE_CHARS
        if length > longest:
            text = "".join(parts)
            while len(text) > longest:
                cut = text.rfind(" ", PIECE_CHARS, longest)
                cut = longest if cut == -1 else cut
                yield text[:cut]
                text = text[cut:]
            parts, length = [text], len(text)
    if parts:
        yield "".join(parts)


def _marking_the_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Each item, and whether it is the last."""
    items = iter(items)
    previous = next(items, None)
    for item in items:
        yield previous, False
        previous = item
    if previous is not None:
        yield previous, True


def _file_pieces(spans: list[tuple[str, int, int | None]]) -> Iterator[dict]:
    """Rows of pieces (`text`, `ends_document`) of text files, each span (path, first character, end character or
    None) one document."""
    for path, start, stop in spans:
        for piece, last in _marking_the_last(cut_pieces(read_text(path, start, stop))):
            yield {"text": piece, "ends_document": last}


PIECE_FEATURES = Features({"text": Value("string"), "ends_document": Value("bool")})


def file_digest(path: str | Path, algorithm: str = "blake2b", chunk_bytes: int = 1 << 24) -> str:
    """The hex digest of the file's bytes by `hashlib`'s `algorithm`, read 16 MB at a time (BLAKE2b: about a
    second per GB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _pieces_of_files(spans: list[tuple[str, int, int | None]]) -> Dataset:
    """The pieces of text file spans (`_file_pieces`) as a dataset cached on disk, written as they are read; the
    cache holds while the files keep their content (a digest of their bytes: copies that keep the modification
    time, such as `cp -p` or `rsync -a`, would fool a time stamp)."""
    digests = {path: file_digest(path) for path in {path for path, _, _ in spans}}
    stamps = [(str(Path(path).resolve()), digests[path], start, stop) for path, start, stop in spans]
    return Dataset.from_generator(
        _file_pieces, features=PIECE_FEATURES, gen_kwargs={"spans": spans},
        fingerprint=Hasher.hash(["lm-lstm text pieces", PIECE_CHARS, LONG_LINE_PIECES, stamps]),
        writer_batch_size=TOKENIZE_BATCH_PIECES,
    )


def text_characters(path: str | Path) -> int:
    """Characters of a text file as `read_text` reads it."""
    return sum(len(chunk) for chunk in read_text(path))


def load_pieces(files: list[str], text_column: str = "text") -> Dataset:
    """Local files (all of one kind) as the pieces of their documents (`text`, `ends_document`), read in bounded
    memory: `.txt` files as they are read, records as documents first."""
    if _builder(files) == "text":
        return _pieces_of_files([(path, 0, None) for path in files])
    return cut_documents(load_documents(files, text_column))


def cut_documents(documents):
    """The pieces (`text`, `ends_document`) of a `Dataset` or `DatasetDict` of documents; empty documents have none."""
    return documents.map(split_into_pieces, batched=True, remove_columns=["text"], desc="Cutting documents")


def load_text_datasets(source: DataSource) -> DatasetDict:
    """Loads the text as a `DatasetDict` with `train` and `validation` splits of pieces (`text`, `ends_document`)."""
    if source.dataset_name:
        raw = load_dataset(source.dataset_name, source.dataset_config_name)
        raw = DatasetDict({split: _text_column_only(ds, source.text_column) for split, ds in raw.items()})
        if "validation" not in raw:
            raw = carve_validation(raw["train"], source.validation_split_percentage)
        return cut_documents(DatasetDict(train=raw["train"], validation=raw["validation"]))
    if source.validation_files:
        return DatasetDict(train=load_pieces(source.train_files, source.text_column),
                           validation=load_pieces(source.validation_files, source.text_column))
    if _builder(source.train_files) == "text":
        return carve_text_files(source.train_files, source.validation_split_percentage)
    documents = load_documents(source.train_files, source.text_column)
    return cut_documents(carve_validation(documents, source.validation_split_percentage))


def _text_column_only(dataset: Dataset, column: str, source: str = "The data") -> Dataset:
    """`dataset` with only its text column, named `text`; missing values (an empty CSV cell) become empty documents.

    Raises `DataError` if the column is missing or holds something other than text.
    """
    if column not in dataset.column_names:
        raise DataError(f"{source} has no column {column!r} (it has {dataset.column_names}); name it with --text_column.")
    kind = dataset.features[column]
    if getattr(kind, "dtype", None) not in ("string", "large_string"):
        found = getattr(kind, "dtype", None) or type(kind).__name__
        raise DataError(f"{source}: column {column!r} holds {found} values, not text.")
    dataset = dataset.select_columns([column])
    if dataset.data.column(column).null_count:
        dataset = dataset.map(lambda batch: {column: [text or "" for text in batch[column]]}, batched=True,
                              desc="Filling missing texts")
    return dataset if column == "text" else dataset.rename_column(column, "text")


def validation_cut(lengths: np.ndarray, percentage: float) -> tuple[int, int]:
    """Where validation text starts when the last `percentage` % of documents of `lengths` characters is held out:
    the document the cut falls in (or starts, at a boundary) and its characters before the cut. Raises `DataError`
    when the text is too short to split."""
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    cut = int(total * (1 - percentage / 100))
    if cut == 0 or cut == total:
        raise DataError(f"The training text ({total} characters) is too short to split off a validation part.")
    document = bisect.bisect_right(ends, cut)
    return document, cut - (int(ends[document - 1]) if document else 0)


def carve_validation(train: Dataset, percentage: float) -> DatasetDict:
    """Splits off the last `percentage` % of the text, by character position, as validation text: the documents after
    the cut, and the end of the document the cut falls in (with one text file, the end of the file). Validation text
    is never seen in training. Raises `DataError` when the text is too short to split.
    """
    lengths = pc.utf8_length(train.with_format("arrow")["text"]).to_numpy(zero_copy_only=False)
    document, offset = validation_cut(lengths, percentage)
    head = train.select(range(document + (offset > 0)))
    tail = train.select(range(document, len(train)))
    if offset:
        # Maps rather than new in-memory datasets, so the `datasets` cache still covers what follows.
        head = head.map(lambda example, row: {"text": example["text"][:offset] if row == document else example["text"]},
                        with_indices=True, desc="Carving train")
        tail = tail.map(lambda example, row: {"text": example["text"][offset:] if row == 0 else example["text"]},
                        with_indices=True, desc="Carving validation")
    return DatasetDict(train=head, validation=tail)


def carve_text_files(files: list[str], percentage: float) -> DatasetDict:
    """The pieces of text files (each one document), the last `percentage` % by character position held out as
    validation pieces, exactly as `carve_validation` carves the documents; read twice, never held in memory."""
    lengths = np.array([text_characters(path) for path in files], dtype=np.int64)
    document, offset = validation_cut(lengths, percentage)
    head = [(path, 0, None) for path in files[:document]] + ([(files[document], 0, offset)] if offset else [])
    tail = [(files[document], offset, None)] + [(path, 0, None) for path in files[document + 1 :]]
    return DatasetDict(train=_pieces_of_files(head), validation=_pieces_of_files(tail))


def split_into_pieces(batch: dict[str, list]) -> dict[str, list]:
    """Cuts documents into pieces (`cut_pieces`); marks each document's last piece (`ends_document`)."""
    pieces, ends = [], []
    for text in batch["text"]:
        for piece, last in _marking_the_last(cut_pieces([text])):
            pieces.append(piece)
            ends.append(last)
    return {"text": pieces, "ends_document": ends}


DEFAULT_TOKENIZER_TRAIN_BYTES = 100_000_000


def tokenizer_training_texts(pieces: Dataset, max_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES) -> Iterator[str]:
    """The text a new tokenizer is trained on, in the pieces of the training text (`text`, `ends_document`) that it
    will tokenise: all of them when they hold at most `max_bytes` bytes of UTF-8; else a sample of about `max_bytes`
    bytes spread evenly over the text, every k-th piece (pieces are about `PIECE_CHARS` characters, cut at line ends,
    or at spaces in long lines).

    Pieces, not whole documents: `tokenizers` pre-tokenises each text whole, which for one 20 MB document took 2 GB.
    A character or word vocabulary is the same either way; byte-level BPE counts can differ where a piece ends.
    Raises `ValueError` if `max_bytes` < 1."""
    if max_bytes < 1:
        raise ValueError(f"--tokenizer_train_bytes must be at least 1, got {max_bytes}.")
    sizes = pc.binary_length(pieces.with_format("arrow")["text"]).to_numpy(zero_copy_only=False)
    step = max(1, -(-int(sizes.sum()) // max_bytes))
    for index in range(0, len(pieces), step):
        yield pieces[index]["text"]


def utf8_prefix(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character position of `text` (length `len(text) + 1`)."""
    if text.isascii():
        return np.arange(len(text) + 1)
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)])


def token_bytes(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int],
                offsets: list[tuple[int, int]] | None) -> tuple[list[int], int]:
    """UTF-8 bytes of the text each token of `text` stands for (from the previous token's end to its own end), and
    the bytes of the text after the last token (trailing whitespace): together, the bytes of `text`.

    `offsets` are a fast tokenizer's character offsets; without them (a slow tokenizer) each token counts the bytes
    of its own decoding, an approximation.
    """
    total = len(text.encode("utf-8"))
    if not ids:
        return [], total
    if offsets is None:
        counts = [len(tokenizer.decode([token]).encode("utf-8")) for token in ids]
        return counts, max(0, total - sum(counts))
    prefix = utf8_prefix(text)
    ends = np.maximum.accumulate(np.array([0] + [end for _, end in offsets], dtype=np.int64))
    return np.diff(prefix[ends]).tolist(), int(total - prefix[ends[-1]])


PIECE_COLUMNS = ["input_ids", "token_bytes", "ends_document"]
TOKEN_FEATURES = Features({  # 4 bytes a token id and a byte count: half what Python ints would be stored as
    "input_ids": List(Value("int32")), "token_bytes": List(Value("int32")), "ends_document": Value("bool"),
})


def tokenize_documents(raw, tokenizer: PreTrainedTokenizerBase, num_proc: int | None = None):
    """Tokenises a `Dataset` or `DatasetDict` of documents (a `text` column) or of their pieces (`text` and
    `ends_document`, as `load_text_datasets` gives them) into pieces (`PIECE_COLUMNS`): `input_ids`, their
    `token_bytes`, and whether the piece is its document's last (`ends_document`). Each document ends in exactly one
    EOS (the module docstring says when it is added). The pieces are tokenised `TOKENIZE_BATCH_PIECES` at a time,
    in `num_proc` processes, with the fast tokenizer's batch encoding; the result is cached on disk.

    Raises `DataError` when a split holds no text."""
    eos = document_start_id(tokenizer)  # ends each document and starts the next

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = batch["text"]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        all_offsets = encoded["offset_mapping"] if tokenizer.is_fast else [None] * len(texts)
        ids, sizes = [], []
        for text, piece, offsets, end in zip(texts, encoded["input_ids"], all_offsets, batch["ends_document"]):
            counts, trailing = token_bytes(tokenizer, text, piece, offsets)
            if end and (not piece or piece[-1] != eos):
                piece, counts = piece + [eos], counts + [trailing]  # the added EOS stands for trailing whitespace
            elif counts:
                counts[-1] += trailing
            ids.append(piece)
            sizes.append(counts)
        return {"input_ids": ids, "token_bytes": sizes}

    columns = raw.column_names if isinstance(raw, Dataset) else next(iter(raw.values())).column_names
    pieces = raw if "ends_document" in columns else cut_documents(raw)
    for split, dataset in pieces.items() if isinstance(pieces, DatasetDict) else [("", pieces)]:
        if len(dataset) == 0:
            raise DataError(f"The {split + ' ' if split else ''}text is empty: every document is an empty string.")
    return pieces.map(tokenize, batched=True, batch_size=TOKENIZE_BATCH_PIECES, writer_batch_size=TOKENIZE_BATCH_PIECES,
                      num_proc=num_proc, remove_columns=["text"], features=TOKEN_FEATURES, desc="Tokenizing")


class FlatTokens:
    """The numbers of a list column (`input_ids` or `token_bytes` of tokenised pieces), joined into one sequence that
    is read a range at a time: each part is a numpy view of a memory-mapped Arrow chunk (or an array), never copied
    whole."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([len(part) for part in parts], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Numbers `start` to `stop` (exclusive) as an int64 array of shape `(stop - start,)`."""
        part = bisect.bisect_right(self.offsets, start) - 1
        pieces = []
        while start < stop:
            base = int(self.offsets[part])
            piece = self.parts[part][start - base : stop - base]
            pieces.append(piece)
            start += len(piece)
            part += 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


@dataclass
class TokenDocuments:
    """Tokenised documents laid end to end: token `ids`, the UTF-8 bytes each stands for (`sizes`, None when not
    known), and where each document starts (`starts`, int64 of shape `(documents + 1,)`, the last entry the end)."""

    ids: FlatTokens
    sizes: FlatTokens | None
    starts: np.ndarray

    @classmethod
    def from_lists(cls, documents: list[list[int]], document_bytes: list[list[int]] | None = None) -> TokenDocuments:
        """Documents given as lists of token ids (and of their bytes), copied into arrays."""
        lengths = [len(document) for document in documents]
        flat = lambda lists: FlatTokens([np.array([n for numbers in lists for n in numbers], dtype=np.int64)])
        return cls(flat(documents), None if document_bytes is None else flat(document_bytes),
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    @classmethod
    def from_pieces(cls, pieces: Dataset) -> TokenDocuments:
        """The documents of tokenised pieces (`tokenize_documents`), read in place from the dataset's Arrow data: only
        the document starts are computed (one number per piece on the way), no token is copied."""
        if pieces._indices is not None:  # a selection: its rows are not contiguous in the Arrow data
            pieces = pieces.flatten_indices()
        table = pieces.data

        def flat(column: str) -> tuple[FlatTokens, np.ndarray]:
            chunks = table.column(column).chunks
            parts = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in chunks]
            lengths = [pc.list_value_length(chunk).to_numpy(zero_copy_only=False) for chunk in chunks]
            return FlatTokens(parts), np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)

        (ids, piece_lengths), (sizes, _) = flat("input_ids"), flat("token_bytes")
        piece_ends = np.cumsum(piece_lengths, dtype=np.int64)
        ends = piece_ends[table.column("ends_document").to_numpy()]
        if len(piece_ends) and (not len(ends) or ends[-1] != piece_ends[-1]):
            ends = np.append(ends, piece_ends[-1])  # pieces that do not end their document: one more
        return cls(ids, sizes, np.concatenate([[0], ends]).astype(np.int64))


def check_block_size(block_size: int) -> None:
    if block_size < 2:
        raise DataError(f"--block_size must be at least 2 (a token and the one it predicts), got {block_size}.")


def group_blocks(tokens, block_size: int, num_proc: int | None = None):
    """Joins token pieces (`tokenize_documents`) and cuts them into blocks of `block_size` with `input_ids`,
    `labels`, and `scored_bytes`: the bytes of text that the block's scored tokens (all but its first) stand for.

    The tokens left over at the end of each map batch (fewer than `block_size`) are dropped, as in `run_clm.py`:
    at most `block_size - 1` tokens per 1,000 pieces of text (per process).
    """
    check_block_size(block_size)

    def group(batch: pa.Table) -> dict[str, np.ndarray]:
        # Arrow batches and numpy: a batch of 1,000 pieces holds tens of millions of tokens, too many for lists.
        stream = pc.list_flatten(batch["input_ids"]).to_numpy()
        sizes = pc.list_flatten(batch["token_bytes"]).to_numpy()
        usable = len(stream) - len(stream) % block_size
        blocks = stream[:usable].reshape(-1, block_size)
        scored = sizes[:usable].reshape(-1, block_size)[:, 1:].sum(axis=1, dtype=np.int64)
        return {"input_ids": blocks, "labels": blocks, "scored_bytes": scored}

    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "scored_bytes": Value("int64")})
    blocks = tokens.with_format("arrow").map(
        group, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=PIECE_COLUMNS, features=features,
        desc=f"Grouping in blocks of {block_size}",
    )
    return blocks.with_format(None)


def tokenize_dataset(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int, num_proc: int | None = None
) -> DatasetDict:
    """Tokenises every split of `raw` and groups it into blocks; each split must fill at least one block."""
    check_block_size(block_size)
    blocks = group_blocks(tokenize_documents(raw, tokenizer, num_proc), block_size, num_proc)
    for split, dataset in blocks.items():
        if len(dataset) == 0:
            raise DataError(
                f"The {split} text is shorter than one block of {block_size} tokens; give more text or a smaller "
                "--block_size."
            )
    return blocks


def collate_blocks(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Stacks blocks into a batch; blocks of unequal length are right-padded (mask 0, label -100)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature.get("labels", feature["input_ids"]))
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if not attention_mask.all():
        batch["attention_mask"] = attention_mask
    return batch


def token_digest(arrays: Iterable[np.ndarray]) -> str:
    """A hex digest (BLAKE2b, 128 bits) of the numbers of `arrays`, flattened and joined, whatever their integer
    type and however they are split. It reads them once: about 25M numbers a second on one core of the developers'
    AMD EPYC (2.1 s for 50M), a small part of what tokenising them took."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


@dataclass
class TrainingData:
    """A run's training and validation datasets in one layout, the collator that batches them, and what the run
    summary (and model card) says about them (`summary`)."""

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    block_size: int

    def summary(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """Block and token counts, the bytes of validation text scored, and how the data was used (`bptt`,
        `evaluation_method`), for `RunSummary`."""
        raise NotImplementedError

    def train_tokens(self) -> int:
        """Tokens of the training data (what one epoch reads)."""
        raise NotImplementedError

    def train_digest(self) -> str:
        """A digest of the training tokens in their order and layout (`token_digest`): what a resumed run compares."""
        raise NotImplementedError

    def validation_tokens(self) -> int:
        """Tokens of the validation data (what one evaluation reads)."""
        raise NotImplementedError

    def with_validation_blocks(self, max_blocks: int) -> TrainingData:
        """The same data with only the first `max_blocks` validation blocks (at most)."""
        raise NotImplementedError

    def with_validation_tokens(self, max_tokens: int) -> TrainingData:
        """The same data with the validation data cut to its first `max_tokens` tokens (whole blocks, at least one)."""
        return self.with_validation_blocks(max(1, max_tokens // self.block_size))


class BlockData(TrainingData):
    """Training and validation text as independent blocks (each starting from a zero state)."""

    def summary(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        block_size = self.block_size
        return {
            "train_blocks": len(self.train),
            "eval_blocks": len(self.validation),
            "block_size": block_size,
            "train_tokens": self.train_tokens(),
            "eval_tokens": len(self.validation) * block_size,
            "scored_tokens": len(self.validation) * (block_size - 1),
            "validation_bytes": max(1, sum(self.validation["scored_bytes"])),
            "evaluation_method": f"in independent blocks of {block_size} tokens (each block starts from a zero state; "
            "its first token is not scored)",
            "bptt": "truncated at each block (every block starts from a zero state)",
        }

    def train_tokens(self) -> int:
        return len(self.train) * self.block_size

    def train_digest(self) -> str:
        rows = self.train.with_format("numpy", columns=["input_ids"]).iter(batch_size=32_768)
        return token_digest([np.array([self.block_size]), *(batch["input_ids"] for batch in rows)])

    def validation_tokens(self) -> int:
        return len(self.validation) * self.block_size

    def with_validation_blocks(self, max_blocks: int) -> BlockData:
        return dataclasses.replace(self, validation=_first(self.validation, max_blocks))


def _first(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def build_block_data(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    num_proc: int | None = None,
) -> BlockData:
    """Tokenises the `train` and `validation` documents of `raw` into independent blocks (`tokenize_dataset`)."""
    blocks = tokenize_dataset(raw, tokenizer, block_size, num_proc)
    return BlockData(
        train=_first(blocks["train"], max_train_blocks),
        validation=_first(blocks["validation"], max_eval_blocks),
        collator=collate_blocks,
        block_size=block_size,
    )
