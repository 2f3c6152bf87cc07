"""Data loading: file kinds, text columns, validation carving, tokenisation into blocks, caching, bad files."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

import lm_lstm.data
from lm_lstm.data import (
    DataError, DataSource, carve_validation, check_text_file, collate_blocks, load_documents, load_pieces,
    load_text_datasets, tokenize_dataset, tokenize_documents,
)
from lm_lstm.streams import StreamBlocks, build_stream_data
from lm_lstm.tokenization import document_start_id, train_char_tokenizer, train_tokenizer

DOCUMENTS = [f"Document {i}: " + "words " * (5 + i) for i in range(20)]


def write_tabular(folder, kind):
    records = [{"body": text, "id": i} for i, text in enumerate(DOCUMENTS)]
    path = folder / f"docs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_tabular_files_with_a_text_column(tmp_path, kind):
    path = write_tabular(tmp_path, kind)
    raw = load_text_datasets(DataSource(train_files=[str(path)], text_column="body", validation_split_percentage=10))
    whole, cut = "".join(DOCUMENTS), int(len("".join(DOCUMENTS)) * 0.9)  # the last 10% of the text by position
    train, validation = list(raw["train"]["text"]), list(raw["validation"]["text"])
    assert "".join(train) == whole[:cut] and "".join(validation) == whole[cut:]
    assert train[:18] == DOCUMENTS[:18] and validation[1:] == DOCUMENTS[19:]  # the cut falls in document 18
    with pytest.raises(DataError, match="no column 'text'"):
        load_text_datasets(DataSource(train_files=[str(path)]))


def test_single_text_file_is_split_by_character_position(tmp_path, shakespeare_text):
    path = tmp_path / "play.txt"
    path.write_text(shakespeare_text[:10_000])
    raw = load_text_datasets(DataSource(train_files=[str(path)], validation_split_percentage=10))
    assert raw["train"]["text"][0] + raw["validation"]["text"][0] == shakespeare_text[:10_000]
    assert len(raw["validation"]["text"][0]) == 1000


def test_several_files_give_the_last_percent_of_their_text_not_a_whole_file(tmp_path, shakespeare_text):
    files = [tmp_path / "book1.txt", tmp_path / "book2.txt"]
    files[0].write_text(shakespeare_text[:35_000])
    files[1].write_text(shakespeare_text[35_000:52_000])
    raw = load_text_datasets(DataSource(train_files=[str(f) for f in files], validation_split_percentage=10))
    assert raw["train"]["text"] == [shakespeare_text[:35_000], shakespeare_text[35_000:46_800]]
    assert raw["validation"]["text"] == [shakespeare_text[46_800:52_000]]  # 10% of 52,000 characters


def test_documents_end_with_eos_and_fill_blocks(tmp_path, char_tokenizer):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("abc\n" * 30)
    files[1].write_text("xyz\n" * 30)
    raw = load_text_datasets(DataSource(train_files=[str(files[0])], validation_files=[str(files[1])]))
    blocks = tokenize_dataset(raw, char_tokenizer, block_size=16)
    stream = [t for block in blocks["train"]["input_ids"] for t in block]
    expected = char_tokenizer("abc\n" * 30, add_special_tokens=False).input_ids + [char_tokenizer.eos_token_id]
    assert stream == expected[: len(expected) - len(expected) % 16]
    assert all(block == labels for block, labels in zip(blocks["train"]["input_ids"], blocks["train"]["labels"]))


def test_special_token_strings_in_documents_are_text(char_tokenizer):
    texts = ["<p>old</s> new</p>", "<s>b<pad>"]
    pieces = tokenize_documents(Dataset.from_dict({"text": texts}), char_tokenizer)
    start = document_start_id(char_tokenizer)
    # one document-start token after each document, none inside: a literal "</s>" does not end the first one
    assert [piece.count(start) for piece in pieces["input_ids"]] == [1, 1]
    assert [char_tokenizer.decode(piece, skip_special_tokens=True) for piece in pieces["input_ids"]] == texts
    layout = StreamBlocks.from_pieces(pieces, char_tokenizer, block_size=32, num_streams=1)
    assert layout.inputs[0, :, 0].tolist() == [start, start] and layout.resets.tolist() == [[True, True]]
    assert layout.target_ids() == [token for piece in pieces["input_ids"] for token in piece]


def test_second_run_reuses_the_datasets_cache(tmp_path, char_tokenizer, shakespeare_text):
    path = tmp_path / "play.txt"
    path.write_text(shakespeare_text[:20_000])
    first = tokenize_dataset(load_text_datasets(DataSource(train_files=[str(path)])), char_tokenizer, 32)
    second = tokenize_dataset(load_text_datasets(DataSource(train_files=[str(path)])), char_tokenizer, 32)
    assert first["train"]._fingerprint == second["train"]._fingerprint
    assert first["train"].cache_files and first["train"].cache_files == second["train"].cache_files


def test_the_text_cache_follows_the_content_not_the_file_time(tmp_path, char_tokenizer):
    path = tmp_path / "play.txt"
    path.write_text("hello world\n" * 10)
    stamp = path.stat().st_mtime_ns
    first = load_text_datasets(DataSource(train_files=[str(path)], validation_split_percentage=10))
    path.write_text("HELLO WORLD\n" * 10)  # as `cp -p` or `rsync -a` would: same size, same time
    os.utime(path, ns=(stamp, stamp))
    second = load_text_datasets(DataSource(train_files=[str(path)], validation_split_percentage=10))
    assert first["train"][0]["text"].startswith("hello") and second["train"][0]["text"].startswith("HELLO")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "the file is empty"), (b" \n\t ", "only whitespace"),
    (b"ok\xff\xfe", "not UTF-8"), (b"abc\x00def", "NUL bytes"), (b"caf\xc3", "ends inside"),
])
def test_bad_files_are_named_in_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        check_text_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_collate_pads_short_blocks_on_the_right():
    batch = collate_blocks([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "attention_mask" not in collate_blocks([{"input_ids": [5, 6], "labels": [5, 6]}])


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": 42}\n', "jsonl", "column 'text' holds int64 values, not text"),
    ("this is not json\n", "jsonl", "cannot be read as .jsonl"),
    ('{"text": ""}\n{"text": ""}\n', "jsonl", "every document is an empty string"),
    ("text\n", "csv", r"data.csv: holds no records \(only a header, or an empty list\)"),
    ("[]", "json", r"data.json: holds no records"),
])
def test_unusable_records_fail_with_one_clear_error(tmp_path, content, suffix, message):
    path = tmp_path / f"data.{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        raw = load_text_datasets(DataSource(train_files=[str(path)], validation_files=[str(path)]))
        tokenize_documents(raw, train_char_tokenizer(["abc"]))


def test_a_missing_csv_cell_is_an_empty_document(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,other\nhello,1\n,2\nworld,3\n")
    assert load_documents([str(path)])["text"] == ["hello", "", "world"]
    raw = load_text_datasets(DataSource(train_files=[str(path)], validation_files=[str(path)]))
    assert list(raw["train"]["text"]) == ["hello", "world"] and list(raw["train"]["ends_document"]) == [True, True]


def test_word_level_documents_end_with_one_eos_per_line():
    """A document's tokens end with exactly one <eos>: its own, when its last word is followed by a line end (and
    whitespace only), else one added; every token carries the bytes of the text it stands for (with the whitespace
    before it; trailing whitespace with the added <eos>)."""
    tokenizer = train_tokenizer(["the cat sat\nthe dog sat\n"], kind="word", vocab_size=10)
    texts = ["the cat\nsat\n", "the dög", "sat \r\n\n", "\n", "cat  "]
    pieces = tokenize_documents(Dataset.from_dict({"text": texts}), tokenizer)
    assert [tokenizer.convert_ids_to_tokens(ids) for ids in pieces["input_ids"]] == [
        ["the", "cat", "<eos>", "sat", "<eos>"], ["the", "<unk>", "<eos>"], ["sat", "<eos>", "<eos>"], ["<eos>"],
        ["cat", "<eos>"],
    ]
    assert pieces["token_bytes"] == [[3, 4, 1, 3, 1], [3, 5, 0], [3, 3, 1], [1], [3, 2]]
    assert [sum(sizes) for sizes in pieces["token_bytes"]] == [len(text.encode()) for text in texts]


def test_a_word_level_document_in_several_pieces_is_one_document_in_the_streams(monkeypatch):
    """Pieces end at line ends, so with a word-level tokenizer each ends in <eos>: the document still starts only
    once, and bits per byte divides by the bytes of the whole text."""
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 10)
    text = "the cat sat on the mat\nthe dog sat\nthe cat\nsat on the dog\n" * 2
    tokenizer = train_tokenizer([text], kind="word", vocab_size=20)
    raw = DatasetDict(train=Dataset.from_dict({"text": [text]}), validation=Dataset.from_dict({"text": [text, "é"]}))
    data = build_stream_data(raw, tokenizer, block_size=4, train_streams=1, eval_streams=1)
    pieces = tokenize_documents(raw["train"], tokenizer)["input_ids"]
    assert len(pieces) == 6 and all(piece[-1] == tokenizer.eos_token_id for piece in pieces)
    assert data.train.resets.sum() == 1  # one document: one reset
    assert data.train.target_ids() == tokenizer(text)["input_ids"]  # one <eos> per line, none added
    summary = data.summary(tokenizer)
    assert summary["eval_tokens"] == len(tokenizer(text)["input_ids"]) + 2  # é is <unk>, then its <eos>
    assert summary["validation_bytes"] == len(text) + 2


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_a_file_of_one_long_line_is_cut_at_spaces_into_bounded_pieces(tmp_path, monkeypatch, kind):
    """A line longer than `LONG_LINE_PIECES` pieces is cut before a space (or, with none in reach, at the limit): the
    pieces stay bounded, their tokens are the whole line's, and their bytes the file's."""
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 10)
    monkeypatch.setattr(lm_lstm.data, "LONG_LINE_PIECES", 3)
    monkeypatch.setattr(lm_lstm.data, "_SNIFF_BYTES", 7)  # read in chunks shorter than a piece
    text = "the cat sat  on the mat, said the dog " * 8 + "\nthe end\n"
    (tmp_path / "one-line.txt").write_text(text)
    pieces = load_pieces([str(tmp_path / "one-line.txt")])
    texts = list(pieces["text"])
    assert "".join(texts) == text and len(texts) >= 10
    assert max(len(t) for t in texts if not t.endswith("\n")) <= 30 and max(map(len, texts)) <= 30 + 7  # + a chunk
    assert all(b.startswith(" ") for a, b in zip(texts, texts[1:]) if not a.endswith("\n"))
    tokenizer = train_tokenizer([text], kind=kind, vocab_size=300 if kind == "bpe" else 20)
    tokens = tokenize_documents(pieces, tokenizer)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = [] if whole[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]  # a word tokenizer's line end
    assert sum(tokens["input_ids"], []) == whole + ends
    assert sum(map(sum, tokens["token_bytes"])) == len(text.encode())
    (tmp_path / "no-space.txt").write_text("x" * 70)
    assert list(load_pieces([str(tmp_path / "no-space.txt")])["text"]) == ["x" * 30, "x" * 30, "x" * 10]


def split_into_pieces_before(batch):
    """How documents were cut into pieces before text files were read in pieces (commit 27b34b7)."""
    pieces, ends = [], []
    for text in batch["text"]:
        start = 0
        while start < len(text):
            stop = text.find("\n", start + lm_lstm.data.PIECE_CHARS)
            stop = len(text) if stop == -1 else stop + 1
            pieces.append(text[start:stop])
            ends.append(stop == len(text))
            start = stop
    return {"text": pieces, "ends_document": ends}


@pytest.mark.parametrize("percentage", [10.0, 37.5, 80.0])
def test_text_files_are_read_in_the_pieces_their_whole_documents_were_cut_in(tmp_path, monkeypatch, shakespeare_text,
                                                                           percentage):
    """Read in chunks, never whole, text files give the pieces and the validation cut that loading each as one
    document gave: line ends read as `datasets` reads them, the cut by character position, a line longer than a
    piece kept whole."""
    monkeypatch.setattr(lm_lstm.data, "PIECE_CHARS", 1000)
    monkeypatch.setattr(lm_lstm.data, "_SNIFF_BYTES", 777)  # chunks that cut lines, characters and "\r\n"
    texts = [shakespeare_text[:9000].replace("\n", "\r\n", 40) + "é…\r", "x" * 2500 + "\nshort tail",
             shakespeare_text[9000:15000]]
    files = []
    for index, text in enumerate(texts):
        files.append(str(tmp_path / f"part{index}.txt"))
        Path(files[-1]).write_bytes(text.encode("utf-8"))
    pieces = load_text_datasets(DataSource(train_files=files, validation_split_percentage=percentage))
    before = carve_validation(load_documents(files), percentage).map(split_into_pieces_before, batched=True,
                                                                      remove_columns=["text"])
    for split in ("train", "validation"):
        assert list(pieces[split]["text"]) == list(before[split]["text"])
        assert list(pieces[split]["ends_document"]) == list(before[split]["ends_document"])
    assert len(pieces["train"]) + len(pieces["validation"]) > 15 and "\r" not in "".join(pieces["train"]["text"])


@pytest.mark.parametrize("suffix, content", [("jsonl", '{"text": "To be."}\n')])
def test_files_are_read_as_a_split_named_documents(tmp_path, suffix, content):
    """`datasets` names the split in its progress ("Generating ... split"): not "train" when evaluating a file."""
    path = tmp_path / f"data.{suffix}"
    path.write_text(content)
    assert str(load_pieces([str(path)]).split) == "documents"
