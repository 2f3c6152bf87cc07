"""Perplexity and bits per byte (`lm_lstm.evaluation`, the `evaluate` metric) on a tiny saved model: fast."""

import json
import math
import re

import evaluate
import pytest
import torch

import lm_lstm
from lm_lstm.card import RunSummary
from lm_lstm.cli import main
from lm_lstm.evaluation import Score, bits_per_byte, evaluate_file, load_model_and_tokenizer, text_perplexities
from lm_lstm.tokenization import train_tokenizer, word_tokenizer

from conftest import tiny_model

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 4


@pytest.fixture(scope="module")
def saved_model(char_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model(vocab_size=len(char_tokenizer), pad_token_id=char_tokenizer.pad_token_id,
                       bos_token_id=char_tokenizer.bos_token_id, eos_token_id=char_tokenizer.eos_token_id)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # far from uniform predictions
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def test_carried_context_scores_every_character(saved_model):
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    carried = evaluate_file(model, tokenizer, saved_model / "text.txt", block_size=100, context="carry")
    assert carried.tokens == len(TEXT) and carried.bytes == len(TEXT.encode())
    # the chunk size changes nothing when the state is carried
    other = evaluate_file(model, tokenizer, saved_model / "text.txt", block_size=37, context="carry")
    assert other.nll == pytest.approx(carried.nll, rel=1e-5)
    # ... and equals one pass over the whole stream
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        whole = model(ids, labels=ids).loss.item()
    assert carried.loss == pytest.approx(whole, rel=1e-5)
    assert carried.bits_per_byte == pytest.approx(carried.nll / math.log(2) / len(TEXT.encode()))


def test_blocks_context_scores_independent_blocks(saved_model):
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    score = evaluate_file(model, tokenizer, saved_model / "text.txt", block_size=50, context="blocks", batch_size=3)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    blocks = torch.tensor([ids[i : i + 50] for i in range(0, len(ids) - len(ids) % 50, 50)])
    with torch.no_grad():
        expected = model(blocks, labels=blocks).loss.item()
    assert score.tokens == blocks.shape[0] * 49 and score.loss == pytest.approx(expected, rel=1e-5)
    assert score.left_out == len(ids) % 50 > 0
    with pytest.raises(ValueError, match="context"):
        evaluate_file(model, tokenizer, saved_model / "text.txt", context="sliding")


def test_perplexity_metric_batched_equals_one_by_one(saved_model):
    output = saved_model
    metric = evaluate.load(lm_lstm.PERPLEXITY_METRIC)
    texts = ["ROMEO:\nWhat light", "O", "First Citizen:\nBefore we proceed any further, hear me speak."]
    batched = metric.compute(model_id=str(output), predictions=texts, batch_size=3)["perplexities"]
    alone = [metric.compute(model_id=str(output), predictions=[t])["perplexities"][0] for t in texts]
    assert batched == pytest.approx(alone, rel=1e-5)


def test_text_perplexity_is_the_exp_of_the_mean_nll_of_the_text_after_the_start_token(saved_model):
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("What light", add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    assert text_perplexities(model, tokenizer, ["What light"]) == pytest.approx([expected], rel=1e-5)
    with pytest.raises(ValueError, match="at least two tokens"):
        text_perplexities(model, tokenizer, ["O"], add_start_token=False)


def test_one_bits_per_byte_formula_for_files_and_cards():
    assert bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)
    assert Score(nll=math.log(2) * 12, tokens=6, bytes=4).bits_per_byte == pytest.approx(3.0)
    run = RunSummary(model_name="m", repo_id="m", metrics={"eval_loss": math.log(2) * 2}, log_history=[],
                     hyperparameters={}, train_blocks=1, eval_blocks=1, block_size=2, train_tokens=2, eval_tokens=6,
                     scored_tokens=6, validation_bytes=4, evaluation_method="", wall_time_seconds=0.0,
                     data_description="")
    assert run.bits_per_byte == pytest.approx(3.0)


@pytest.mark.slow
def test_lm_evaluation_harness_scores_a_text_as_lm_lstm_evaluate_does(saved_model):
    """With `max_length` covering the text, lm-evaluation-harness scores it in one window from the tokenizer's BOS,
    the document-start token: the state is carried over the whole text, as `lm-lstm evaluate` does."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=str(saved_model), max_length=4096, batch_size=1, device="cpu")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)
    (loglikelihood,) = harness.loglikelihood_rolling([request])
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    score = evaluate_file(model, tokenizer, saved_model / "text.txt", context="carry")
    assert -loglikelihood == pytest.approx(score.nll, rel=1e-5)
    windowed = HFLM(pretrained=str(saved_model), max_length=64, batch_size=1, device="cpu").loglikelihood_rolling([request])[0]
    assert -windowed > score.nll * (1 + 1e-4)  # short windows, each from a zero state, lose context


def test_a_missing_model_folder_is_named(tmp_path, monkeypatch):
    with pytest.raises(OSError, match="nope: no such model folder"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)  # a bare name that is no folder here is tried on the Hub (offline in the tests)
    with pytest.raises(OSError, match=r"^my-model: no such folder here, and not loadable as a Hub name \(.+\)$"):
        load_model_and_tokenizer("my-model")


def test_a_tabular_file_is_scored_from_its_text_column(saved_model, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    (tmp_path / "plays.jsonl").write_text('{"body": %s}\n' % json.dumps(TEXT))
    tabular = evaluate_file(model, tokenizer, tmp_path / "plays.jsonl", text_column="body")
    assert tabular.nll == pytest.approx(evaluate_file(model, tokenizer, saved_model / "text.txt").nll, rel=1e-6)


def test_word_level_evaluation_scores_every_line_end_as_a_word_over_the_bytes_of_the_text(
    shakespeare_text, tmp_path, capsys
):
    tokenizer = train_tokenizer([shakespeare_text[:20_000]], kind="word", vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east\n" * 3
    (tmp_path / "text.txt").write_text(text)
    carried = evaluate_file(model, tokenizer, tmp_path / "text.txt")
    ids = tokenizer(text)["input_ids"]
    assert carried.tokens == len(ids) == len(text.split()) + text.count("\n")  # every <eos> is scored, once
    assert carried.bytes == len(text.encode())
    stream = torch.tensor([[tokenizer.eos_token_id] + ids])
    with torch.no_grad():
        assert carried.nll == pytest.approx(model(stream, labels=stream).loss.item() * len(ids), rel=1e-5)
    (tmp_path / "unended.txt").write_text(text[:-1])  # the last line still ends with <eos>: one text byte less
    unended = evaluate_file(model, tokenizer, tmp_path / "unended.txt")
    assert (unended.tokens, unended.bytes) == (carried.tokens, carried.bytes - 1)
    assert unended.nll == pytest.approx(carried.nll, rel=1e-6)

    # In blocks, the first token of each is not scored: each word stands for itself and the space before it, each
    # <eos> for its line end.
    blocks = evaluate_file(model, tokenizer, tmp_path / "text.txt", block_size=8, context="blocks")
    sizes = []
    for line in text.splitlines():
        sizes += [len(word) + (number > 0) for number, word in enumerate(line.split())] + [1]
    assert len(sizes) == len(ids) and sum(sizes) == len(text)
    usable = len(ids) - len(ids) % 8
    assert blocks.bytes == sum(sum(sizes[i + 1 : i + 8]) for i in range(0, usable, 8))
    assert blocks.tokens == usable // 8 * 7

    capsys.readouterr()  # what loading the model above printed
    assert main(["evaluate", "--model", str(tmp_path), "--file", str(tmp_path / "text.txt")]) == 0
    captured = capsys.readouterr()
    assert "Scoring: 100%" in captured.err  # the progress bar
    assert "Loading weights" not in captured.err  # transformers' bar over the weights: noise at this size
    load_model_and_tokenizer(str(tmp_path))  # after the command, in the same process, the bar is back
    assert "Loading weights" in capsys.readouterr().err
    report = captured.out.splitlines()
    assert "unit              word (each line end, <eos>, counts as a word)" in report
    assert f"words scored      {len(ids)}" in report
    assert ("context           carry: the whole file as one stream, the state carried from one pass of 512 words to "
            "the next") in report
    assert {re.match(r"\S+(?: \S+)* {2,}", line).end() for line in report} == {len("loss (nats/word)  ")}  # aligned


def test_a_word_outside_a_vocabulary_without_unk_is_a_one_line_error(tmp_path, capsys):
    """A converted checkpoint's vocabulary may lack `<unk>`: the `tokenizers` library's error is reported in one line."""
    tokenizer = word_tokenizer(["<eos>", "the", "cat"])
    model = tiny_model(vocab_size=3, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("the cat\nthe dog\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--file", str(tmp_path / "text.txt")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error == ("lm-lstm evaluate: error: the tokenizer failed: a word of the text is not in the vocabulary, "
                     "which has no <unk>")


def test_a_damaged_model_folder_is_a_one_line_error(saved_model, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in saved_model.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert main(["evaluate", "--model", str(damaged), "--file", str(saved_model / "text.txt")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"lm-lstm evaluate: error: {damaged}: its weights cannot be read (")
    (damaged / "model.safetensors").write_bytes(weights)
    tokenizer_file = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(tokenizer_file[:100])
    assert main(["evaluate", "--model", str(damaged), "--file", str(saved_model / "text.txt")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"lm-lstm evaluate: error: {damaged}: its tokenizer cannot be loaded (")


def test_a_model_with_position_embeddings_is_refused_text_beyond_its_positions(char_tokenizer, tmp_path, capsys):
    """A GPT-2 sees at most `n_positions` tokens: the 'carry' context on a longer file, or longer blocks, get one
    line saying what to do instead of an index error from deep inside torch; blocks that fit are scored."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2)
                    ).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    options = ["evaluate", "--model", str(folder), "--file", str(folder / "text.txt")]
    assert main(options) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lm-lstm evaluate: error: the 'carry' context feeds the model the whole file, {len(TEXT)} tokens, and it "
        "sees at most 32 positions: use --context blocks with --block_size at most 32.")
    assert main(options + ["--context", "blocks", "--block_size", "33"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lm-lstm evaluate: error: --block_size 33 is longer than the 32 positions the model sees.")
    assert main(options + ["--context", "blocks", "--block_size", "32"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out
    assert re.search(r"^context +blocks: independent blocks of 32 characters, each from a zero state$", out, re.M)


def test_a_large_file_is_scored_a_window_at_a_time(saved_model, tmp_path, monkeypatch):
    """The file is cut into several pieces and read from them a window at a time: the model never sees more than a
    window, and the result is that of the whole token stream held in memory."""
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 100)
    model, tokenizer = load_model_and_tokenizer(str(saved_model))
    (tmp_path / "long.txt").write_text(TEXT * 5, encoding="utf-8")
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, **kwargs: widths.append(input_ids.shape[1]) or
                        forward(input_ids, **kwargs))
    score = evaluate_file(model, tokenizer, tmp_path / "long.txt", block_size=64)
    assert max(widths) == 64 and len(widths) == math.ceil(len(TEXT * 5) / 64)
    stream = [tokenizer.eos_token_id] + tokenizer(TEXT * 5, add_special_tokens=False).input_ids
    nll, count = lm_lstm.evaluation.score_stream(model, stream, block_size=64)
    assert (score.tokens, score.bytes) == (count, len((TEXT * 5).encode())) and score.nll == pytest.approx(nll, rel=1e-6)


def test_an_error_announcing_its_next_line_is_reported_with_it():
    from lm_lstm.messages import first_line

    mismatch = RuntimeError("Error(s) in loading state_dict for LSTMForCausalLM:\n\tsize mismatch for lm_head.weight")
    assert first_line(mismatch) == ("Error(s) in loading state_dict for LSTMForCausalLM: size mismatch for "
                                    "lm_head.weight")
    assert first_line(ValueError("one line\nand more")) == "one line"
    assert first_line(ValueError("strategies must match, but found\n- Evaluation: no\n- Save: steps\nmore")) == (
        "strategies must match, but found - Evaluation: no - Save: steps")
    assert first_line(OSError()) == "OSError"
