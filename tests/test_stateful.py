"""Stateful truncated BPTT: the stream layout, and the state carried by `LSTMTrainer` in training and evaluation."""

import numpy as np
import pytest
import torch

from lm_lstm.streams import StreamBlocks, collate_stream_blocks
from lm_lstm.evaluation import score_stream
from lm_lstm.arguments import LSTMTrainingArguments
from lm_lstm.trainer import LSTMTrainer

from conftest import tiny_model

EOS, PAD = 2, 0


def test_streams_hold_every_token_once_with_eos_before_each_document():
    layout = StreamBlocks([[5, 6, 7, 2], [8, 9, 2]], block_size=2, eos_token_id=EOS, pad_token_id=PAD, num_streams=2)
    np.testing.assert_array_equal(layout.inputs, [[[2, 5], [6, 7]], [[2, 8], [9, 0]]])
    np.testing.assert_array_equal(layout.targets, [[[5, 6], [7, 2]], [[8, 9], [2, -100]]])
    np.testing.assert_array_equal(layout.resets, [[True, False], [True, False]])
    assert layout.target_ids() == [5, 6, 7, 2, 8, 9, 2]
    assert [layout[row]["input_ids"].tolist() for row in range(4)] == [[2, 5], [2, 8], [6, 7], [9, 0]]
    assert layout[3]["shift_labels"].tolist() == [2, -100] and "attention_mask" not in layout[3]  # runs through


def test_a_document_starts_a_block_and_resets_the_state():
    layout = StreamBlocks([[5, 2], [6, 7, 8, 2]], block_size=3, eos_token_id=EOS, pad_token_id=PAD, num_streams=1)
    np.testing.assert_array_equal(layout.inputs[0], [[2, 5, 0], [2, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(layout.resets[0], [True, True, False])


def test_long_documents_are_cut_into_equal_streams_and_the_last_is_filled_with_empty_blocks():
    layout = StreamBlocks([list(range(10, 30)) + [2]], block_size=4, eos_token_id=EOS, pad_token_id=PAD, num_streams=4)
    assert layout.inputs.shape == (4, 2, 4)  # 21 tokens -> 6 blocks -> 4 streams of 2 blocks, the last 2 empty
    np.testing.assert_array_equal(layout.resets[:, 0], True)  # a stream starting inside a document starts afresh
    assert layout.target_ids() == list(range(10, 30)) + [2]
    assert (layout.targets[3] == -100).all() and (layout[3]["shift_labels"] == -100).all()


@pytest.mark.parametrize("streams_per_process", [1, 3])
def test_each_process_reads_its_own_streams_in_order(streams_per_process):
    """Accelerate hands a sequential loader's batches to processes in turn: batch g goes to process g % 2."""
    layout = StreamBlocks([list(range(10, 60)) + [2]], block_size=3, eos_token_id=EOS, pad_token_id=PAD,
                          num_streams=streams_per_process, world_size=2)
    rows = [layout[row]["input_ids"].tolist() for row in range(len(layout))]
    batches = [rows[i : i + streams_per_process] for i in range(0, len(rows), streams_per_process)]
    for process in range(2):
        mine = batches[process::2]
        for slot in range(streams_per_process):
            stream = process * streams_per_process + slot
            assert [batch[slot] for batch in mine] == layout.inputs[stream].tolist()


def arguments(tmp_path, **overrides) -> LSTMTrainingArguments:
    return LSTMTrainingArguments(output_dir=str(tmp_path), bf16=False, report_to="none", disable_tqdm=True,
                                 eval_strategy="no", eval_on_start=False, load_best_model_at_end=False, **overrides)


def trainer_for(model, tmp_path, train=None, evaluation=None, eval_streams=1):
    return LSTMTrainer(model=model, args=arguments(tmp_path, per_device_eval_batch_size=eval_streams),
                       train_dataset=train, eval_dataset=evaluation, data_collator=collate_stream_blocks)


def text_ids(char_tokenizer, text):
    return char_tokenizer(text, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]


@pytest.fixture
def char_model(char_tokenizer):
    return tiny_model(vocab_size=len(char_tokenizer), pad_token_id=char_tokenizer.pad_token_id,
                      bos_token_id=char_tokenizer.bos_token_id, eos_token_id=char_tokenizer.eos_token_id)


def test_stateful_evaluation_equals_scoring_each_document_as_one_stream(char_model, char_tokenizer, shakespeare_text,
                                                                        tmp_path):
    eos = char_tokenizer.eos_token_id
    documents = [text_ids(char_tokenizer, shakespeare_text[:700]), text_ids(char_tokenizer, shakespeare_text[700:1000])]
    layout = StreamBlocks(documents, block_size=50, eos_token_id=eos, pad_token_id=char_tokenizer.pad_token_id,
                          num_streams=1)
    metrics = trainer_for(char_model, tmp_path, evaluation=layout).evaluate()
    scores = [score_stream(char_model, [eos, *document], block_size=64) for document in documents]
    expected = sum(nll for nll, _ in scores) / sum(count for _, count in scores)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)


def test_stateful_evaluation_over_several_streams_scores_each_stream_from_its_start(char_model, char_tokenizer,
                                                                                   shakespeare_text, tmp_path):
    layout = StreamBlocks([text_ids(char_tokenizer, shakespeare_text[:1000])], block_size=40,
                          eos_token_id=char_tokenizer.eos_token_id, pad_token_id=char_tokenizer.pad_token_id,
                          num_streams=3)
    metrics = trainer_for(char_model, tmp_path, evaluation=layout, eval_streams=3).evaluate()
    nll, count = 0.0, 0
    for inputs, targets in zip(layout.inputs, layout.targets):
        real = targets.reshape(-1) != -100
        stream_nll, stream_count = score_stream(char_model, [int(inputs[0, 0]), *targets.reshape(-1)[real]], 64)
        nll, count = nll + stream_nll, count + stream_count
    assert count == 1001
    assert metrics["eval_loss"] == pytest.approx(nll / count, rel=1e-5)


def test_training_carries_the_detached_state_to_the_next_batch_and_resets_it(char_model, char_tokenizer,
                                                                            shakespeare_text, tmp_path):
    layout = StreamBlocks([text_ids(char_tokenizer, shakespeare_text[:63])], block_size=8,
                          eos_token_id=char_tokenizer.eos_token_id, pad_token_id=char_tokenizer.pad_token_id,
                          num_streams=2)
    model = char_model.train()  # no dropout: deterministic
    trainer = trainer_for(model, tmp_path, train=layout)
    first, second = (collate_stream_blocks([layout[row] for row in rows]) for rows in ((0, 1), (2, 3)))
    first_loss = trainer.compute_loss(model, first)
    second_loss = trainer.compute_loss(model, second)
    first_loss.backward()
    second_loss.backward()  # a second pass through the first batch's graph would raise: the state is detached

    both = torch.cat([torch.from_numpy(layout.inputs[:, 0]), torch.from_numpy(layout.inputs[:, 1])], dim=1)
    logits = model(both).logits[:, 8:]
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), second["shift_labels"])
    assert second_loss.item() == pytest.approx(expected.item(), rel=1e-5)

    restart = dict(second, reset=torch.tensor([True, False]))
    trainer.compute_loss(model, first)
    restarted = trainer.compute_loss(model, restart, return_outputs=True)[1].logits
    torch.testing.assert_close(restarted[0], model(second["input_ids"][:1]).logits[0])
    torch.testing.assert_close(restarted[1], logits[1])


