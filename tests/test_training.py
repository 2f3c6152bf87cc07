"""`lm-lstm train / evaluate / generate` end to end, the perplexity metric, resuming, and bad inputs."""

import json
import logging
import math
import os
import stat
import subprocess
import sys
from collections import Counter

import evaluate
import pytest
import torch
from conftest import command_stderr_lines
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import lm_lstm
from lm_lstm import cli
from lm_lstm.arguments import DataArguments, LSTMTrainingArguments, ModelArguments
from lm_lstm.card import describe_generation, describe_lstm_layers, describe_saved_step, describe_warmup
from lm_lstm.evaluation import evaluate_file, load_model_and_tokenizer
from lm_lstm.tokenization import encode_prompt, text_decoding
from lm_lstm.training import train

TINY_MODEL = ["--embedding_size", "24", "--hidden_size", "48", "--num_hidden_layers", "2"]
BLOCK = 64


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lm_lstm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    folder = tmp_path_factory.mktemp("corpus")
    text = shakespeare_text[:60_000]
    (folder / "train.txt").write_text(text, encoding="utf-8")
    (folder / "validation.txt").write_text(text[int(len(text) * 0.9) :], encoding="utf-8")  # what training holds out
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "model"
    result = run_cli(
        "train", "--train_file", corpus / "train.txt", "--output_dir", output, "--tokenizer_type", "char",
        *TINY_MODEL, "--block_size", BLOCK, "--per_device_train_batch_size", 16, "--max_steps", 40,
        "--eval_steps", 20, "--save_steps", 20, "--logging_steps", 10, "--warmup_steps", 5, "--bf16", "False",
        "--report_to", "tensorboard", "--seed", 7, "--stateful", "False",  # independent blocks, as `--context blocks`
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_training_lowers_validation_perplexity(trained):
    output, stdout = trained
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert math.exp(evals[-1]["eval_loss"]) < 0.6 * math.exp(evals[0]["eval_loss"])
    assert all("eval_perplexity" in entry for entry in evals)
    final = json.loads((output / "eval_results.json").read_text())
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    # A character-level model's unit is the character, as the sizing line's nats/char: said, with its one exception.
    assert (f"Validation perplexity: {final['eval_perplexity']:.3f} per character (a character the tokenizer never "
            f"saw counts once per UTF-8 byte); loss {final['eval_loss']:.4f} nats per character") in stdout
    assert "Training ended by the step limit (40 steps): 40 steps," in stdout
    runtimes = [entry["eval_runtime"] for entry in history if "eval_runtime" in entry]
    assert len(runtimes) == len(evals) >= 3  # the final evaluation reused the one at step 40
    assert f"; evaluation: {len(runtimes)} evaluations, {sum(runtimes):.1f} s in all" in stdout
    card = (output / "README.md").read_text()
    assert f"| evaluation time | {len(runtimes)} evaluations, {sum(runtimes):.1f} s in all (" in card
    assert "Sample:" in stdout
    assert list((output / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"


def test_output_folder_loads_with_auto_classes_and_generates(trained):
    output, _ = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "train_results.json", "eval_results.json", "all_results.json", "training_curve.png"):
        assert (output / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert isinstance(model, lm_lstm.LSTMForCausalLM)
    assert json.loads((output / "config.json").read_text())["use_cache"] is True  # as generation_config.json says
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    inputs = tokenizer("ROMEO:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 20)


def test_model_card_parses_and_reports_the_run(trained):
    output, _ = trained
    card = ModelCard.load(output / "README.md")
    card.validate = None  # validation calls the Hub; check the metadata locally instead
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "lstm" in data["tags"] and data["license"] == "apache-2.0"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    final = json.loads((output / "eval_results.json").read_text())
    assert results["perplexity"] == pytest.approx(final["eval_perplexity"], rel=1e-6)
    assert results["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert "training_curve.png" in card.text and "{{" not in card.text
    assert "| loss (nats per character) |" in card.text and "Perplexity here is per character:" in card.text
    # --max_steps 40 without --max_time: the default recipe's budget does not apply
    assert "| time budget | none |" in card.text
    assert "| steps | 40 (" in card.text and "ended by the step limit (40 steps) |" in card.text
    assert "| schedule | cosine, 5 warm-up steps |" in card.text
    assert "Generation\nsamples by default (temperature 0.8, top-k 50; `generation_config.json`): pass `do_sample=False`" \
        in card.text
    assert describe_generation(GenerationConfig(do_sample=False)) == "decodes greedily by default"
    assert (describe_lstm_layers(1), describe_lstm_layers(3)) == ("1 LSTM layer", "3 LSTM layers")
    best = json.loads((output / "trainer_state.json").read_text())["best_model_checkpoint"]
    saved = "" if best.endswith("-40") else f"; the saved weights are step {best.rsplit('-', 1)[1]}'s, the best"
    assert f"ended by the step limit (40 steps){saved}" in card.text
    assert describe_saved_step({"steps": 4165, "saved_step": 4000}) == (
        "; the saved weights are step 4,000's, the best validation loss (`--load_best_model_at_end`)")
    assert describe_saved_step({"steps": 40, "saved_step": 40}) == ""
    assert describe_generation(GenerationConfig(num_beams=4)) == "uses beam search with 4 beams by default"
    assert describe_generation(GenerationConfig(do_sample=True)).startswith("samples by default (temperature 1; ")


@pytest.mark.parametrize("warmup_steps, words", [
    (0, "no warm-up"), (0.02, "warm-up over the first 2% of training"), (50.0, "50 warm-up steps"),
    (0.999, "warm-up over the first 99.9% of training"), (0.001, "warm-up over the first 0.1% of training"),
    (0.99999, "warm-up over the first 99.999% of training"), (1e-7, "warm-up over the first 0.00001% of training"),
    (0.9999999, "warm-up over the first 99.99999% of training"),
    (1e-300, "warm-up over less than the first 0.000001% of training"),
    (1_000_000, "1,000,000 warm-up steps"), (2.5, "2.5 warm-up steps"), (1, "1 warm-up step")])
def test_the_card_says_warmup_as_steps_or_a_fraction_of_training(warmup_steps, words):
    assert describe_warmup(warmup_steps) == words


def validation_blocks(output, corpus):
    """The validation blocks exactly as training built them: the file holds the held-out text."""
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer((corpus / "validation.txt").read_text(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return [ids[i : i + BLOCK] for i in range(0, len(ids) - len(ids) % BLOCK, BLOCK)], tokenizer


def test_perplexity_metric_equals_trainer_eval_loss(trained, corpus):
    output, _ = trained
    blocks, tokenizer = validation_blocks(output, corpus)
    texts = [tokenizer.decode(block) for block in blocks]
    metric = evaluate.load(lm_lstm.PERPLEXITY_METRIC)
    result = metric.compute(model_id=str(output), predictions=texts, batch_size=8, add_start_token=False)
    assert len(result["perplexities"]) == len(blocks)
    assert result["mean_perplexity"] == pytest.approx(sum(result["perplexities"]) / len(blocks))
    eval_loss = json.loads((output / "eval_results.json").read_text())["eval_loss"]
    mean_log_perplexity = sum(math.log(p) for p in result["perplexities"]) / len(blocks)
    assert math.exp(mean_log_perplexity) == pytest.approx(math.exp(eval_loss), rel=1e-4)


def test_evaluate_command_agrees_with_trainer(trained, corpus):
    output, _ = trained
    eval_loss = json.loads((output / "eval_results.json").read_text())["eval_loss"]
    result = run_cli("evaluate", "--model", output, "--file", corpus / "validation.txt", "--context", "blocks",
                     "--block_size", BLOCK)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = dict(line.rsplit(None, 1) for line in result.stdout.splitlines() if line.startswith("perplexity"))
    assert float(reported["perplexity"]) == pytest.approx(math.exp(eval_loss), rel=1e-4)
    model, tokenizer = load_model_and_tokenizer(str(output))
    score = evaluate_file(model, tokenizer, corpus / "validation.txt", block_size=BLOCK, context="blocks")
    assert score.left_out > 0 and f"characters left out    {score.left_out} (characters that" in result.stdout
    assert "unit                   character (a character the tokenizer never saw counts once per UTF-8 byte)" \
        in result.stdout


def test_generate_command_streams_text(trained):
    output, _ = trained
    result = run_cli("generate", "--model", output, "--prompt", "ROMEO:", "--max_new_tokens", 30, "--seed", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:") + 10
    greedy = run_cli("generate", "--model", output, "--prompt", "KING", "--no-do_sample", "--max_new_tokens", 20)
    model, tokenizer = load_model_and_tokenizer(str(output))
    expected = model.generate(**encode_prompt(tokenizer, "KING"), do_sample=False, max_new_tokens=20)
    assert greedy.stdout == tokenizer.decode(expected[0], **text_decoding(tokenizer)) + "\n"


def test_stateful_training_on_documents_end_to_end(shakespeare_text, tmp_path):
    """--stateful on a JSON Lines file of documents: validation perplexity falls, every validation token is scored,
    and the card says how the model was trained and evaluated."""
    documents = [shakespeare_text[start : start + 1500] for start in range(0, 45_000, 1500)]
    data = tmp_path / "plays.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    output = tmp_path / "model"
    result = run_cli(
        "train", "--train_file", data, "--output_dir", output, "--tokenizer_type", "char", *TINY_MODEL, "--stateful",
        "--block_size", 32, "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 3, "--max_steps", 40,
        "--eval_steps", 20, "--save_steps", 20, "--warmup_steps", 5, "--bf16", "False", "--report_to", "none",
        "--activation_regularization", 1, "--temporal_activation_regularization", 1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [e for e in json.loads((output / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e]
    assert math.exp(evals[-1]["eval_loss"]) < 0.7 * math.exp(evals[0]["eval_loss"])
    card = (output / "README.md").read_text()
    validation_characters = sum(len(text) + 1 for text in documents[-3:])  # the last 10%: 3 documents, and EOS each
    assert "| validation | " in card and f"{validation_characters:,} |" in card
    assert "stateful: 8 streams" in card and "as 3 contiguous streams" in card
    assert json.loads((output / "config.json").read_text())["temporal_activation_regularization"] == 1


def test_word_level_training_end_to_end(corpus, tmp_path):
    """The design's basic configuration (`--tokenizer_type word --embedding_size 300 --hidden_size 1024
    --num_hidden_layers 1`) in shape, at tiny sizes: the vocabulary, the unit named in the report and card, and bits
    per byte over the bytes of the held-out text."""
    output = tmp_path / "model"
    result = run_cli(
        "train", "--train_file", corpus / "train.txt", "--output_dir", output, "--tokenizer_type", "word",
        "--tokenizer_vocab_size", 600, "--min_frequency", 2, "--embedding_size", 30, "--hidden_size", 64,
        "--num_hidden_layers", 1, "--block_size", 35, "--per_device_train_batch_size", 8, "--max_steps", 4,
        "--eval_steps", 4, "--save_steps", 4, "--warmup_steps", 1, "--bf16", "False", "--report_to", "none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(output)
    vocabulary = tokenizer.get_vocab()
    validation = (corpus / "validation.txt").read_text()
    counts = Counter((corpus / "train.txt").read_text()[: -len(validation)].split())  # what the tokenizer saw
    assert len(vocabulary) == 600 and (vocabulary["<eos>"], vocabulary["<unk>"]) == (0, 1)
    assert min(counts[word] for word in vocabulary if word not in ("<eos>", "<unk>")) >= 2
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 1

    final = json.loads((output / "eval_results.json").read_text())
    assert f"Validation perplexity: {final['eval_perplexity']:.3f} per word (each line end, <eos>, counts as a word)" \
        in result.stdout
    card = ModelCard.load(output / "README.md")
    assert "| perplexity per word |" in card.text and "| tokenizer | word-level, 600 tokens |" in card.text
    # Every validation token is scored once (stateful evaluation): one <eos> per line, the last one added.
    scored = len(tokenizer(validation)["input_ids"]) + (not validation.endswith("\n"))
    bits_per_byte = next(r.metric_value for r in card.data.eval_results if r.metric_type == "bits_per_byte")
    expected = final["eval_loss"] * scored / math.log(2) / len(validation.encode())
    assert bits_per_byte == pytest.approx(expected, rel=1e-5)
    # <eos> ends lines, not texts: generation runs across lines to max_new_tokens, and a prompt's line ends are not
    # padding (no attention mask given: the same as with one); decoding shows <eos> as a line end.
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (None, None)
    prompt = tokenizer("\nFirst Citizen:\nYou", return_tensors="pt")
    assert prompt["input_ids"][0, 0] == tokenizer.eos_token_id
    generated = model.generate(prompt["input_ids"], max_new_tokens=40, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 40
    torch.testing.assert_close(generated, model.generate(**prompt, max_new_tokens=40, do_sample=False))
    assert tokenizer.decode(tokenizer("a b\n\nc\n")["input_ids"]) == "a <unk>\n\n<unk>\n"


@pytest.mark.parametrize("stateful", [False, True])
def test_resumed_run_ends_with_the_same_weights(corpus, tmp_path, stateful):
    def run(output, resume=None):
        training_args = LSTMTrainingArguments(
            output_dir=str(output), max_steps=8, save_steps=4, eval_steps=4, logging_steps=4, bf16=False,
            per_device_train_batch_size=8, warmup_steps=2, seed=3, load_best_model_at_end=False,
            save_total_limit=None, eval_on_start=False, resume_from_checkpoint=resume, report_to="none",
            disable_tqdm=True, stateful=stateful,
        )
        model_args = ModelArguments(tokenizer_type="char", embedding_size=16, hidden_size=32)
        data_args = DataArguments(train_file=[str(corpus / "train.txt")], block_size=32)
        train(model_args, data_args, training_args)
        return load_file(output / "model.safetensors")

    previous = os.umask(0o022)
    try:
        uninterrupted = run(tmp_path / "a")
    finally:
        os.umask(previous)
    assert (tmp_path / "a" / "checkpoint-4" / "stream_state_0.safetensors").is_file() == stateful
    # Others may read every file of the model and its checkpoints, weights and stream states too (not 0600).
    assert {stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "a").rglob("*") if path.is_file()} == {0o644}
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=0, rtol=0)


def test_resuming_on_other_training_text_warns(corpus, tmp_path, caplog):
    def run(output, train_file, resume=None):
        training_args = LSTMTrainingArguments(
            output_dir=str(output), max_steps=4, save_steps=2, eval_strategy="no", bf16=False,
            per_device_train_batch_size=8, load_best_model_at_end=False, resume_from_checkpoint=resume,
            report_to="none", disable_tqdm=True,
        )
        model_args = ModelArguments(tokenizer_type="char", embedding_size=8, hidden_size=16)
        train(model_args, DataArguments(train_file=[str(train_file)], block_size=32), training_args, do_eval=False)

    run(tmp_path / "a", corpus / "train.txt")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with caplog.at_level("WARNING", logger="lm_lstm.training"):
        run(tmp_path / "same", corpus / "train.txt", resume=str(checkpoint))
        assert "Resuming on other training data" not in caplog.text  # the same text, the same blocks
        shorter = tmp_path / "shorter.txt"
        shorter.write_text((corpus / "train.txt").read_text()[:30_000], encoding="utf-8")
        run(tmp_path / "other", shorter, resume=str(checkpoint))
        assert "Resuming on other training data, or other blocks of it, than the checkpoint's (54,001 tokens in " \
            "1,688 blocks then, 27,001 tokens in 848 blocks now)" in caplog.text
        caplog.clear()
        text = (corpus / "train.txt").read_text()
        swapped = tmp_path / "swapped.txt"  # the same characters, as many, in another order
        swapped.write_text(text[len(text) // 2 :] + text[: len(text) // 2], encoding="utf-8")
        run(tmp_path / "swapped", swapped, resume=str(checkpoint))
    assert "than the checkpoint's (54,001 tokens in 1,688 blocks, but other tokens)" in caplog.text


BAD_TRAINING_INPUTS = [
    (lambda d: ["--train_file", d / "missing.txt"], "missing.txt: no such file"),
    (lambda d: ["--train_file", d / "empty.txt"], "empty.txt: the file is empty"),
    (lambda d: ["--train_file", d / "blank.txt"], "blank.txt: the file holds only whitespace"),
    (lambda d: ["--train_file", d / "binary.txt"], "binary.txt: not UTF-8"),
    (lambda d: ["--train_file", d / "data.xml"], "unsupported file type"),
    (lambda d: ["--block_size", 1], "--block_size must be at least 2"),
    (lambda d: ["--tokenizer_type", "words"], "invalid choice"),
    (lambda d: ["--lr_scheduler_type", "sometimes"], "sometimes"),
    (lambda d: ["--max_stepz", 3], "--max_stepz"),
    (lambda d: ["--validation_split_percentage", 0], "validation_split_percentage"),
    (lambda d: ["--input_dropout", 1.5], "input_dropout"),
    (lambda d: ["--activation_regularization", -1], "activation_regularization"),
    (lambda d: ["--weight_averaging_patience", 0], "weight_averaging_patience"),
    (lambda d: ["--stateful", "--activation_checkpointing"], "activation (gradient) checkpointing"),
    (lambda d: ["--train_sampling_strategy", "group_by_length"], "--train_sampling_strategy group_by_length"),
    (lambda d: ["--data_seed", 3], "--data_seed shuffles blocks"),
    (lambda d: ["--preprocessing_num_workers", -2], "--preprocessing_num_workers must be at least 0"),
    (lambda d: ["--bf16_full_eval"], "--bf16_full_eval is not supported with --stateful"),
    (lambda d: ["--max_time", "ten minutes"], "--max_time: expected seconds or a duration"),
    (lambda d: ["--max_time", "1m", "--lr_scheduler_type", "polynomial"],
     "--max_time schedules the learning rate over time"),
]


def write_bad_training_files(folder):
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.txt").write_text(" \n\t\n")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "data.xml").write_text("<a/>")


def assert_refused_in_one_line(returncode, lines, stderr, message, output_dir):
    assert returncode == 2
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert message in lines[0]
    assert not output_dir.exists()


@pytest.mark.parametrize("make_args, message", BAD_TRAINING_INPUTS)
def test_bad_training_inputs_fail_with_one_line(tmp_path, monkeypatch, capfd, caplog, make_args, message):
    # In this process (a command's start-up costs seconds): stderr is read at the file descriptor, as a terminal
    # would show it, and warnings logged are counted (pytest takes them from stderr); the test below runs two of the
    # cases as real commands.
    write_bad_training_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["train", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                         *map(str, make_args(tmp_path))])
    except SystemExit as exit:  # argparse's refusals, as the `lm-lstm` command exits with them
        code = exit.code
    stderr = capfd.readouterr().err
    assert_refused_in_one_line(code, stderr.strip().splitlines(), stderr, message, tmp_path / "out")
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("make_args, message", [BAD_TRAINING_INPUTS[3], BAD_TRAINING_INPUTS[8]])
def test_bad_training_inputs_fail_with_one_line_as_a_command(tmp_path, make_args, message):
    write_bad_training_files(tmp_path)
    result = run_cli("train", "--output_dir", tmp_path / "out", "--max_steps", 1, *make_args(tmp_path), cwd=tmp_path)
    assert_refused_in_one_line(result.returncode, command_stderr_lines(result.stderr), result.stderr, message,
                               tmp_path / "out")


def test_unknown_command_and_evaluate_errors(tmp_path, capsys):
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    result = run_cli("evaluate", "--model", tmp_path / "nothing", "--file", tmp_path / "x.txt")
    assert result.returncode != 0 and len(command_stderr_lines(result.stderr)) == 1


def test_named_tokenizer_and_config_are_reused(trained, corpus, tmp_path):
    output, _ = trained
    training_args = LSTMTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, eval_steps=2, save_steps=2,
                                          bf16=False, report_to="none", disable_tqdm=True, eval_on_start=False)
    model_args = ModelArguments(tokenizer_name=str(output), config_name=str(output), config_overrides="hidden_size=40")
    result = train(model_args, DataArguments(train_file=[str(corpus / "train.txt")], block_size=32), training_args)
    assert (result.output_dir / "tokenizer.json").read_text() == (output / "tokenizer.json").read_text()
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["hidden_size"] == 40 and config["embedding_size"] == 24  # from the named config, then overridden


def test_bf16_is_on_by_default_only_where_onednn_runs_a_bf16_lstm(monkeypatch, tmp_path):
    import lm_lstm.arguments as arguments

    default = LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none").bf16
    assert default == arguments.fast_bf16_available()
    monkeypatch.setattr(arguments, "cpu_autocast_runs_lstm", lambda dtype: False)  # an AVX2-only CPU's oneDNN
    assert not arguments.fast_bf16_available()
    assert LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none").bf16 is False
    assert LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=True).bf16 is True  # explicit wins


def test_the_recipe_learning_rate_falls_with_the_hidden_size_unless_one_is_given(tmp_path):
    from conftest import tiny_model

    from lm_lstm.presets import recipe_learning_rate
    from lm_lstm.trainer import LSTMTrainer

    assert [recipe_learning_rate(h) for h in (128, 512, 768, 1024)] == pytest.approx([3e-3, 3e-3, 2e-3, 1.5e-3])

    def trained_rate(hidden_size, **options):
        args = LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=False, max_steps=1,
                                     eval_strategy="no", load_best_model_at_end=False, **options)
        trainer = LSTMTrainer(model=tiny_model(hidden_size=hidden_size, num_hidden_layers=1, embedding_size=4),
                              args=args)
        trainer.create_optimizer()
        return [group["lr"] for group in trainer.optimizer.param_groups]

    assert trained_rate(1024) == pytest.approx([1.5e-3, 1.5e-3])  # groups with and without weight decay
    assert trained_rate(10) == pytest.approx([3e-3, 3e-3])
    assert trained_rate(1024, learning_rate=3e-3) == [3e-3, 3e-3]  # given: kept, even when it is the recipe's value
    args = LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no",
                                 load_best_model_at_end=False)
    args.learning_rate = 1e-4  # set after the arguments were made: given, too
    assert LSTMTrainer(model=tiny_model(hidden_size=1024, num_hidden_layers=1), args=args).args.learning_rate == 1e-4
    assert LSTMTrainingArguments(output_dir=str(tmp_path), report_to="none").to_dict()["learning_rate"] == 3e-3


def test_a_best_model_metric_that_evaluations_do_not_report_is_refused_before_training(tmp_path):
    for options in (dict(), dict(save_strategy="best", load_best_model_at_end=False)):
        args = LSTMTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", metric_for_best_model="none",
                                     **options)
        with pytest.raises(ValueError, match=r"^--metric_for_best_model none: the evaluations report eval_loss and "
                           r"eval_perplexity; give one of them.$"):
            train(ModelArguments(), DataArguments(train_file=[str(tmp_path / "unread.txt")]), args)
    assert not (tmp_path / "out").exists()
    args = LSTMTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", metric_for_best_model="perplexity")
    lm_lstm.training.check_best_model_metric(args)  # as Trainer reads it: eval_perplexity
    with pytest.raises(ValueError, match=r"^--save_strategy best saves a checkpoint when an evaluation finds a better "
                       r"model, and --eval_strategy no makes none"):
        LSTMTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="best",
                              eval_strategy="no", load_best_model_at_end=False)


def test_options_that_would_lose_work_or_be_ignored_are_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model"):
        LSTMTrainingArguments(output_dir=str(tmp_path / "model"), report_to="none")
    assert LSTMTrainingArguments(output_dir=str(tmp_path / "model"), report_to="none", overwrite_output_dir=True)
    with pytest.raises(ValueError, match="--label_smoothing_factor must be in"):
        LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", label_smoothing_factor=-0.5)
    with pytest.raises(ValueError, match="--hidden_size would be ignored: the model comes from --config_name"):
        ModelArguments(config_name=str(tmp_path / "model"), hidden_size=8)
    with pytest.raises(ValueError, match="--max_train_samples must be at least 1"):
        DataArguments(max_train_samples=0)
    for name in ("eval_steps", "save_steps", "logging_steps"):  # 0 would quietly mean another interval, or none
        for value in (0, 1.5):
            with pytest.raises(ValueError, match=f"--{name} must be a positive whole number of steps, or below 1 a "
                               f"fraction of the training steps, got {value:g}."):
                LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", **{name: value})
    for value in (1.5, -1, 2.0000001, float("nan"), float("inf")):  # Trainer would warm up over int(1.5) steps
        with pytest.raises(ValueError, match=f"^--warmup_steps must be a whole number of steps, or below 1 a fraction "
                           f"of training, got {value}.$"):
            LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", warmup_steps=value)
    for value in (0, 0.5, 3):
        assert LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", warmup_steps=value)
    with pytest.raises(ValueError, match=r"^--eval_strategy no with --save_strategy steps: --load_best_model_at_end "
                       r"\(on by default\) .* or --load_best_model_at_end False.$"):
        LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", eval_strategy="no", save_steps=3)
    with pytest.raises(ValueError, match="^bogus is not a valid IntervalStrategy"):  # TrainingArguments names it
        LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", eval_strategy="bogus")
    # the best model needs a checkpoint at each evaluation: the message names the option to change
    message = r"--save_steps 3 is not a multiple of --eval_steps 250, .*\(--eval_steps 3 or --save_steps 250, say\)"
    with pytest.raises(ValueError, match=message):
        LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", save_steps=3)
    assert LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", save_steps=3,
                                 load_best_model_at_end=False).save_steps == 3
    assert LSTMTrainingArguments(output_dir=str(tmp_path / "new"), report_to="none", save_steps=500).save_steps == 500


@pytest.mark.parametrize("options, message", [
    (["--tokenizer_type", "word", "--min_frequency", "0"], "--min_frequency must be at least 1, got 0."),
    (["--min_frequency", "2"], "--min_frequency applies to a word tokenizer trained on the text"),
    (["--tokenizer_type", "word", "--min_frequency", "2", "--tokenizer_name", "gpt2"], "--min_frequency applies"),
    (["--tokenizer_type", "word", "--tokenizer_vocab_size", "2"],
     "--tokenizer_vocab_size must be at least 3 for a word tokenizer, got 2."),
    (["--tokenizer_type", "bpe", "--tokenizer_vocab_size", "100"], "--tokenizer_vocab_size must be at least 259"),
])
def test_bad_tokenizer_options_are_refused_in_one_line(capsys, options, message, tmp_path, monkeypatch):
    from lm_lstm.cli import main

    monkeypatch.chdir(tmp_path)  # the default --output_dir, lm-lstm-model/, may hold the README's first run here
    assert main(["train", *options]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("lm-lstm train: error: ") and message in error


def test_cli_refuses_bad_generation_counts_and_do_predict_in_one_line(capsys, tmp_path, monkeypatch):
    from lm_lstm.cli import main

    monkeypatch.chdir(tmp_path)  # the default --output_dir, lm-lstm-model/, may hold the README's first run here
    assert main(["generate", "--model", "x", "--num_beams", "0"]) == 2
    assert main(["train", "--do_predict"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["lm-lstm generate: error: --num_beams must be at least 1, got 0.",
                      "lm-lstm train: error: --do_predict is not supported (there is no prediction step); drop it."]


def test_every_command_prints_its_help(capsys):
    from lm_lstm.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_train_help_states_each_default_once(capsys):
    """An option whose help says its default in words ("Default: chosen ...") does not also say "(default: None)";
    the others keep Trainer's "(default: ...)"."""
    from lm_lstm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert "(default: None)" not in text.split("--block_size BLOCK_SIZE")[1].split("--preprocessing_num_workers")[0]
    assert "else 128." in text and "Default: chosen with the model's size" in text
    assert "--max_grad_norm MAX_GRAD_NORM" in text and "(default: 0.5)" in text
