"""`lm_lstm.streams` on its own: the data side (documents to streams) and the state carrier, without a Trainer."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict

from lm_lstm.data import BlockData, DataError, group_blocks, tokenize_documents
from lm_lstm.streams import (
    StatefulBPTT,
    StreamBlocks,
    build_stream_data,
    collate_stream_blocks,
    join_documents,
)
from lm_lstm.tokenization import train_char_tokenizer

from conftest import tiny_model

EOS, PAD = 2, 0


def arguments(**changes) -> SimpleNamespace:
    """The training options `StatefulBPTT` reads, at their defaults."""
    defaults = dict(activation_checkpointing=False, train_sampling_strategy="random", data_seed=None,
                    bf16_full_eval=False, fp16_full_eval=False)
    return SimpleNamespace(**{**defaults, **changes})


def test_join_documents_ends_a_document_at_each_piece_marked_as_its_last():
    pieces = [[5, 6], [7, EOS], [8, EOS], [], [9]]
    ends = [False, True, True, False, False]
    assert list(join_documents(pieces, ends)) == [[5, 6, 7, EOS], [8, EOS], [9]]
    # a piece ending in EOS (a word-level tokenizer's line end) does not end its document unless marked
    assert list(join_documents([[5, EOS], [6, EOS]], [False, True])) == [[5, EOS, 6, EOS]]


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
