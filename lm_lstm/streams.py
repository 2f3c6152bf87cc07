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

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, SequentialSampler
from transformers import DynamicCache, PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from .configuration_lstm import LSTMConfig
from .data import DataError, TrainingData, check_block_size, tokenize_documents
from .modeling_lstm import CELL_STATE, HIDDEN_STATE
from .tokenization import document_start_id

STREAM_COLUMNS = ("shift_labels", "reset")  # what a stream batch holds beside `input_ids`
STATE_FILE = "stream_state_{}.safetensors"  # in a checkpoint, per process, beside Trainer's rng_state_{}.pth

logger = logging.getLogger(__name__)


class StreamBlocks(Dataset):
    """The stream layout drawn in the module docstring, as rows of `input_ids`, `shift_labels` and `reset`.

    Row `i` holds `block_size` inputs and the `block_size` tokens that follow them as `shift_labels` (unshifted
    targets; -100 at padding), so every token of the text is a target exactly once. Rows carry no attention mask:
    padding only ever ends the last block of a document or of a stream, and the state after such a block is reset
    (or never used), so the LSTM may run through the padding on its fast unpacked kernel; an attention mask would make
    it pack every batch holding a padded row (measured 1.5x slower).

    `document_bytes`, if given, holds the UTF-8 bytes of text each token of `documents` stands for (`token_bytes`
    of `lm_lstm.data`); `target_bytes` is then the bytes that the targets kept (after `max_blocks`) stand for.

    Raises `DataError` when there is no text, `ValueError` for counts below 1.
    """

    def __init__(
        self,
        documents: Iterable[list[int]],
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
        documents = list(documents)
        sizes = list(document_bytes) if document_bytes is not None else [[0] * len(d) for d in documents]
        documents, sizes = [d for d in documents if d], [b for d, b in zip(documents, sizes) if d]
        check_padding(documents, block_size)
        inputs, targets, target_sizes, starts = [], [], [], []
        for document, document_sizes in zip(documents, sizes):
            padding = -len(document) % block_size
            inputs.append(np.array([eos_token_id, *document[:-1]] + [pad_token_id] * padding, dtype=np.int64))
            targets.append(np.array(document + [-100] * padding, dtype=np.int64))
            target_sizes.append(np.array(document_sizes + [0] * padding, dtype=np.int64))
            first_blocks = np.zeros((len(document) + padding) // block_size, dtype=bool)
            first_blocks[0] = True
            starts.append(first_blocks)
        if not inputs:
            raise DataError("No text to lay out in streams.")
        inputs, targets = np.concatenate(inputs).reshape(-1, block_size), np.concatenate(targets).reshape(-1, block_size)
        starts = np.concatenate(starts)
        if max_blocks is not None:
            inputs, targets, starts = inputs[:max_blocks], targets[:max_blocks], starts[:max_blocks]
        kept_sizes = np.concatenate(target_sizes)[: targets.size]
        self.target_bytes = int(kept_sizes.sum()) if document_bytes is not None else None
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
        ends = pieces["ends_document"]
        return cls(
            join_documents(pieces["input_ids"], ends),
            block_size,
            eos_token_id=document_start_id(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            num_streams=num_streams,
            document_bytes=join_documents(pieces["token_bytes"], ends),
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

    @property
    def total_streams(self) -> int:
        """Streams over all processes."""
        return self.num_streams * self.world_size

    def target_ids(self) -> list[int]:
        """All targets in text order (every token of the text once)."""
        flat = self.targets.reshape(-1)
        return flat[flat != -100].tolist()


MAX_PADDING_RATIO = 16  # padded tokens per real token beyond which a layout is refused (on more than a million)


def check_padding(documents: list[list[int]], block_size: int) -> None:
    """Raises `DataError` when padding each document to whole blocks would blow the text up (`--block_size` far
    longer than the documents): more than `MAX_PADDING_RATIO` times its tokens, and over a million."""
    real = sum(len(document) for document in documents)
    padded = sum(-(-len(document) // block_size) * block_size for document in documents)
    if padded > max(MAX_PADDING_RATIO * real, 1 << 20):
        longest = max(len(document) for document in documents)
        raise DataError(
            f"--block_size {block_size} would pad the text's {real:,} tokens to {padded:,} (its longest document has "
            f"{longest:,}); use a smaller --block_size."
        )


def join_documents(pieces: Iterable[list[int]], ends_document: Iterable[bool]) -> Iterator[list[int]]:
    """Joins consecutive pieces (lists of token ids, or of their bytes) into documents, each ending at a piece marked
    as its document's last. (A piece ending in EOS need not end its document: a word-level tokenizer's EOS is also
    its line end.)"""
    document: list[int] = []
    for piece, end in zip(pieces, ends_document):
        document.extend(piece)
        if end:
            yield document
            document = []
    if document:
        yield document


def collate_stream_blocks(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks `StreamBlocks` rows into a batch."""
    return {key: torch.stack([f[key] for f in features]) for key in features[0]}


class StreamData(TrainingData):
    """Training and validation text as `StreamBlocks`."""

    def summary(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        targets = self.validation.target_ids()
        num_bytes = self.validation.target_bytes
        if num_bytes is None:  # a layout made from token ids alone
            num_bytes = len(tokenizer.decode(targets, skip_special_tokens=True).encode("utf-8"))
        return {
            "train_blocks": len(self.train),
            "eval_blocks": len(self.validation),
            "block_size": self.block_size,
            "train_tokens": len(self.train.target_ids()),
            "eval_tokens": len(targets),
            "scored_tokens": len(targets),
            "validation_bytes": max(1, num_bytes),
            "evaluation_method": f"as {self.validation.total_streams} contiguous streams with the state carried from "
            "block to block (reset at document starts): every token is scored once",
            "bptt": f"stateful: {self.train.total_streams} streams, the state carried from batch to batch (reset at "
            "document starts)",
        }


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
        save_file(tensors, str(Path(folder) / STATE_FILE.format(process_index)))

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
