"""Corpora larger than memory: the tokenizer's training sample, and evaluation sized to the time budget."""

import pytest
import torch
from datasets import Dataset, DatasetDict

import lm_lstm.training
from lm_lstm.arguments import DataArguments, LSTMTrainingArguments, ModelArguments
from lm_lstm.budget import EVALUATION_SHARE, evaluation_speed
from lm_lstm.card import RunSummary
from lm_lstm.data import build_block_data, cut_documents, tokenizer_training_texts
from lm_lstm.streams import build_stream_data
from lm_lstm.tokenization import train_tokenizer
from lm_lstm.training import plan_evaluation

from conftest import tiny_model


def pieces_of(documents: list[str]) -> Dataset:
    return cut_documents(Dataset.from_dict({"text": documents}))


def test_a_tokenizer_within_its_byte_budget_sees_every_piece_and_learns_what_whole_documents_teach(monkeypatch):
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 10)
    documents = ["first line\n" * 5, "é second\n" * 4, "third, no line end"]
    pieces = pieces_of(documents)
    assert len(pieces) > len(documents)
    total = sum(len(text.encode()) for text in documents)
    assert "".join(tokenizer_training_texts(pieces, max_bytes=total)) == "".join(documents)
    for kind in ("char", "word"):
        sampled = train_tokenizer(tokenizer_training_texts(pieces, max_bytes=total), kind=kind, vocab_size=20)
        assert sampled.get_vocab() == train_tokenizer(documents, kind=kind, vocab_size=20).get_vocab()


def test_a_tokenizer_beyond_its_byte_budget_sees_an_even_sample_of_pieces(monkeypatch):
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 10)
    pieces = pieces_of([f"line {i:04d} of the text\n" for i in range(1000)])  # one piece per line, 22 bytes
    sample = list(tokenizer_training_texts(pieces, max_bytes=2200))  # a tenth of the 22,000 bytes
    assert sample == [f"line {i:04d} of the text\n" for i in range(0, 1000, 10)]
    with pytest.raises(ValueError, match="--tokenizer_train_bytes must be at least 1"):
        next(tokenizer_training_texts(pieces, max_bytes=0))


@pytest.mark.parametrize("options, message", [
    (dict(tokenizer_train_bytes=0), "--tokenizer_train_bytes must be at least 1"),
    (dict(tokenizer_train_bytes=10, tokenizer_name="gpt2"), "--tokenizer_train_bytes applies to a tokenizer trained"),
])
def test_bad_tokenizer_sample_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ModelArguments(**options)


def test_a_negative_eval_token_cap_is_refused():
    with pytest.raises(ValueError, match="--max_eval_tokens must be at least 0"):
        DataArguments(max_eval_tokens=-1)


def test_the_evaluation_speed_is_measured_in_tokens_per_second_in_evaluation_mode():
    model = tiny_model().train()
    batch = {"input_ids": torch.full((2, 8), model.config.eos_token_id)}
    speed = evaluation_speed(model, batch, min_seconds=0.05)
    assert speed > 0 and model.training


@pytest.fixture
def data(char_tokenizer, shakespeare_text):
    raw = DatasetDict(train=pieces_of([shakespeare_text[:4000]]), validation=pieces_of([shakespeare_text[4000:6000]]))
    return build_stream_data(raw, char_tokenizer, block_size=20, train_streams=2, eval_streams=2)


def arguments(tmp_path, **options) -> LSTMTrainingArguments:
    return LSTMTrainingArguments(output_dir=str(tmp_path), bf16=False, report_to="none", per_device_eval_batch_size=2,
                                 **options)


@pytest.fixture
def measured(monkeypatch):
    """`evaluation_speed` made 100 tokens per second; the calls are counted."""
    calls = []
    monkeypatch.setattr(lm_lstm.training, "evaluation_speed",
                        lambda model, batch, bf16: calls.append(batch["input_ids"].shape) or 100.0)
    return calls


