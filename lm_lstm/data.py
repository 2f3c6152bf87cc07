"""Text data for training and evaluation: files or Hub datasets -> token blocks, through `datasets`.

A `.txt` file is one document; each record of a `.json`/`.jsonl`/`.csv`/`.parquet` file or Hub dataset is one
document. Documents are cut into pieces at line boundaries (so tokenisation runs in parallel and in bounded memory),
tokenised, joined with the EOS token after each document, and grouped into blocks of `block_size` tokens. Every
step is a `Dataset.map`, so the `datasets` cache lets a second run skip the work.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from .tokenization import document_start_id

DEFAULT_CORPUS = Path(__file__).with_name("corpus") / "tiny_shakespeare.txt"
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PIECE_CHARS = 1 << 16  # documents are tokenised in pieces of about this many characters
_SNIFF_BYTES = 1 << 20


class DataError(ValueError):
    """A data file or dataset that cannot be used; the message names it and says why."""


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
    with path.open("rb") as handle:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        while chunk := handle.read(_SNIFF_BYTES):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {offset + error.start}).") from None
            if "\x00" in text:
                raise DataError(f"{path}: not a text file (it contains NUL bytes).")
            has_text = has_text or not text.isspace() and text != ""
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (it ends inside a multi-byte character).") from None
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


def load_documents(files: list[str], text_column: str = "text") -> Dataset:
    """Loads local files (all of one kind) as a dataset of documents with a single `text` column."""
    for path in files:
        check_text_file(path)
    suffixes = sorted({Path(p).suffix.lower() for p in files})
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"All data files must be of one kind, got {', '.join(suffixes)}.")
    builder = builders.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    return _text_column_only(load_dataset(builder, data_files={"train": files}, split="train", **options), text_column)


def load_text_datasets(source: DataSource) -> DatasetDict:
    """Loads the documents as a `DatasetDict` with `train` and `validation` splits and a single `text` column."""
    if source.dataset_name:
        raw = load_dataset(source.dataset_name, source.dataset_config_name)
        raw = DatasetDict({split: _text_column_only(ds, source.text_column) for split, ds in raw.items()})
    else:
        raw = DatasetDict(train=load_documents(source.train_files, source.text_column))
        if source.validation_files:
            raw["validation"] = load_documents(source.validation_files, source.text_column)
    if "validation" not in raw:
        raw = carve_validation(raw["train"], source.validation_split_percentage)
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def _text_column_only(dataset: Dataset, column: str) -> Dataset:
    if column not in dataset.column_names:
        raise DataError(f"The data has no column {column!r} (it has {dataset.column_names}); name it with --text_column.")
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")


def carve_validation(train: Dataset, percentage: float) -> DatasetDict:
    """Splits off the last `percentage` % by position as validation text.

    With a single document (one text file), the cut falls inside it, at a character position; with several, the
    last documents go to validation. Either way validation text is never seen in training.
    """
    if len(train) == 1:
        text = train[0]["text"]
        cut = int(len(text) * (1 - percentage / 100))
        if cut == 0 or cut == len(text):
            raise DataError(f"The training text ({len(text)} characters) is too short to split off a validation part.")
        # Maps rather than new in-memory datasets, so the `datasets` cache still covers what follows.
        return DatasetDict(
            train=train.map(lambda batch: {"text": [batch["text"][0][:cut]]}, batched=True, desc="Carving train"),
            validation=train.map(
                lambda batch: {"text": [batch["text"][0][cut:]]}, batched=True, desc="Carving validation"
            ),
        )
    cut = len(train) - max(1, math.ceil(len(train) * percentage / 100))
    if cut < 1:
        raise DataError(f"The training data ({len(train)} documents) is too small to split off a validation part.")
    return DatasetDict(train=train.select(range(cut)), validation=train.select(range(cut, len(train))))


def split_into_pieces(batch: dict[str, list]) -> dict[str, list]:
    """Cuts documents into pieces of about `PIECE_CHARS` characters at line ends; marks each document's last piece."""
    pieces, ends = [], []
    for text in batch["text"]:
        if not text:
            continue
        start = 0
        while start < len(text):
            stop = text.find("\n", start + PIECE_CHARS)
            stop = len(text) if stop == -1 else stop + 1
            pieces.append(text[start:stop])
            ends.append(stop == len(text))
            start = stop
    return {"text": pieces, "ends_document": ends}


def tokenize_documents(raw, tokenizer: PreTrainedTokenizerBase, num_proc: int | None = None):
    """Tokenises a `Dataset` or `DatasetDict` of documents into pieces of `input_ids`, each document ending in EOS."""
    eos = document_start_id(tokenizer)  # ends each document and starts the next

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [piece + [eos] if end else piece for piece, end in zip(ids, batch["ends_document"])]}

    pieces = raw.map(split_into_pieces, batched=True, remove_columns=["text"], desc="Cutting documents")
    return pieces.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=["text", "ends_document"], desc="Tokenizing"
    )


def check_block_size(block_size: int) -> None:
    if block_size < 2:
        raise DataError(f"--block_size must be at least 2 (a token and the one it predicts), got {block_size}.")


