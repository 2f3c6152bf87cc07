"""Surprisal (`lm_lstm.surprisal`, `lm-lstm surprisal`): its sums against `lm-lstm evaluate`, the word grouping rule,
the output formats and bad input, on tiny saved models of each tokenizer kind."""

import json
import math

import pytest
import torch

from lm_lstm.cli import main
from lm_lstm.evaluation import evaluate_file, load_model_and_tokenizer
from lm_lstm.surprisal import Surprisals, file_surprisals, jsonl_lines, surprisals, tsv_lines
from lm_lstm.tokenization import train_tokenizer

from conftest import tiny_model

SENTENCES = "The keys to the cabinet are on the table.\nThe keys to the cabinet is on the table.\n"
# Lines with what trips grouping up: indentation, a blank line, a tab, a Windows line end, a word never seen, and a
# last line without a line end.
TEXT = SENTENCES + "  The table, the keys\tand   the cabinet.\r\n\nA key is on a cabinet"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shakespeare_text):
    """A tiny saved model for each tokenizer kind (far from uniform predictions)."""
    corpus = shakespeare_text[:20_000] + SENTENCES
    found = {}
    for kind, options in (("char", {}), ("bpe", {"vocab_size": 300}), ("word", {"vocab_size": 400})):
        tokenizer = train_tokenizer([corpus], kind=kind, **options)
        model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.nn.init.normal_(model.lm_head.weight, std=1.0)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        found[kind] = folder
    return found


def nats(items: list[Surprisals]) -> float:
    return sum(item.total_bits for item in items) * math.log(2)


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
@pytest.mark.parametrize("by", ["line", "document"])
def test_carried_state_sums_to_what_evaluate_sums_over_the_file(folders, kind, by, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(folders[kind]))
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    items = file_surprisals(model, tokenizer, path, by=by, carry_state=True, block_size=7)
    score = evaluate_file(model, tokenizer, path, block_size=64)
    assert nats(items) == pytest.approx(score.nll, rel=1e-5)
    assert sum(len(item.tokens) for item in items) == score.tokens
    assert len(items) == (5 if by == "line" else 1)
    for item in items:  # words and end add up to the tokens
        assert sum(item.word_bits) + (item.end_bits or 0) == pytest.approx(item.total_bits, abs=1e-9)


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_each_line_on_its_own_sums_to_what_evaluate_sums_over_a_file_of_that_line(folders, kind, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(folders[kind]))
    (tmp_path / "text.txt").write_bytes(TEXT.encode("utf-8"))
    items = file_surprisals(model, tokenizer, tmp_path / "text.txt", by="line")
    lines = TEXT.replace("\r\n", "\n").splitlines(keepends=True)  # .txt files are read with universal newlines
    assert [item.text for item in items] == [line.rstrip("\n") for line in lines]
    for item, line in zip(items, lines):
        if line.isspace():  # a blank line holds its line end only (a file of it cannot be evaluated)
            assert item.words == [] and item.end == "\n"
            continue
        (tmp_path / "line.txt").write_bytes(line.encode("utf-8"))
        score = evaluate_file(model, tokenizer, tmp_path / "line.txt")
        assert item.total_bits * math.log(2) == pytest.approx(score.nll, rel=1e-5)
        assert len(item.tokens) == score.tokens
    carried = surprisals(model, tokenizer, [TEXT], by="line", carry_state=True)
    assert items[0].token_bits == pytest.approx(carried[0].token_bits, rel=1e-5)  # the first line starts the file
    assert items[1].token_bits != pytest.approx(carried[1].token_bits, rel=1e-3)  # the next has context


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_token_surprisal_is_minus_log2_of_the_probability_from_the_document_start(folders, kind):
    model, tokenizer = load_model_and_tokenizer(str(folders[kind]))
    line = "The keys to the cabinet are on the table.\n"
    (item,) = surprisals(model, tokenizer, [line])
    ids = [tokenizer.eos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = -torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] / math.log(2)
    assert item.token_bits == pytest.approx(expected.tolist(), rel=1e-4)
    assert item.tokens == tokenizer.convert_ids_to_tokens(ids[1:])