def test_carved_validation_is_cut_to_a_share_of_the_budget_and_evaluated_before_training(data, measured, tmp_path,
                                                                                        capsys):
    args = arguments(tmp_path, max_time=200)  # 5% of 200 s at 100 tokens/s: 1,000 tokens
    planned = plan_evaluation(tiny_model(), data, DataArguments(), args)
    assert "Evaluation: 1,000 validation tokens (the first of 2,001, to fit 5% of the time budget; --max_eval_tokens " \
        "sets it), about 10 s each at 100 tokens/s (measured); an evaluation before training." in capsys.readouterr().out
    assert measured == [(2, 20)]  # one batch of the evaluation streams
    assert data.validation_tokens() == 2001 and planned.validation_tokens() == 1000  # 50 whole blocks of 20
    assert planned.validation.target_ids() == data.validation.target_ids()[:1000]  # the first tokens
    assert planned.train is data.train and args.eval_on_start is True
    assert EVALUATION_SHARE * 200 * 100 == 1000


def test_the_evaluation_before_training_is_skipped_when_it_would_not_fit_the_share(data, measured, tmp_path):
    validation_files = DataArguments(validation_file=["given.txt"])  # a validation file: never cut by default
    args = arguments(tmp_path, max_time=200)
    planned = plan_evaluation(tiny_model(), data, validation_files, args)
    assert planned.validation_tokens() == 2001 and args.eval_on_start is False
    args = arguments(tmp_path, max_time=200, eval_on_start=True)  # asked for: kept
    assert plan_evaluation(tiny_model(), data, validation_files, args).validation_tokens() == 2001
    assert args.eval_on_start is True and len(measured) == 1  # nothing left to decide: not measured


def test_an_explicit_cap_applies_to_any_validation_and_zero_keeps_it_all(data, measured, tmp_path, capsys):
    args = arguments(tmp_path, max_time=200, eval_on_start=False)
    assert plan_evaluation(tiny_model(), data, DataArguments(max_eval_tokens=45), args).validation_tokens() == 40
    assert capsys.readouterr().out == "Evaluation: 40 validation tokens (the first of 2,001: --max_eval_tokens).\n"
    assert plan_evaluation(tiny_model(), data, DataArguments(max_eval_tokens=0), args).validation_tokens() == 2001
    assert capsys.readouterr().out == ""  # nothing cut, nothing measured: nothing to say
    assert measured == []
    plan_evaluation(tiny_model(), data, DataArguments(max_eval_tokens=45), arguments(tmp_path, max_time=200))
    assert "Evaluation: 40 validation tokens (the first of 2,001: --max_eval_tokens), about 0 s each at 100 " \
        "tokens/s (measured); an evaluation before training." in capsys.readouterr().out


def test_without_a_time_budget_nothing_is_measured_or_cut(data, measured, tmp_path, char_tokenizer, shakespeare_text):
    args = arguments(tmp_path, max_steps=10)
    assert args.max_time is None and args.eval_on_start is True  # no budget to weigh it against: as before
    assert plan_evaluation(tiny_model(), data, DataArguments(), args) is data and measured == []
    raw = DatasetDict(train=pieces_of([shakespeare_text[:4000]]), validation=pieces_of([shakespeare_text[4000:6000]]))
    blocks = build_block_data(raw, char_tokenizer, block_size=20)
    capped = plan_evaluation(tiny_model(), blocks, DataArguments(max_eval_tokens=100), args)
    assert (len(blocks.validation), len(capped.validation)) == (100, 5) and capped.validation_tokens() == 100


def test_the_run_summary_reports_the_evaluation_time():
    fields = dict(model_name="m", repo_id="m", metrics={}, log_history=[], hyperparameters={}, train_blocks=1,
                  eval_blocks=1, block_size=2, train_tokens=2, eval_tokens=2, scored_tokens=2, validation_bytes=2,
                  evaluation_method="", wall_time_seconds=1.0, data_description="")
    assert RunSummary(**fields).describe_evaluation_time() == "none"
    run = RunSummary(**fields, evaluations=3, evaluation_seconds=41.1)
    assert run.describe_evaluation_time() == "3 evaluations, 41.1 s in all (13.7 s each)"
