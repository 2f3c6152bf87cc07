"""`lm_lstm.streams` on its own: the data side (documents to streams) and the state carrier, without a Trainer."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

import lm_lstm.data
import lm_lstm.streams
from lm_lstm.data import (
    TOKEN_FEATURES, BlockData, DataError, TokenDocuments, build_block_data, group_blocks, token_digest,
    tokenize_documents,
)
from lm_lstm.streams import (
    StatefulBPTT,
    StreamBlocks,
    build_stream_data,
    collate_stream_blocks,
)
from lm_lstm.tokenization import train_char_tokenizer

from conftest import tiny_model
from eager_streams import eager_layout

EOS, PAD = 2, 0


def arguments(**changes) -> SimpleNamespace:
    """The training options `StatefulBPTT` reads, at their defaults."""
    defaults = dict(activation_checkpointing=False, train_sampling_strategy="random", data_seed=None,
                    bf16_full_eval=False, fp16_full_eval=False)
    return SimpleNamespace(**{**defaults, **changes})


def pieces_dataset(pieces, ends):
    return Dataset.from_dict({"input_ids": pieces, "token_bytes": [[1] * len(p) for p in pieces],
                              "ends_document": ends}, features=TOKEN_FEATURES)


def documents_of(token_documents):
    starts = token_documents.starts
    return [token_documents.ids.read(a, b).tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_documents_end_at_each_piece_marked_as_its_last():
    documents = TokenDocuments.from_pieces(pieces_dataset([[5, 6], [7, EOS], [8, EOS], [], [9]],
                                                          [False, True, True, False, False]))
    assert documents_of(documents) == [[5, 6, 7, EOS], [8, EOS], [9]]
    # a piece ending in EOS (a word-level tokenizer's line end) does not end its document unless marked
    assert documents_of(TokenDocuments.from_pieces(pieces_dataset([[5, EOS], [6, EOS]], [False, True]))) == [
        [5, EOS, 6, EOS]]


def test_tokens_are_read_across_arrow_chunks_without_copying_them_whole():
    from datasets import concatenate_datasets

    parts = [pieces_dataset([[5, 6, 7]], [False]), pieces_dataset([[8], [9, EOS]], [False, True])]
    documents = TokenDocuments.from_pieces(concatenate_datasets(parts))
    assert len(documents.ids.parts) == 2 and documents.ids.read(1, 5).tolist() == [6, 7, 8, 9]
    assert documents.ids.read(3, 3).tolist() == [] and documents.starts.tolist() == [0, 6]


def test_built_streams_hold_every_token_of_each_split_once(char_tokenizer):
    raw = DatasetDict(train=Dataset.from_dict({"text": ["To be, or not", "to be"]}),
                      validation=Dataset.from_dict({"text": ["that is the question"]}))
    data = build_stream_data(raw, char_tokenizer, block_size=4, train_streams=2, eval_streams=1)
    encode = lambda text: char_tokenizer(text, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    assert data.train.target_ids() == encode("To be, or not") + encode("to be")
    assert data.validation.target_ids() == encode("that is the question")
    assert data.train.num_streams == 2 and data.collator is collate_stream_blocks
    summary = data.summary(char_tokenizer)
    assert summary["eval_tokens"] == summary["scored_tokens"] == len("that is the question") + 1
    assert summary["validation_bytes"] == len("that is the question")  # EOS stands for no text
    assert summary["bptt"].startswith("stateful: 2 streams") and "as 1 contiguous streams" in summary["evaluation_method"]


def test_collated_stream_batch_has_one_row_per_stream():
    layout = StreamBlocks([list(range(10, 30)) + [EOS]], block_size=4, eos_token_id=EOS, pad_token_id=PAD, num_streams=3)
    batch = collate_stream_blocks([layout[row] for row in range(3)])
    assert batch["input_ids"].shape == batch["shift_labels"].shape == (3, 4)
    assert batch["reset"].tolist() == [True, True, True]  # every stream's first block starts afresh


def test_the_layout_is_decided_from_the_datasets():
    streams = StreamBlocks([[5, 6, EOS]], block_size=2, eos_token_id=EOS, pad_token_id=PAD, num_streams=1)
    model = tiny_model()
    assert StatefulBPTT.for_datasets(model, arguments(), None, None) is None
    assert StatefulBPTT.for_datasets(model, arguments(), [1, 2], None) is None
    assert isinstance(StatefulBPTT.for_datasets(model, arguments(), streams, None), StatefulBPTT)
    with pytest.raises(ValueError, match="both be streams"):
        StatefulBPTT.for_datasets(model, arguments(), streams, [1, 2])
    with pytest.raises(ValueError, match="Linear has none"):
        StatefulBPTT.for_datasets(torch.nn.Linear(2, 2), arguments(), streams)
    with pytest.raises(ValueError, match="checkpointing"):
        StatefulBPTT.for_datasets(model, arguments(activation_checkpointing=True), streams)
    with pytest.raises(ValueError, match="compute_metrics"):
        StatefulBPTT.for_datasets(model, arguments(), streams, compute_metrics=lambda prediction: {})


def test_the_carried_state_continues_each_stream_and_restarts_at_a_reset():
    model = tiny_model()
    carrier = StatefulBPTT(model, arguments())
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    first = carrier.model_inputs("train", {"input_ids": ids[:, :5], "reset": torch.tensor([True, True])})
    assert not first["cache"].layers or not first["cache"].layers[0].is_recurrent_states_initialized[0]
    carrier.carry("train", model(**first).cache)
    second = carrier.model_inputs("train", {"input_ids": ids[:, 5:], "reset": torch.tensor([False, True])})
    assert "reset" not in second and second["use_cache"] is True
    logits = model(**second).logits
    torch.testing.assert_close(logits[0], model(ids[:1]).logits[0, 5:])  # continued: as one pass over both blocks
    torch.testing.assert_close(logits[1], model(ids[1:, 5:]).logits[0])  # reset: as a fresh start

    carrier.carry("train", model(**carrier.model_inputs("train", {"input_ids": ids[:, :5],
                                                                  "reset": torch.tensor([True, True])})).cache)
    carrier.reset("train")
    fresh = carrier.model_inputs("train", {"input_ids": ids[:, 5:], "reset": torch.tensor([False, False])})
    torch.testing.assert_close(model(**fresh).logits, model(ids[:, 5:]).logits)


def test_the_carried_state_is_detached_and_kept_per_split():
    model = tiny_model().train()
    carrier = StatefulBPTT(model, arguments())
    ids = torch.randint(3, 40, (1, 4), generator=torch.Generator().manual_seed(1))
    outputs = model(**carrier.model_inputs("train", {"input_ids": ids, "reset": torch.tensor([True])}))
    carrier.carry("train", outputs.cache)
    next_inputs = carrier.model_inputs("train", {"input_ids": ids, "reset": torch.tensor([False])})
    state = next_inputs["cache"].layers[0].recurrent_states[0]
    assert state.abs().sum() > 0 and not state.requires_grad  # the gradient stops at the batch boundary
    evaluation = carrier.model_inputs("eval", {"input_ids": ids, "reset": torch.tensor([False])})
    assert not evaluation["cache"].layers or not evaluation["cache"].layers[0].is_recurrent_states_initialized[0]


def test_training_data_digests_tell_the_same_tokens_from_others():
    """The digest a resumed run compares: the same for the same text however it is laid out in memory, another for
    the same characters in another order, another block size or another layout."""
    def digests(texts: list[str], block_size: int = 4) -> tuple[str, str]:
        raw = DatasetDict(train=Dataset.from_dict({"text": texts}), validation=Dataset.from_dict({"text": texts}))
        return (build_block_data(raw, tokenizer, block_size).train_digest(),
                build_stream_data(raw, tokenizer, block_size, train_streams=2, eval_streams=1).train_digest())

    tokenizer = train_char_tokenizer(["abcdefgh"])
    blocks, streams = digests(["abcdefgh", "hgfedcba"])
    assert len({blocks, streams}) == 2  # the layouts read the tokens differently
    assert digests(["abcdefgh", "hgfedcba"]) == (blocks, streams)
    assert len({blocks, streams, *digests(["abcdefgh", "hgfeecba"]), *digests(["hgfedcba", "abcdefgh"]),
                *digests(["abcdefgh", "hgfedcba"], block_size=3)}) == 8
    assert token_digest([np.arange(5, dtype=np.int32)]) == token_digest([np.arange(2), np.arange(2, 5)])


def test_block_data_summary_counts_scored_tokens_and_their_bytes():
    tokenizer = train_char_tokenizer(["abécdefghijk"])
    blocks = group_blocks(tokenize_documents(Dataset.from_dict({"text": ["abécdefghijk"]}), tokenizer), 4)
    assert blocks["input_ids"] == [ids[i : i + 4] for ids in [tokenizer("abécdefghijk")["input_ids"]] for i in (0, 4, 8)]
    summary = BlockData(train=blocks, validation=blocks, collator=None, block_size=4).summary(tokenizer)
    # [a b é c] [d e f g] [h i j k] (EOS left over): the first of each block is not scored; é is 2 bytes
    assert (summary["train_tokens"], summary["scored_tokens"], summary["validation_bytes"]) == (12, 9, 10)
    assert summary["bptt"].startswith("truncated at each block")


def test_a_block_size_far_beyond_the_documents_is_refused_before_any_padding():
    with pytest.raises(DataError, match="--block_size 100000000 would pad the text's 3 tokens"):
        StreamBlocks([[5, 6, EOS]], block_size=100_000_000, eos_token_id=EOS, pad_token_id=PAD, num_streams=1)
    short_documents = [[5, EOS]] * 10  # padded 64x, but small: a legitimate layout of short documents
    assert len(StreamBlocks(short_documents, block_size=128, eos_token_id=EOS, pad_token_id=PAD, num_streams=2)) == 10


def test_a_checkpoint_state_for_other_streams_is_refused(tmp_path):
    model = tiny_model()
    carrier = StatefulBPTT(model, arguments())
    outputs = model(**carrier.model_inputs("train", {"input_ids": torch.ones(3, 4, dtype=torch.long),
                                                      "reset": torch.tensor([True] * 3)}))
    carrier.carry("train", outputs.cache)
    carrier.save(tmp_path)
    carrier.load(tmp_path, num_streams=3)  # the same run resumes
    with pytest.raises(ValueError, match="--per_device_train_batch_size"):
        carrier.load(tmp_path, num_streams=2)


def eager_rows(inputs, targets, resets, num_streams, world_size):
    """The rows of an eager layout in the order `StreamBlocks` hands them out (its module docstring)."""
    rows = []
    for block in range(inputs.shape[1]):
        for stream in range(num_streams * world_size):
            rows.append((inputs[stream, block].tolist(), targets[stream, block].tolist(), bool(resets[stream, block])))
    return rows


@pytest.mark.parametrize("num_streams, world_size, max_blocks", [
    (1, 1, None), (3, 1, None), (2, 2, None), (2, 2, 7), (3, 2, 1), (4, 2, 1000),
])
def test_the_lazy_layout_is_the_eager_one(num_streams, world_size, max_blocks, char_tokenizer, shakespeare_text,
                                          monkeypatch):
    """Read from memory-mapped pieces (several per document), the layout is the one the eager implementation built:
    the same rows, resets and target bytes, for one process or two."""
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 500)
    monkeypatch.setattr(lm_lstm.streams, "READ_TOKENS", 7)  # target bytes summed in several reads per document
    texts = [shakespeare_text[:3000], "", "a", shakespeare_text[3000:3100] + "é\n", shakespeare_text[5000:7000]]
    pieces = tokenize_documents(Dataset.from_dict({"text": texts}), char_tokenizer)
    assert len(pieces) > len(texts)
    layout = StreamBlocks.from_pieces(pieces, char_tokenizer, block_size=16, num_streams=num_streams,
                                      world_size=world_size, max_blocks=max_blocks)
    documents, sizes = [], []
    for piece, piece_sizes, end in zip(pieces["input_ids"], pieces["token_bytes"], pieces["ends_document"]):
        if not documents or documents[-1][1]:
            documents.append(([], False))
            sizes.append([])
        documents[-1][0].extend(piece)
        documents[-1] = (documents[-1][0], end)
        sizes[-1].extend(piece_sizes)
    inputs, targets, resets, target_bytes = eager_layout(
        [document for document, _ in documents], 16, char_tokenizer.eos_token_id, char_tokenizer.pad_token_id,
        num_streams, world_size, max_blocks, sizes)
    np.testing.assert_array_equal(layout.inputs, inputs)
    np.testing.assert_array_equal(layout.targets, targets)
    np.testing.assert_array_equal(layout.resets, resets)
    assert layout.target_bytes == target_bytes and target_bytes > 0
    assert layout.num_targets == int((targets != -100).sum())
    rows = [layout[row] for row in range(len(layout))]
    assert [(r["input_ids"].tolist(), r["shift_labels"].tolist(), bool(r["reset"])) for r in rows] == eager_rows(
        inputs, targets, resets, num_streams, world_size)


@pytest.mark.parametrize("num_streams", [1, 3])
def test_each_process_reads_only_the_tokens_of_its_own_streams(num_streams):
    """Accelerate hands process p the batches p, p + 2, ...: reading them touches only its streams' tokens (and the
    one token before each of its blocks, an input)."""
    tokens = list(range(1000, 1000 + 203))  # each token is 1000 + its position in the text
    layout = StreamBlocks([tokens], block_size=5, eos_token_id=EOS, pad_token_id=PAD, num_streams=num_streams,
                          world_size=2)
    reads = {0: [], 1: []}
    original = layout.documents.ids.read
    batches = [range(start, start + num_streams) for start in range(0, len(layout), num_streams)]
    for process in (0, 1):
        layout.documents.ids.read = lambda start, stop, process=process: reads[process].append((start, stop)) or \
            original(start, stop)
        for batch in batches[process::2]:
            for row in batch:
                layout[row]
    boundary = num_streams * layout.blocks_per_stream * 5  # the first token of process 1's first stream
    assert reads[0] and reads[1]
    assert max(stop for _, stop in reads[0]) <= boundary
    assert min(start for start, _ in reads[1]) == boundary - 1  # the input before its first block