def test_subword_and_character_tokens_go_to_the_word_of_their_first_non_space_character(folders):
    model, tokenizer = load_model_and_tokenizer(str(folders["char"]))
    (item,) = surprisals(model, tokenizer, ["  ab, c\t\n"])
    bits = item.token_bits
    assert item.tokens == [" ", " ", "a", "b", ",", " ", "c", "<0x09>", "\n"]  # no tab in Tiny Shakespeare
    assert item.words == ["ab,", "c"] and item.text == "  ab, c\t"
    assert item.word_bits == pytest.approx([sum(bits[0:5]), sum(bits[5:7])])  # leading spaces go to the next word
    assert (item.end, item.end_bits) == ("\t\n", pytest.approx(bits[7] + bits[8]))  # the rest of the line: its end

    model, tokenizer = load_model_and_tokenizer(str(folders["bpe"]))
    (item,) = surprisals(model, tokenizer, ["The cabinets are, hmm, on the tablé.\n"])
    assert item.words == ["The", "cabinets", "are,", "hmm,", "on", "the", "tablé."]
    assert len(item.tokens) > len(item.words) + 1  # words of several tokens
    offsets = tokenizer("The cabinets are, hmm, on the tablé.\n", return_offsets_mapping=True)["offset_mapping"]
    starts = [start for start, _ in offsets]
    word_starts = [0, 4, 13, 18, 23, 26, 30, 37]  # and the line end at 37
    expected = [sum(b for b, s in zip(item.token_bits, starts) if low - 1 <= s < high - 1 or (low == 0 and s == 0))
                for low, high in zip(word_starts, word_starts[1:])]
    assert item.word_bits == pytest.approx(expected)  # each token with its leading space: " cabinets" -> cabinets
    assert item.end == "\n" and item.end_bits == pytest.approx(item.token_bits[-1])


def test_word_level_tokens_are_words_and_the_line_end_is_eos(folders):
    model, tokenizer = load_model_and_tokenizer(str(folders["word"]))
    first, second = surprisals(model, tokenizer, ["The keys to the xylophone are here\nThe end"])
    assert first.words == "The keys to the xylophone are here".split()  # an unknown word as written ...
    assert "<unk>" in first.tokens and first.tokens[-1] == "<eos>"  # ... scored as <unk>
    assert first.word_bits == pytest.approx(first.token_bits[:-1])
    assert (first.end, first.end_bits) == ("\n", pytest.approx(first.token_bits[-1]))  # <eos>, shown as what it is
    assert second.tokens[-1] == "<eos>" and second.end == "\n"  # the last line ends with <eos> as well


def test_tsv_escapes_text_and_jsonl_holds_lists(folders):
    item = Surprisals(index=3, text="a\tb", tokens=["a", "\t", "b\\"], token_bits=[1.0, 2.0, 3.5], words=["a", "\tb\\"],
                      word_bits=[1.0, 5.5], end="\r\n", end_bits=0.25)
    assert list(tsv_lines([item], unit="word")) == [
        "line\tword\ttext\tsurprisal_bits", "3\t0\ta\t1.000000", "3\t1\t\\tb\\\\\t5.500000", "3\t\t\\r\\n\t0.250000",
    ]
    assert list(tsv_lines([item], unit="token", by="document"))[0] == "document\ttoken\ttext\tsurprisal_bits"
    assert all(line.count("\t") == 3 for line in tsv_lines([item], unit="token"))
    (line,) = jsonl_lines([item], unit="word")
    assert json.loads(line) == {"line": 3, "text": "a\tb", "words": ["a", "\tb\\"], "surprisal_bits": [1.0, 5.5],
                                "end": "\r\n", "end_surprisal_bits": 0.25}
    (line,) = jsonl_lines([item], unit="token")
    assert json.loads(line)["tokens"] == ["a", "\t", "b\\"]