def test_stateful_training_refuses_models_without_a_state_and_gradient_checkpointing(char_model, tmp_path):
    layout = StreamBlocks([[5, 6, 7, 2]], block_size=2, eos_token_id=EOS, pad_token_id=PAD, num_streams=1)
    with pytest.raises(ValueError, match="checkpointing"):
        LSTMTrainer(model=char_model, train_dataset=layout, data_collator=collate_stream_blocks,
                    args=arguments(tmp_path, activation_checkpointing=True, stateful=False))
    with pytest.raises(ValueError, match="has none"):
        LSTMTrainer(model=torch.nn.Linear(2, 2), train_dataset=layout, data_collator=collate_stream_blocks,
                    args=arguments(tmp_path))


def test_gradient_accumulation_continues_the_streams_micro_batch_after_micro_batch(char_model, char_tokenizer,
                                                                                   shakespeare_text, tmp_path):
    """With the weights frozen (learning rate 0), two accumulated micro-batches see exactly what two steps do."""
    layout = StreamBlocks([text_ids(char_tokenizer, shakespeare_text[:2047])], block_size=16,
                          eos_token_id=char_tokenizer.eos_token_id, pad_token_id=char_tokenizer.pad_token_id,
                          num_streams=4)

    def logged_losses(accumulation: int, steps: int) -> list[float]:
        args = arguments(tmp_path / str(accumulation), learning_rate=0.0, max_steps=steps, logging_steps=1,
                         per_device_train_batch_size=4, gradient_accumulation_steps=accumulation, save_strategy="no")
        trainer = LSTMTrainer(model=char_model.train(), args=args, train_dataset=layout,
                              data_collator=collate_stream_blocks)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    single = logged_losses(1, 8)
    accumulated = logged_losses(2, 4)
    pairs = [(a + b) / 2 for a, b in zip(single[::2], single[1::2])]
    assert accumulated == pytest.approx(pairs, rel=1e-5)
    assert len(set(single)) == len(single)  # the blocks differ: equal losses are not a coincidence


@pytest.mark.parametrize("stateful", [True, False])
def test_label_smoothing_smooths_the_training_loss_in_both_layouts_and_never_the_validation_loss(
    char_model, char_tokenizer, shakespeare_text, tmp_path, stateful
):
    ids = torch.tensor([text_ids(char_tokenizer, shakespeare_text[:40])[:33]])
    torch.nn.init.normal_(char_model.lm_head.weight, std=3.0)  # confident predictions: smoothing shows
    if stateful:
        batch = {"input_ids": ids[:, :-1], "shift_labels": ids[:, 1:], "reset": torch.tensor([True])}
        dataset = StreamBlocks([[5, 6, 2]], block_size=2, eos_token_id=EOS, pad_token_id=PAD, num_streams=1)
        collator = collate_stream_blocks
    else:
        batch, dataset, collator = {"input_ids": ids, "labels": ids}, None, None
    trainer = LSTMTrainer(model=char_model, args=arguments(tmp_path, label_smoothing_factor=0.1),
                          train_dataset=dataset, data_collator=collator)
    logits = char_model(ids[:, :-1]).logits.transpose(1, 2)
    smoothed = torch.nn.functional.cross_entropy(logits, ids[:, 1:], label_smoothing=0.1)
    exact = torch.nn.functional.cross_entropy(logits, ids[:, 1:])
    assert trainer.compute_loss(char_model.train(), dict(batch)).item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert trainer.compute_loss(char_model.eval(), dict(batch)).item() == pytest.approx(exact.item(), rel=1e-5)
    assert abs(smoothed.item() - exact.item()) > 1e-3 * exact.item()  # far beyond rel=1e-5: the test tells them apart
