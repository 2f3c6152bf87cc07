"""Stateful truncated backpropagation through time (`--stateful`): the text as contiguous streams, and the state
carried along them from batch to batch.

The layout (`StreamBlocks`). Every document is preceded by the document-start token (EOS) and cut into blocks of
`block_size` tokens; a document starts a new block (`R`: the carried state is zeroed there) and its last block is
padded (`.`):

    documents:  EOS d1 d1 d1 d1 d1   EOS d2 d2 d2 d2 d2 d2 d2 d2   EOS d3
    blocks:     [R d1 d1 d1][d1 d1 . .][R d2 d2 d2][d2 d2 d2 d2][d2 . . .][R d3 . .] ...   (block_size 4)

The sequence of blocks is cut into `num_streams x world_size` equal streams (AWD-LSTM's `batchify`), one row of
blocks each; a stream that starts inside a document resets there too:

                 batch 0  batch 1  batch 2
    stream 0     [b0]     [b1]     [b2]       process 0, slot 0
    stream 1     [b3]     [b4]     [b5]       process 0, slot 1
    stream 2     [b6]     [b7]     [b8]       process 1, slot 0
    stream 3     [b9]     [b10]    [b11]      process 1, slot 1

Batch t of a process holds block t of each of its streams, so the state a stream ends batch t with is the state
its batch t + 1 starts from. The rows are ordered (b0 b3 | b6 b9 | b1 b4 | b7 b10 | ...) so that a sequential
loader with batch size `num_streams`, its batches handed to the processes in turn (as Accelerate does), gives
exactly that.

The trainer's side (`StatefulBPTT`): it keeps each stream's final (h, c), detached, zeroes it where a block resets,
and hands it to the model as the cache of the next batch; evaluation runs the same way, so every validation token is
scored once, with its left context.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, SequentialSampler
from transformers import DynamicCache, PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from .configuration_lstm import LSTMConfig
from .data import DataError, TokenDocuments, TrainingData, check_block_size, token_digest, tokenize_documents
from .modeling_lstm import CELL_STATE, HIDDEN_STATE, plain_file_permissions
from .tokenization import document_start_id

STREAM_COLUMNS = ("shift_labels", "reset")  # what a stream batch holds beside `input_ids`
READ_TOKENS = 1 << 20  # token sizes summed a million at a time, whatever the length of a document
STATE_FILE = "stream_state_{}.safetensors"  # in a checkpoint, per process, beside Trainer's rng_state_{}.pth

logger = logging.getLogger(__name__)


class StreamBlocks(Dataset):
    """The stream layout drawn in the module docstring, as rows of `input_ids`, `shift_labels` and `reset`.

    Row `i` holds `block_size` inputs and the `block_size` tokens that follow them as `shift_labels` (unshifted
    targets; -100 at padding), so every token of the text is a target exactly once. Rows carry no attention mask:
    padding only ever ends the last block of a document or of a stream, and the state after such a block is reset
    (or never used), so the LSTM may run through the padding on its fast unpacked kernel; an attention mask would make
    it pack every batch holding a padded row (measured 1.5x slower).

    The layout is an index, not a copy of the text: where each document starts among the tokens and in the sequence
    of blocks (a few numbers per document). A row is read from the tokens when it is asked for, so memory does not
    grow with the corpus, and under DDP each process reads only the rows, and so the streams, of its own batches.
    `documents` are `TokenDocuments` (memory-mapped from a tokenised dataset by `from_pieces`) or lists of token ids;
    with lists, `document_bytes` may give the UTF-8 bytes of text each token stands for (`token_bytes` of
    `lm_lstm.data`). `target_bytes` is the bytes that the targets kept (after `max_blocks`) stand for.

    Raises `DataError` when there is no text, `ValueError` for counts below 1.
    """

    def __init__(
        self,
        documents: TokenDocuments | Iterable[list[int]],
        block_size: int,
        eos_token_id: int,
        pad_token_id: int,
        num_streams: int,
        world_size: int = 1,
        max_blocks: int | None = None,
        document_bytes: Iterable[list[int]] | None = None,
    ):
        check_block_size(block_size)
        if num_streams < 1 or world_size < 1:
            raise ValueError(f"num_streams and world_size must be >= 1, got {num_streams} and {world_size}.")
        if not isinstance(documents, TokenDocuments):
            documents = TokenDocuments.from_lists(list(documents), None if document_bytes is None else list(document_bytes))
        self.documents = documents
        lengths = np.diff(documents.starts)
        kept = lengths > 0  # an empty document has no block
        self._starts, self._lengths = documents.starts[:-1][kept], lengths[kept]
        if not len(self._lengths):
            raise DataError("No text to lay out in streams.")
        check_padding(self._lengths, block_size)
        # The block each document starts at, and (last) the number of blocks.
        self._first_blocks = np.concatenate([[0], np.cumsum(-(-self._lengths // block_size))])
        self.num_blocks = int(self._first_blocks[-1]) if max_blocks is None else min(int(self._first_blocks[-1]), max_blocks)
        self.block_size, self.eos_token_id, self.pad_token_id = block_size, eos_token_id, pad_token_id
        self.num_streams, self.world_size = num_streams, world_size
        self.blocks_per_stream = math.ceil(self.num_blocks / self.total_streams)

    @classmethod
    def from_pieces(cls, pieces, tokenizer: PreTrainedTokenizerBase, block_size: int, num_streams: int, **kwargs):
        """Lays out the documents of a `tokenize_documents` result (pieces, each document's last ending in EOS), read
        in place from its memory-mapped Arrow data."""
        return cls(TokenDocuments.from_pieces(pieces), block_size, eos_token_id=document_start_id(tokenizer),
                   pad_token_id=tokenizer.pad_token_id, num_streams=num_streams, **kwargs)

    def with_max_blocks(self, max_blocks: int | None) -> StreamBlocks:
        """The same text and streams, only the first `max_blocks` blocks kept (None: all of them)."""
        return StreamBlocks(self.documents, self.block_size, self.eos_token_id, self.pad_token_id, self.num_streams,
                            self.world_size, max_blocks)

    def __len__(self) -> int:
        return self.total_streams * self.blocks_per_stream

    @property
    def total_streams(self) -> int:
        """Streams over all processes."""
        return self.num_streams * self.world_size

    def _position(self, row: int) -> tuple[int, int]:
        batch, slot = divmod(row, self.num_streams)
        block, process = divmod(batch, self.world_size)
        return process * self.num_streams + slot, block

    def _kept_targets(self) -> np.ndarray:
        """Targets of each document within the first `num_blocks` blocks."""
        kept_blocks = np.clip(self.num_blocks - self._first_blocks[:-1], 0, None)
        return np.minimum(self._lengths, kept_blocks * self.block_size)

    def block(self, stream: int, block: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Block `block` of stream `stream`: inputs and targets (int64 arrays of shape `(block_size,)`) and whether
        the state resets before it."""
        inputs = np.full(self.block_size, self.pad_token_id, dtype=np.int64)
        targets = np.full(self.block_size, -100, dtype=np.int64)
        index = stream * self.blocks_per_stream + block  # in the sequence of blocks
        if index >= self.num_blocks:  # an empty block filling the last stream
            return inputs, targets, block == 0
        document = int(np.searchsorted(self._first_blocks, index, side="right")) - 1
        first = int(index - self._first_blocks[document])  # the document's first block is 0
        start = int(self._starts[document]) + first * self.block_size
        stop = min(start + self.block_size, int(self._starts[document] + self._lengths[document]))
        tokens = self.documents.ids.read(start - (first > 0), stop)  # with the token before, which is an input
        count = stop - start
        targets[:count] = tokens[-count:]
        inputs[0] = tokens[0] if first else self.eos_token_id  # a document starts from EOS
        inputs[1:count] = targets[: count - 1]
        return inputs, targets, first == 0 or block == 0

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} blocks")
        inputs, targets, reset = self.block(*self._position(row))
        return {"input_ids": torch.from_numpy(inputs), "shift_labels": torch.from_numpy(targets),
                "reset": torch.tensor(reset)}

    def _whole(self, part: int) -> np.ndarray:
        return np.array([[self.block(stream, block)[part] for block in range(self.blocks_per_stream)]
                         for stream in range(self.total_streams)])

    @property
    def inputs(self) -> np.ndarray:
        """All inputs, of shape `(total_streams, blocks_per_stream, block_size)`: a copy of the text, to inspect
        small layouts (training reads rows)."""
        return self._whole(0)

    @property
    def targets(self) -> np.ndarray:
        """All targets, as `inputs` (-100 at padding)."""
        return self._whole(1)

    @property
    def resets(self) -> np.ndarray:
        """Whether the state resets before each block, of shape `(total_streams, blocks_per_stream)`."""
        resets = np.zeros(self.total_streams * self.blocks_per_stream, dtype=bool)
        starts = self._first_blocks[:-1]
        resets[starts[starts < self.num_blocks]] = True
        resets = resets.reshape(self.total_streams, self.blocks_per_stream)
        resets[:, 0] = True
        return resets

    @property
    def num_targets(self) -> int:
        """Tokens of text the layout predicts (all but padding), counted from the index."""
        return int(self._kept_targets().sum())

    @functools.cached_property
    def target_bytes(self) -> int | None:
        """UTF-8 bytes of text the targets stand for (None when the documents carry no sizes); read from the token
        sizes, a document at a time, when first asked for."""
        sizes = self.documents.sizes
        if sizes is None:
            return None
        kept = self._kept_targets()
        return sum(int(sizes.read(begin, min(begin + READ_TOKENS, int(start + count))).sum())
                   for start, count in zip(self._starts[kept > 0], kept[kept > 0])
                   for begin in range(int(start), int(start + count), READ_TOKENS))

    def target_ids(self) -> list[int]:
        """All targets in text order (every token of the text once), as a list: for inspecting small layouts."""
        kept = self._kept_targets()
        return [int(token) for start, count in zip(self._starts, kept) if count
                for token in self.documents.ids.read(int(start), int(start + count))]