def group_blocks(tokens, block_size: int, num_proc: int | None = None):
    """Joins token pieces and cuts them into blocks of `block_size` with `input_ids` and `labels`.

    The tokens left over at the end of each map batch (fewer than `block_size`) are dropped, as in `run_clm.py`:
    at most `block_size - 1` tokens per 1,000 pieces of text (per process).
    """
    check_block_size(block_size)

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for piece in batch["input_ids"] for token in piece]
        usable = len(stream) - len(stream) % block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return tokens.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"Grouping in blocks of {block_size}")


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


class StreamBlocks(torch.utils.data.Dataset):
    """Token streams for stateful truncated BPTT: the text laid out as `num_streams` contiguous streams per process.

    Every document is preceded by the EOS token (a document start, as in training on blocks) and every one of its
    tokens is a target exactly once: row `i` of a stream holds `block_size` inputs and the `block_size` tokens that
    follow them (`shift_labels`, unshifted targets), so the next block continues where this one stopped. A document
    starts at the beginning of a block (the end of the previous one is padding) and that block has `reset=True`:
    the carried state is zeroed there. The block sequence is cut into equal streams (a stream starting inside a
    document resets too, as in AWD-LSTM's batchify); the last streams are filled up with empty blocks.

    Rows are ordered so that a sequential loader with batch size `num_streams`, split across `world_size`
    processes batch by batch in turn (as Accelerate does), gives each process its own streams and, batch after
    batch, the next block of each of them.

    Rows carry no attention mask: padding only ever ends the last block of a document or of a stream, and the state
    after such a block is reset (or never used), so the LSTM may run through the padding (targets -100) on its fast
    unpacked kernel; an attention mask would make it pack every batch holding a padded row.
    """

    def __init__(
        self,
        documents: list[list[int]],
        block_size: int,
        eos_token_id: int,
        pad_token_id: int,
        num_streams: int,
        world_size: int = 1,
        max_blocks: int | None = None,
    ):
        check_block_size(block_size)
        if num_streams < 1 or world_size < 1:
            raise ValueError(f"num_streams and world_size must be >= 1, got {num_streams} and {world_size}.")
        inputs, targets, starts = [], [], []
        for document in documents:
            if not document:
                continue
            padding = -len(document) % block_size
            inputs.append(np.array([eos_token_id, *document[:-1]] + [pad_token_id] * padding, dtype=np.int64))
            targets.append(np.array(document + [-100] * padding, dtype=np.int64))
            first_blocks = np.zeros((len(document) + padding) // block_size, dtype=bool)
            first_blocks[0] = True
            starts.append(first_blocks)
        if not inputs:
            raise DataError("No text to lay out in streams.")
        inputs, targets = np.concatenate(inputs).reshape(-1, block_size), np.concatenate(targets).reshape(-1, block_size)
        starts = np.concatenate(starts)
        if max_blocks is not None:
            inputs, targets, starts = inputs[:max_blocks], targets[:max_blocks], starts[:max_blocks]
        total_streams = num_streams * world_size
        self.blocks_per_stream = math.ceil(len(inputs) / total_streams)
        empty = total_streams * self.blocks_per_stream - len(inputs)
        shape = (total_streams, self.blocks_per_stream, block_size)
        self.inputs = np.concatenate([inputs, np.full((empty, block_size), pad_token_id)]).reshape(shape)
        self.targets = np.concatenate([targets, np.full((empty, block_size), -100)]).reshape(shape)
        self.resets = np.concatenate([starts, np.zeros(empty, dtype=bool)]).reshape(shape[:2])
        self.resets[:, 0] = True
        self.num_streams, self.world_size = num_streams, world_size

    @classmethod
    def from_pieces(cls, pieces, tokenizer: PreTrainedTokenizerBase, block_size: int, num_streams: int, **kwargs):
        """Lays out the documents of a `tokenize_documents` result (pieces, each document's last ending in EOS)."""
        start = document_start_id(tokenizer)
        return cls(
            list(join_documents(pieces["input_ids"], start)),
            block_size,
            eos_token_id=start,
            pad_token_id=tokenizer.pad_token_id,
            num_streams=num_streams,
            **kwargs,
        )

    def __len__(self) -> int:
        return self.inputs.shape[0] * self.inputs.shape[1]

    def _position(self, row: int) -> tuple[int, int]:
        batch, slot = divmod(row, self.num_streams)
        block, process = divmod(batch, self.world_size)
        return process * self.num_streams + slot, block

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} blocks")
        stream, block = self._position(row)
        return {
            "input_ids": torch.from_numpy(self.inputs[stream, block]),
            "shift_labels": torch.from_numpy(self.targets[stream, block]),
            "reset": torch.tensor(bool(self.resets[stream, block])),
        }

    def target_ids(self) -> list[int]:
        """All targets in text order (every token of the text once)."""
        flat = self.targets.reshape(-1)
        return flat[flat != -100].tolist()


def join_documents(pieces: list[list[int]], eos_token_id: int):
    """Joins consecutive token pieces into documents, each ending at a piece that ends in EOS."""
    document: list[int] = []
    for piece in pieces:
        document.extend(piece)
        if piece and piece[-1] == eos_token_id:
            yield document
            document = []
    if document:
        yield document


def collate_stream_blocks(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks `StreamBlocks` rows into a batch."""
    return {key: torch.stack([f[key] for f in features]) for key in features[0]}