def test_surprisal_command_writes_rows_that_sum_to_evaluate(folders, tmp_path, capsys):
    path = tmp_path / "sentences.txt"
    path.write_text(SENTENCES, encoding="utf-8")
    assert main(["surprisal", "--model", str(folders["bpe"]), "--file", str(path), "--carry_state"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["line", "word", "text", "surprisal_bits"]
    assert [row[2] for row in rows[1:11]] == SENTENCES.splitlines()[0].split() + ["\\n"]
    model, tokenizer = load_model_and_tokenizer(str(folders["bpe"]))
    total = sum(float(row[3]) for row in rows[1:]) * math.log(2)
    assert total == pytest.approx(evaluate_file(model, tokenizer, path).nll, rel=1e-5)
    output = tmp_path / "out.jsonl"
    assert main(["surprisal", "--model", str(folders["word"]), "--file", str(path), "--unit", "token", "--format",
                 "jsonl", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [record["line"] for record in records] == [0, 1]
    assert records[1]["tokens"][-4:] == ["on", "the", "table.", "<eos>"]


@pytest.mark.parametrize("make_args, message", [
    (lambda d, m: ["--model", d / "nowhere", "--file", d / "ok.txt"], "nowhere: no such model folder"),
    (lambda d, m: ["--model", m, "--file", d / "empty.txt"], "the file is empty"),
    (lambda d, m: ["--model", m, "--file", d / "latin1.txt"], "not UTF-8"),
    (lambda d, m: ["--model", m, "--file", d / "missing.txt"], "no such file"),
    (lambda d, m: ["--model", m, "--file", d / "ok.txt", "--unit", "sentence"], "invalid choice: 'sentence'"),
    (lambda d, m: ["--model", m, "--file", d / "ok.txt", "--format", "csv"], "invalid choice: 'csv'"),
    (lambda d, m: ["--model", m, "--file", d / "ok.txt", "--block_size", "0"], "--block_size must be at least 1"),
])
def test_bad_surprisal_input_fails_with_one_line(folders, tmp_path, capsys, make_args, message):
    (tmp_path / "ok.txt").write_text("The keys.\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("Thé keys.\n".encode("latin-1"))
    assert main(["surprisal", *map(str, make_args(tmp_path, folders["char"]))]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("lm-lstm surprisal: error: ") and message in errors[0]


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_minicons_incremental_scorer_gives_the_same_token_surprisals(folders, kind):
    """minicons (a dev dependency) scores an lm-lstm folder through `AutoModelForCausalLM`: its per-token surprisals
    from the BOS token are ours for each sentence on its own."""
    scorer_module = pytest.importorskip("minicons.scorer")
    from transformers import AutoTokenizer

    folder = str(folders[kind])
    # minicons prepends the BOS token as text: the tokenizer must read "</s>" (or "<eos>") as the token.
    tokenizer = AutoTokenizer.from_pretrained(folder, split_special_tokens=False)
    scorer = scorer_module.IncrementalLMScorer(folder, device="cpu", tokenizer=tokenizer)
    sentences = SENTENCES.splitlines()
    theirs = scorer.token_score(sentences, surprisal=True, base_two=True, bos_token=True)
    model, ours_tokenizer = load_model_and_tokenizer(folder)
    ours = surprisals(model, ours_tokenizer, sentences, by="document")
    for their_sentence, item in zip(theirs, ours):
        tokens, bits = zip(*their_sentence[1:])  # minicons lists the BOS token first, with a score of 0
        assert list(tokens) == item.tokens[: len(tokens)]
        assert list(bits) == pytest.approx(item.token_bits[: len(bits)], rel=1e-4, abs=1e-5)
        assert item.tokens[len(tokens) :] == (["<eos>"] if kind == "word" else [])  # ours ends the line