MAX_PADDING_RATIO = 16  # padded tokens per real token beyond which a layout is refused (on more than a million)


def check_padding(lengths: np.ndarray, block_size: int) -> None:
    """Raises `DataError` when padding documents of `lengths` tokens to whole blocks would blow the text up
    (`--block_size` far longer than the documents): more than `MAX_PADDING_RATIO` times its tokens, and over a
    million."""
    real = int(lengths.sum())
    padded = int((-(-lengths // block_size) * block_size).sum())
    if padded > max(MAX_PADDING_RATIO * real, 1 << 20):
        raise DataError(
            f"--block_size {block_size} would pad the text's {real:,} tokens to {padded:,} (its longest document has "
            f"{int(lengths.max()):,}); use a smaller --block_size."
        )


def collate_stream_blocks(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks `StreamBlocks` rows into a batch."""
    return {key: torch.stack([f[key] for f in features]) for key in features[0]}


class StreamData(TrainingData):
    """Training and validation text as `StreamBlocks`."""

    def summary(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        num_bytes = self.validation.target_bytes
        if num_bytes is None:  # a layout made from token ids alone
            num_bytes = len(tokenizer.decode(self.validation.target_ids(), skip_special_tokens=True).encode("utf-8"))
        return {
            "train_blocks": len(self.train),
            "eval_blocks": len(self.validation),
            "block_size": self.block_size,
            "train_tokens": self.train_tokens(),
            "eval_tokens": self.validation_tokens(),
            "scored_tokens": self.validation_tokens(),
            "validation_bytes": max(1, num_bytes),
            "evaluation_method": f"as {self.validation.total_streams} contiguous streams with the state carried from "
            "block to block (reset at document starts): every token is scored once",
            "bptt": f"stateful: {self.train.total_streams} streams, the state carried from batch to batch (reset at "
            "document starts)",
        }

    def train_tokens(self) -> int:
        return self.train.num_targets

    def train_digest(self) -> str:
        documents = self.train.documents
        return token_digest([np.array([self.block_size]), documents.starts, *documents.ids.parts])

    def validation_tokens(self) -> int:
        return self.validation.num_targets

    def with_validation_blocks(self, max_blocks: int) -> StreamData:
        return dataclasses.replace(self, validation=self.validation.with_max_blocks(
            min(max_blocks, self.validation.num_blocks)))


def build_stream_data(
    raw,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    train_streams: int,
    eval_streams: int,
    world_size: int = 1,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    num_proc: int | None = None,
) -> StreamData:
    """Tokenises the `train` and `validation` documents of `raw` and lays each split out as streams (per process)."""
    pieces = tokenize_documents(raw, tokenizer, num_proc)
    train, validation = (
        StreamBlocks.from_pieces(pieces[split], tokenizer, block_size, streams, world_size=world_size, max_blocks=limit)
        for split, streams, limit in (
            ("train", train_streams, max_train_blocks),
            ("validation", eval_streams, max_eval_blocks),
        )
    )
    return StreamData(train=train, validation=validation, collator=collate_stream_blocks, block_size=block_size)


def check_stateful_arguments(args: TrainingArguments) -> None:
    """Raises `ValueError` for training options that stateful BPTT cannot honour (rather than ignore them)."""
    if args.activation_checkpointing:
        raise ValueError(
            "--stateful needs the state of every batch; it cannot be used with activation (gradient) checkpointing."
        )
    if args.train_sampling_strategy not in ("random", "sequential"):
        raise ValueError(
            f"--train_sampling_strategy {args.train_sampling_strategy} reorders blocks; --stateful reads each stream "
            "in order: use --stateful False."
        )
    if args.data_seed is not None:
        raise ValueError("--data_seed shuffles blocks; --stateful reads each stream in order: use --stateful False.")
    for name in ("bf16_full_eval", "fp16_full_eval"):
        if getattr(args, name):
            raise ValueError(f"--{name} is not supported with --stateful (evaluation runs under --bf16 autocast).")


class StatefulBPTT:
    """The trainer's side of stateful truncated BPTT: each stream's final (h, c), detached, carried to the stream's
    next batch, zeroed where a block resets. Training and evaluation carry separate states (`split`)."""

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, compute_metrics=None):
        if compute_metrics is not None:
            raise ValueError("The stream evaluation computes the loss and perplexity only; `compute_metrics` needs "
                             "--stateful False.")
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != LSTMConfig.model_type:
            raise ValueError(
                f"--stateful carries an LSTM's state; {type(model).__name__} has none: use --stateful False."
            )
        check_stateful_arguments(args)
        self.config = config
        self._states: dict[str, list[tuple[torch.Tensor, torch.Tensor]] | None] = {"train": None, "eval": None}

    @classmethod
    def for_datasets(
        cls, model: torch.nn.Module, args: TrainingArguments, *datasets, compute_metrics=None
    ) -> StatefulBPTT | None:
        """A `StatefulBPTT` if the datasets are streams, None if they are independent blocks; both at once raise
        `ValueError`. This is where a trainer decides, once, which layout it runs."""
        given = [dataset for dataset in datasets if dataset is not None]
        streams = [isinstance(dataset, StreamBlocks) for dataset in given]
        if not any(streams):
            return None
        if not all(streams):
            raise ValueError("Training and evaluation data must both be streams (--stateful) or both blocks.")
        return cls(model, args, compute_metrics)

    @staticmethod
    def sampler(dataset: StreamBlocks) -> SequentialSampler:
        return SequentialSampler(dataset)  # the rows are already in stream order

    def reset(self, split: str) -> None:
        """Forgets the carried state: the next batch starts every stream from zeros."""
        self._states[split] = None

    def model_inputs(self, split: str, batch: dict) -> dict:
        """The model's inputs for a stream batch: `batch` without `reset`, with a cache holding the state the previous
        batch of these streams ended with, zeroed where a stream resets."""
        inputs = dict(batch)
        reset = inputs.pop("reset")
        cache = DynamicCache(config=self.config)
        states = self._states[split]
        if states is not None:
            keep = (~reset.to(states[0][0].device))[:, None]
            for layer_idx, layer_states in enumerate(states):
                for slot, state in zip((HIDDEN_STATE, CELL_STATE), layer_states):
                    cache.update_recurrent_state(state * keep, layer_idx, state_idx=slot)
        return {**inputs, "cache": cache, "use_cache": True}

    def carry(self, split: str, cache: DynamicCache) -> None:
        """Keeps the state the batch ended with (detached: the gradient stops at the batch boundary)."""
        self._states[split] = [
            tuple(layer.recurrent_states[slot].detach() for slot in (HIDDEN_STATE, CELL_STATE)) for layer in cache.layers
        ]

    def save(self, folder: str | Path, process_index: int = 0) -> None:
        """Writes the training streams' carried state into a checkpoint folder (`stream_state_{process_index}`
        .safetensors, one file per process as each reads its own streams), so that a resumed run continues exactly."""
        states = self._states["train"]
        if states is None:
            return
        tensors = {f"{name}.{layer_idx}": state.contiguous() for layer_idx, layer_states in enumerate(states)
                   for name, state in zip(("hidden", "cell"), layer_states)}
        path = str(Path(folder) / STATE_FILE.format(process_index))
        with plain_file_permissions(glob.escape(path)):  # readable by whoever may read the checkpoint
            save_file(tensors, path)

    def load(
        self, folder: str | Path, num_streams: int, process_index: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        """Restores the training streams' state that `save` wrote; a checkpoint without one restarts from zeros.

        Raises `ValueError` if it was written for another number of streams (`--per_device_train_batch_size`) or
        another model."""
        path = Path(folder) / STATE_FILE.format(process_index)
        if not path.is_file():
            logger.warning(f"{path} not found: the resumed run restarts the carried state of its streams from zeros.")
            self.reset("train")
            return
        tensors = {name: tensor.to(device) for name, tensor in load_file(str(path)).items()}
        found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        expected = {f"{name}.{layer_idx}": (num_streams, size) for layer_idx, (_, size) in
                    enumerate(self.config.layer_sizes) for name in ("hidden", "cell")}
        if found != expected:
            raise ValueError(
                f"{path} holds states of shapes {sorted(set(found.values()))}, this run's are "
                f"{sorted(set(expected.values()))} (streams x hidden size): resume with the "
                "--per_device_train_batch_size and model of the run that wrote it."
            )
        self._states["train"] = [
            (tensors[f"hidden.{layer_idx}"], tensors[f"cell.{layer_idx}"]) for layer_idx in range(len(tensors) // 2)
        ]

    @torch.no_grad()
    def evaluation_loop(self, trainer, dataloader, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Exact mean NLL per token (nats) over the streams, the state carried through each, summed over processes."""
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        model.eval()
        self.reset("eval")
        total = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)  # summed NLL, targets
        for batch in dataloader:
            batch = trainer._prepare_inputs(batch)
            with trainer.autocast_smart_context_manager():
                # With `num_items_in_batch=1` the loss is the summed NLL of the batch.
                outputs = model(**self.model_inputs("eval", batch), num_items_in_batch=1)
            self.carry("eval", outputs.cache)
            total += torch.stack([outputs.loss.double(), batch["shift_labels"].ne(-100).sum().double()])
        self.reset("eval")
        nll, count = trainer.accelerator.reduce(total, reduction="sum").tolist()
        metrics = {f"{metric_key_prefix}_loss": nll / max(count, 1)}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset))
