"""Checkpoint conversion (`lm_lstm.convert`, `lm-lstm convert`).

The source models are rebuilt here from the published code of each codebase (key names, shapes, forward passes):
PyTorch's word_language_model (pytorch/examples) and AWD-LSTM (salesforce/awd-lstm-lm). Whole models are pickled
under the module paths the real checkpoints name (`model.RNNModel`, `weight_drop.WeightDrop`, ...).
"""

import ast
import contextlib
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import types
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM

import lm_lstm.convert
import lm_lstm.data
import lm_lstm.output_dir
from hub_server import metadata_errors
from lm_lstm.cli import main
from lm_lstm.convert import (
    AWD_LSTM, LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, PYTORCH_EXAMPLE, CheckpointError,
    convert_awd_lstm_checkpoint, convert_checkpoint, convert_pytorch_example_checkpoint, corpus_vocabulary,
    load_checkpoint, load_torch_file, read_vocabulary,
)
from lm_lstm.evaluation import score_stream
from lm_lstm.hub import check_hub_ready

pytestmark = pytest.mark.filterwarnings(
    "ignore:dropout option adds dropout",  # the sources' 1-layer nn.LSTM(dropout=...)
    "ignore:Couldn't retrieve source code",  # torch's legacy format, saving classes defined in this file
)


# ----------------------------------------------------------------------------------------------------------------------
# The source codebases, as published


class ExampleRNNModel(nn.Module):
    """pytorch/examples word_language_model/model.py `RNNModel` (pickled as `model.RNNModel`)."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ["LSTM", "GRU"]:
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("When using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


class LockedDropout(nn.Module):
    """awd-lstm-lm locked_dropout.py."""

    def forward(self, x, dropout=0.5):
        if not self.training or not dropout:
            return x
        m = x.data.new(1, x.size(1), x.size(2)).bernoulli_(1 - dropout)
        return (m / (1 - dropout)).expand_as(x) * x


def embedded_dropout(embed, words, dropout=0.1):
    """awd-lstm-lm embed_regularize.py (without `scale`)."""
    if dropout:
        mask = embed.weight.data.new().resize_((embed.weight.size(0), 1)).bernoulli_(1 - dropout)
        masked_embed_weight = mask.expand_as(embed.weight) / (1 - dropout) * embed.weight
    else:
        masked_embed_weight = embed.weight
    return F.embedding(words, masked_embed_weight)


class WeightDrop(nn.Module):
    """awd-lstm-lm weight_drop.py: DropConnect on `weights`, kept as `<name>_raw`."""

    def __init__(self, module, weights, dropout=0, variational=False):
        super().__init__()
        self.module = module
        self.weights = weights
        self.dropout = dropout
        self.variational = variational
        self._setup()

    def widget_demagnetizer_y2k_edition(*args, **kwargs):
        return

    def _setup(self):
        if issubclass(type(self.module), nn.RNNBase):
            self.module.flatten_parameters = self.widget_demagnetizer_y2k_edition
        for name_w in self.weights:
            w = getattr(self.module, name_w)
            del self.module._parameters[name_w]
            self.module.register_parameter(name_w + "_raw", nn.Parameter(w.data))

    def _setweights(self):
        for name_w in self.weights:
            raw_w = getattr(self.module, name_w + "_raw")
            w = F.dropout(raw_w, p=self.dropout, training=self.training)
            setattr(self.module, name_w, nn.Parameter(w))

    def forward(self, *args):
        self._setweights()
        return self.module.forward(*args)


class AWDRNNModel(nn.Module):
    """awd-lstm-lm model.py `RNNModel` (pickled as `model.RNNModel`); the decoder is applied by the criterion."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, dropouth=0.5, dropouti=0.5, dropoute=0.1,
                 wdrop=0, tie_weights=False):
        super().__init__()
        self.lockdrop = LockedDropout()
        self.idrop = nn.Dropout(dropouti)
        self.hdrop = nn.Dropout(dropouth)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type == "LSTM":
            self.rnns = [nn.LSTM(ninp if l == 0 else nhid, nhid if l != nlayers - 1 else (ninp if tie_weights else nhid),
                                 1, dropout=0) for l in range(nlayers)]
            if wdrop:
                self.rnns = [WeightDrop(rnn, ["weight_hh_l0"], dropout=wdrop) for rnn in self.rnns]
        elif rnn_type == "GRU":
            self.rnns = [nn.GRU(ninp if l == 0 else nhid, nhid if l != nlayers - 1 else ninp, 1, dropout=0)
                         for l in range(nlayers)]
        self.rnns = nn.ModuleList(self.rnns)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type = rnn_type
        self.ninp = ninp
        self.nhid = nhid
        self.nlayers = nlayers
        self.dropout = dropout
        self.dropouti = dropouti
        self.dropouth = dropouth
        self.dropoute = dropoute
        self.tie_weights = tie_weights

    def init_weights(self):
        initrange = 0.1
        self.encoder.weight.data.uniform_(-initrange, initrange)
        self.decoder.bias.data.fill_(0)
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, input, hidden, return_h=False):
        emb = embedded_dropout(self.encoder, input, dropout=self.dropoute if self.training else 0)
        emb = self.lockdrop(emb, self.dropouti)
        raw_output = emb
        new_hidden = []
        for l, rnn in enumerate(self.rnns):
            raw_output, new_h = rnn(raw_output, hidden[l])
            new_hidden.append(new_h)
            if l != self.nlayers - 1:
                raw_output = self.lockdrop(raw_output, self.dropouth)
        output = self.lockdrop(raw_output, self.dropout)
        return output.view(output.size(0) * output.size(1), output.size(2)), new_hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters()).data
        return [(weight.new_zeros(1, bsz, self.nhid if l != self.nlayers - 1 else (self.ninp if self.tie_weights
                                                                                   else self.nhid)),) * 2
                for l in range(self.nlayers)]


class SplitCrossEntropyLoss(nn.Module):
    """awd-lstm-lm splitcross.py: its state, and its loss without splits (a plain softmax)."""

    def __init__(self, hidden_size, splits, verbose=False):
        super().__init__()
        self.hidden_size = hidden_size
        self.splits = [0] + splits + [100 * 1000000]
        self.nsplits = len(self.splits) - 1
        self.stats = defaultdict(list)
        self.verbose = verbose
        if self.nsplits > 1:
            self.tail_vectors = nn.Parameter(torch.zeros(self.nsplits - 1, hidden_size))
            self.tail_bias = nn.Parameter(torch.zeros(self.nsplits - 1))

    def forward(self, weight, bias, hiddens, targets, verbose=False):
        assert self.nsplits == 1
        softmaxed_head_res = F.log_softmax(F.linear(hiddens, weight, bias=bias), dim=-1)
        entropy = -torch.gather(softmaxed_head_res, dim=1, index=targets.view(-1, 1))
        return (entropy.float().sum() / len(targets)).type_as(weight)


class Dictionary:
    """data.py of both codebases."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = []

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]


class Corpus:
    """data.py of both codebases: the vocabulary of train.txt, valid.txt and test.txt, and their ids."""

    def __init__(self, path):
        self.dictionary = Dictionary()
        self.train = self.tokenize(os.path.join(path, "train.txt"))
        self.valid = self.tokenize(os.path.join(path, "valid.txt"))
        self.test = self.tokenize(os.path.join(path, "test.txt"))

    def tokenize(self, path):
        ids = []
        with open(path, "r", encoding="utf8") as f:
            for line in f:
                for word in line.split() + ["<eos>"]:
                    ids.append(self.dictionary.add_word(word))
        return torch.tensor(ids, dtype=torch.int64)


@contextlib.contextmanager
def published_as(**modules):
    """Makes the given classes picklable under the source's module paths, e.g. `model.RNNModel`."""
    saved_modules = {name: sys.modules.get(name) for name in modules}
    saved_names = {}
    try:
        for module_name, classes in modules.items():
            module = types.ModuleType(module_name)
            for name, cls in classes.items():
                saved_names[cls] = (cls.__module__, cls.__qualname__)
                cls.__module__, cls.__qualname__ = module_name, name
                setattr(module, name, cls)
            sys.modules[module_name] = module
        yield
    finally:
        for cls, (module_name, qualname) in saved_names.items():
            cls.__module__, cls.__qualname__ = module_name, qualname
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


EXAMPLE_CLASSES = {"model": {"RNNModel": ExampleRNNModel}}
AWD_CLASSES = {
    "model": {"RNNModel": AWDRNNModel}, "weight_drop": {"WeightDrop": WeightDrop},
    "locked_dropout": {"LockedDropout": LockedDropout}, "splitcross": {"SplitCrossEntropyLoss": SplitCrossEntropyLoss},
    "data": {"Corpus": Corpus, "Dictionary": Dictionary},
}


# ----------------------------------------------------------------------------------------------------------------------
# Data and helpers

TRAIN = "the cat sat on the mat\nthe <unk> sat\n\na cat  ran fast\n"
VALID = "the bird sat on a mat\n"
TEST = "a bird ran on the mat\nthe cat sat\n"
NINP, NHID = 5, 7


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in (("train.txt", TRAIN), ("valid.txt", VALID), ("test.txt", TEST)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def corpus_files(folder: Path) -> list[Path]:
    return [folder / "train.txt", folder / "valid.txt", folder / "test.txt"]


def randomize(model: nn.Module, seed: int) -> None:
    """Every parameter (biases included) away from its initial value, so that the mapping of each one is checked."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 1.6 - 0.8)


def build_source(source: str, ntoken: int, layers: int, tied: bool, wdrop: float = 0.4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if source == PYTORCH_EXAMPLE:
        model = ExampleRNNModel("LSTM", ntoken, NINP, NINP if tied else NHID, layers, dropout=0.3, tie_weights=tied)
    else:
        model = AWDRNNModel("LSTM", ntoken, NINP, NHID, layers, dropout=0.4, dropouth=0.25, dropouti=0.35,
                            dropoute=0.1, wdrop=wdrop, tie_weights=tied)
    randomize(model, seed)
    return model


def awd_training_step(model: AWDRNNModel, criterion: SplitCrossEntropyLoss, optimizer) -> None:
    """One step of AWD-LSTM's training loop: afterwards each WeightDrop'ed LSTM holds a dropped-out `weight_hh_l0`."""
    model.train()
    data = torch.randint(0, model.encoder.num_embeddings, (6, 2))
    output, _ = model(data[:-1], model.init_hidden(2))
    loss = criterion(model.decoder.weight, model.decoder.bias, output, data[1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def source_outputs(model: nn.Module, source: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The source model's logits `(batch, time, vocab)` on `ids` `(batch, time)` from a zero state, in evaluation,
    and the per-token losses of predicting `ids[:, 1:]` as its own code computes them."""
    model.eval()
    batch, time = ids.shape
    inputs = ids.t().contiguous()  # both codebases are time-major
    with torch.no_grad():
        if source == PYTORCH_EXAMPLE:
            log_probs, _ = model(inputs, model.init_hidden(batch))
            emb = model.drop(model.encoder(inputs))
            logits = model.decoder(model.drop(model.rnn(emb, model.init_hidden(batch))[0]))
            log_probs = log_probs.view(time, batch, -1)
            losses = -log_probs[:-1].gather(2, inputs[1:, :, None])[..., 0]
        else:
            output, _ = model(inputs, model.init_hidden(batch))
            logits = F.linear(output, model.decoder.weight, model.decoder.bias).view(time, batch, -1)
            criterion = SplitCrossEntropyLoss(output.shape[-1], splits=[])
            hidden = output.view(time, batch, -1)
            losses = torch.stack([
                torch.stack([criterion(model.decoder.weight, model.decoder.bias, hidden[t, b][None], inputs[t + 1, b][None])
                             for b in range(batch)])
                for t in range(time - 1)
            ])
    return logits.transpose(0, 1), losses.t()


def source_stream_nll(model: nn.Module, source: str, stream: list[int], bptt: int) -> tuple[float, int]:
    """Summed NLL of `stream[1:]` as the codebases' `evaluate()` computes it: batch 1, `bptt` steps per chunk, the
    hidden state carried from chunk to chunk."""
    model.eval()
    data = torch.tensor(stream)[:, None]
    hidden = model.init_hidden(1)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(stream) - 1, bptt):
            inputs, targets = data[i:i + bptt], data[i + 1:i + 1 + bptt].view(-1)
            inputs = inputs[:len(targets)]
            if source == PYTORCH_EXAMPLE:
                output, hidden = model(inputs, hidden)
                total += float(F.nll_loss(output, targets, reduction="sum"))
            else:
                output, hidden = model(inputs, hidden)
                criterion = SplitCrossEntropyLoss(output.shape[-1], splits=[])
                total += len(targets) * float(criterion(model.decoder.weight, model.decoder.bias, output, targets))
    return total, len(stream) - 1


def save_checkpoint(model: nn.Module, source: str, path: Path, saved_as: str) -> Path:
    """Saves `model` the way the source's users do: its state_dict, the whole model (`torch.save(model, f)`, the
    example's main.py), `[model, criterion, optimizer]` (AWD-LSTM's main.py), in torch's zip or legacy format."""
    legacy = saved_as.endswith("-legacy")
    kind = saved_as.removesuffix("-legacy")
    options = {"_use_new_zipfile_serialization": False} if legacy else {}
    classes = EXAMPLE_CLASSES if source == PYTORCH_EXAMPLE else AWD_CLASSES
    if kind == "safetensors":
        path = path.with_suffix(".safetensors")
        save_model(model, str(path))  # keeps one of the two tied weights
        return path
    with published_as(**classes):
        if kind == "state_dict":
            torch.save(model.state_dict(), path, **options)
        elif kind == "whole":
            torch.save(model, path, **options)
        else:  # AWD-LSTM's [model, criterion, optimizer], after a training step
            criterion = SplitCrossEntropyLoss(model.ninp if model.tie_weights else model.nhid, splits=[])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1.2e-6)
            awd_training_step(model, criterion, optimizer)
            torch.save([model, criterion, optimizer], path, **options)
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------------
# Vocabularies


def test_corpus_vocabulary_is_the_sources_dictionary(corpus_dir):
    (corpus_dir / "train.txt").write_bytes(b"b a\r\nc\xc2\xa0d  b\n\n e\x0bf\ra\n")  # CRLF, NBSP, VT, bare CR
    expected = Corpus(str(corpus_dir)).dictionary.idx2word
    assert corpus_vocabulary(corpus_files(corpus_dir)) == expected
    assert expected[:8] == ["b", "a", "<eos>", "c", "d", "e", "f", "the"]


def test_vocabulary_file_and_pickled_corpus(corpus_dir, tmp_path):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    assert read_vocabulary(tmp_path / "vocab.txt") == words
    with published_as(**AWD_CLASSES):  # AWD-LSTM caches its Corpus as corpus.<md5>.data
        torch.save(Corpus(str(corpus_dir)), tmp_path / "corpus.data")
        torch.save(Corpus(str(corpus_dir)), tmp_path / "corpus-legacy.data", _use_new_zipfile_serialization=False)
    assert read_vocabulary(tmp_path / "corpus.data") == words
    assert read_vocabulary(tmp_path / "corpus-legacy.data") == words
    for text, message in (("a\n\nb\n", "line 2 is empty"), ("a\nb 3\n", "line 2 holds 2 words")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(CheckpointError, match=message) as error:
            read_vocabulary(tmp_path / "bad.txt")
        one_line(error)


@pytest.mark.parametrize("ids, message", [
    ({"<eos>": 0, "a": 2, "b": 3}, r"must number its 3 words 0 \.\.\. 2, each once .* but id 3 is outside 0 \.\.\. 2"),
    ({"<eos>": 0, "a": 1, "b": 1}, r"but id 1 is given to 2 words \('a', 'b'\)"),
    ({"<eos>": 0, "a": 1, "b": -1}, r"but id -1 is outside 0 \.\.\. 2"),
])
def test_a_pickled_word_to_id_dict_must_number_the_words_from_0(tmp_path, ids, message):
    """The ids are embedding rows: renumbering them would pair words with other words' rows."""
    torch.save(ids, tmp_path / "word2idx.pt")
    with pytest.raises(CheckpointError, match=message) as error:
        read_vocabulary(tmp_path / "word2idx.pt")
    one_line(error)
    torch.save({"b": 1, "<eos>": 0, "a": 2}, tmp_path / "good.pt")
    assert read_vocabulary(tmp_path / "good.pt") == ["<eos>", "b", "a"]


@pytest.mark.parametrize("name", ["vocab.txt", "train.txt"])
def test_text_that_is_not_utf8_is_named_with_the_offset(corpus_dir, tmp_path, monkeypatch, name):
    path = corpus_dir / name
    path.write_bytes(b"<eos>\nthe\ncat\xff\n")
    read = read_vocabulary if name == "vocab.txt" else lambda p: corpus_vocabulary([p])
    expected = re.escape(f"{path}: not UTF-8 text (invalid byte at offset 13).")
    with pytest.raises(CheckpointError, match=f"^{expected}$"):
        read(path)
    monkeypatch.setattr(lm_lstm.data, "_SNIFF_BYTES", 4)  # a character begun in the chunk before does not shift it
    path.write_bytes(b"<eos>\nab\ncd\xc3(\n")  # chunks '<eos', '>\nab', '\ncd\xc3', '(\n'
    with pytest.raises(CheckpointError, match=r"invalid byte at offset 11\)"):
        read(path)


def test_a_byte_order_mark_is_not_part_of_the_first_word(corpus_dir, tmp_path):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8-sig")
    assert read_vocabulary(tmp_path / "vocab.txt") == words
    (tmp_path / "eos.txt").write_text("<eos>\na\n", encoding="utf-8-sig")
    assert read_vocabulary(tmp_path / "eos.txt") == ["<eos>", "a"]
    (corpus_dir / "train.txt").write_text(TRAIN, encoding="utf-8-sig")
    assert corpus_vocabulary(corpus_files(corpus_dir)) == words


# ----------------------------------------------------------------------------------------------------------------------
# Conversion: logits, losses, perplexity

CASES = [  # source, layers, tied, how it was saved, WeightDrop probability (AWD-LSTM), vocabulary given as
    (PYTORCH_EXAMPLE, 1, False, "state_dict", None, "train_files"),
    (PYTORCH_EXAMPLE, 2, True, "whole", None, "vocab"),
    (PYTORCH_EXAMPLE, 3, False, "whole-legacy", None, "train_files"),
    (PYTORCH_EXAMPLE, 2, True, "safetensors", None, "vocab"),
    (AWD_LSTM, 1, True, "state_dict-legacy", 0.5, "train_files"),
    (AWD_LSTM, 2, False, "whole", 0.0, "vocab"),
    (AWD_LSTM, 3, True, "triple", 0.5, "train_files"),
    (AWD_LSTM, 2, True, "triple-legacy", 0.5, "vocab"),
]


@pytest.mark.parametrize("source, layers, tied, saved_as, wdrop, vocabulary", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'tied' if c[2] else 'untied'}-{c[3]}" for c in CASES])
def test_converted_model_equals_the_source(corpus_dir, tmp_path, source, layers, tied, saved_as, wdrop, vocabulary):
    corpus = Corpus(str(corpus_dir))
    words = corpus.dictionary.idx2word
    model = build_source(source, len(words), layers, tied, wdrop=wdrop or 0.0)
    checkpoint = save_checkpoint(model, source, tmp_path / "model.pt", saved_as)
    if vocabulary == "vocab":
        (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        inputs = {"vocab_file": tmp_path / "vocab.txt"}
    else:
        inputs = {"train_files": corpus_files(corpus_dir)}
    convert = convert_pytorch_example_checkpoint if source == PYTORCH_EXAMPLE else convert_awd_lstm_checkpoint
    result = convert(checkpoint, tmp_path / "converted", **inputs)

    config = result.config
    assert (config.num_hidden_layers, config.tie_word_embeddings, config.vocab_size) == (layers, tied, len(words))
    assert result.max_logit_difference <= 1e-5
    if saved_as.startswith(("whole", "triple")):  # the dropouts a pickled model records
        expected = {"input_dropout": 0.3, "hidden_dropout": 0.3, "output_dropout": 0.3} if source == PYTORCH_EXAMPLE \
            else {"embedding_dropout": 0.1, "input_dropout": 0.35, "hidden_dropout": 0.25, "output_dropout": 0.4,
                  "weight_dropout": wdrop}
        assert {name: getattr(config, name) for name in expected} == pytest.approx(expected)
    else:
        assert config.input_dropout == config.weight_dropout == 0.0

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    ids = torch.randint(0, len(words), (2, 9), generator=torch.Generator().manual_seed(1))
    logits, losses = source_outputs(model, source, ids)
    with torch.no_grad():
        ours = converted(ids).logits
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)
    our_losses = F.cross_entropy(ours[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(our_losses, losses, atol=1e-5, rtol=0)

    # The same text gives the same ids and the same perplexity (state carried across chunks).
    tokenizer = result_tokenizer(tmp_path / "converted")
    test_text = (corpus_dir / "test.txt").read_text()
    assert tokenizer(test_text, add_special_tokens=False)["input_ids"] == corpus.test.tolist()
    stream = [words.index("<eos>")] + corpus.test.tolist()
    source_nll, count = source_stream_nll(model, source, stream, bptt=4)
    our_nll, our_count = score_stream(converted, stream, block_size=3)
    assert our_count == count
    assert torch.tensor(our_nll / count).exp().item() == pytest.approx(
        torch.tensor(source_nll / count).exp().item(), rel=1e-5)


def result_tokenizer(folder: Path):
    from lm_lstm.tokenization import load_tokenizer

    return load_tokenizer(folder)


def test_unknown_words_and_line_ends(corpus_dir, tmp_path):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    checkpoint = save_checkpoint(build_source(PYTORCH_EXAMPLE, len(words), 1, True), PYTORCH_EXAMPLE,
                                 tmp_path / "model.pt", "state_dict")
    convert_checkpoint(checkpoint, tmp_path / "out", train_files=corpus_files(corpus_dir))
    tokenizer = result_tokenizer(tmp_path / "out")
    ids = tokenizer("the zebra sat\na cat", add_special_tokens=False)["input_ids"]
    assert ids == [words.index(w) for w in ["the", "<unk>", "sat", "<eos>", "a", "cat"]]
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<eos>"


def test_converted_folder_loads_where_lm_lstm_cannot_be_imported(corpus_dir, tmp_path):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    model = build_source(AWD_LSTM, len(words), 2, True, wdrop=0.5)
    checkpoint = save_checkpoint(model, AWD_LSTM, tmp_path / "model.pt", "whole")
    folder = tmp_path / "converted"
    convert_checkpoint(checkpoint, folder, train_files=corpus_files(corpus_dir))
    check_hub_ready(folder)  # weights, config with auto_map and the code files, tokenizer, generation config, card
    ids = torch.tensor([[words.index(w) for w in "<eos> the cat sat on the mat".split()]])
    logits, _ = source_outputs(model, AWD_LSTM, ids)
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lm_lstm"] = None  # any `import lm_lstm` now fails
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        ids = tokenizer("\\nthe cat sat on the mat", add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids.tolist() == expected["ids"].tolist(), ids
        torch.testing.assert_close(model(ids).logits, expected["logits"], atol=1e-5, rtol=0)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert out.shape == (1, 10), out.shape
        print("remote ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_card_names_the_source(corpus_dir, tmp_path):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    checkpoint = save_checkpoint(build_source(AWD_LSTM, len(words), 3, True), AWD_LSTM, tmp_path / "awd.pt", "triple")
    convert_checkpoint(checkpoint, tmp_path / "out", train_files=corpus_files(corpus_dir))
    card = (tmp_path / "out" / "README.md").read_text()
    assert metadata_errors(card) == [] and "{{" not in card
    assert "https://github.com/salesforce/awd-lstm-lm" in card and "`awd.pt`" in card
    assert "whole pickled model (in a list of 3)" in card and "merity2018regularizing" in card
    import hashlib
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in card
    assert "train.txt, valid.txt, test.txt" in card


# ----------------------------------------------------------------------------------------------------------------------
# Safety


class SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class FileWrite:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class EvalCall:
    """Pickled beside a real model, as the payload of a tampered checkpoint: its pickle calls `eval`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [SystemCall, FileWrite, EvalCall])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickles_are_refused_without_running_them(tmp_path, monkeypatch, payload, legacy):
    marker = tmp_path / "pwned"
    state = ExampleRNNModel("LSTM", 4, 3, 3, 1).state_dict()
    with published_as(**EXAMPLE_CLASSES):
        obj = [ExampleRNNModel("LSTM", 4, 3, 3, 1), payload(marker)] if payload is EvalCall \
            else {**state, "extra": payload(marker)}
        torch.save(obj, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # cannot turn the safe loader off
    (tmp_path / "vocab.txt").write_text("<eos>\na\nb\nc\n")
    with pytest.raises(CheckpointError, match="refusing to unpickle .*nothing in it was run.*state_dict") as error:
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out", vocab_file=tmp_path / "vocab.txt")
    message = one_line(error)
    assert ("posix.system" if payload is SystemCall else "builtins.") in message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_protocol_4_pickles_are_refused_too(tmp_path, monkeypatch, legacy):
    """Protocol 4 names globals with STACK_GLOBAL, which the opcode scan does not read: the loaders refuse it."""
    marker = tmp_path / "pwned"
    torch.save({"encoder.weight": torch.zeros(2, 2), "x": SystemCall(marker)}, tmp_path / "evil.pt", pickle_protocol=4,
               _use_new_zipfile_serialization=not legacy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refusing to unpickle .*nothing in it was run") as error:
        load_checkpoint(tmp_path / "evil.pt")
    assert "Unsupported operand" in one_line(error) or "posix.system" in one_line(error)
    assert not marker.exists()


def test_the_cli_refuses_a_malicious_pickle_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"encoder.weight": torch.zeros(2, 2), "x": SystemCall(marker)}, tmp_path / "evil.pt")
    (tmp_path / "vocab.txt").write_text("<eos>\na\n")
    status = main(["convert", str(tmp_path / "evil.pt"), "--vocab", str(tmp_path / "vocab.txt"),
                   "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("lm-lstm convert: error: refusing to unpickle") and err.count("\n") == 1
    assert not marker.exists()


class TensorOver:
    """Pickles as a tensor of `size` / `stride` / `offset` over a storage of `elements` floats, as a tampered file
    can: torch.save never writes one that reaches past its storage."""

    def __init__(self, elements: int, size: tuple, stride: tuple, offset: int = 0):
        self.values = torch.arange(float(elements))
        self.geometry = offset, size, stride

    def __reduce__(self):
        storage = torch.storage.TypedStorage(wrap_storage=self.values.untyped_storage(), dtype=torch.float32,
                                             _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, *self.geometry, False, OrderedDict())


@pytest.mark.parametrize("size, stride, offset", [((100000,), (1,), 0), ((2, 2), (3, 1), 0), ((4,), (1,), 1)],
                         ids=["size", "stride", "offset"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_reaching_past_their_storage_are_refused(tmp_path, legacy, size, stride, offset):
    """Torch would grow a resizable storage to fit, with uninitialised memory; the zip format's loader refuses."""
    torch.save({"encoder.weight": TensorOver(4, size, stride, offset)}, tmp_path / "big.pt",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="not a checkpoint lm-lstm can read: a tensor .*reaches past its storage"):
        load_checkpoint(tmp_path / "big.pt")
    torch.save({"w": TensorOver(4, (2,), (2,), 1)}, tmp_path / "view.pt", _use_new_zipfile_serialization=not legacy)
    view = load_torch_file(tmp_path / "view.pt")["w"]  # within its storage: elements 1 and 3
    assert view.tolist() == [1.0, 3.0] and not view.untyped_storage().resizable()


class PopenCall:
    def __reduce__(self):
        return subprocess.Popen, (["true"],)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refusals_name_globals_as_python_does(tmp_path, legacy):
    """Protocol 2 pickles `subprocess.Popen` as `commands Popen`, its Python 2 name."""
    torch.save({"x": PopenCall()}, tmp_path / "popen.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="it names subprocess.Popen, which") as error:
        load_checkpoint(tmp_path / "popen.pt")
    assert "commands" not in one_line(error)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_refused_vocabulary_pickle_says_what_a_vocabulary_is(tmp_path, legacy):
    marker = tmp_path / "pwned"
    torch.save({"<eos>": 0, "x": SystemCall(marker)}, tmp_path / "vocab.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="refusing to unpickle .*nothing in it was run. A vocabulary file must be "
                                              "a word list .* or the source's corpus cache") as error:
        read_vocabulary(tmp_path / "vocab.pt")
    assert "state_dict" not in one_line(error) and not marker.exists()


def legacy_file(path: Path, obj_pickle: bytes) -> Path:
    """A legacy-format file with a valid header and `obj_pickle` as its object."""
    with path.open("wb") as stream:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, stream, protocol=2)
        stream.write(obj_pickle)
        pickle.dump([], stream, protocol=2)
    return path


def zip_file_with(path: Path, data_pkl: bytes) -> Path:
    """A zip-format file whose data.pkl is `data_pkl`."""
    torch.save({}, tmp := path.with_suffix(".tmp"))
    with zipfile.ZipFile(tmp) as source, zipfile.ZipFile(path, "w") as archive:
        for item in source.infolist():
            archive.writestr(item, data_pkl if item.filename.endswith("/data.pkl") else source.read(item))
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hand_made_pickles_are_one_clear_line(tmp_path, legacy):
    make = legacy_file if legacy else zip_file_with
    for pickled in (b"\x80\x02.", b"\x80\x02K\x01a."):  # STOP, APPEND to no list: each pops an empty stack
        with pytest.raises(CheckpointError, match=r"not a checkpoint lm-lstm can read: its pickle is malformed"):
            load_checkpoint(make(tmp_path / "hand.pt", pickled))


class Looped(nn.Module):
    """A model whose modules contain themselves (pickled as `model.RNNModel`)."""

    def __init__(self, depth: int = 0):
        super().__init__()
        self.encoder = nn.Embedding(3, 2)
        if depth:
            self.inner = Looped(depth - 1)
        else:
            self._modules["loop"] = self


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_modules_that_contain_themselves_are_one_line_errors(tmp_path, monkeypatch, legacy):
    with published_as(model={"RNNModel": Looped}):
        torch.save(Looped(), tmp_path / "loop.pt", _use_new_zipfile_serialization=not legacy)
        torch.save(Looped(4), tmp_path / "deep.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="not a checkpoint lm-lstm can read: its module `loop` contains itself"):
        load_checkpoint(tmp_path / "loop.pt")
    with pytest.raises(CheckpointError, match="inner.inner.inner.inner.loop` contains itself"):
        load_checkpoint(tmp_path / "deep.pt")
    monkeypatch.setattr(lm_lstm.convert, "MAX_MODULE_DEPTH", 3)
    with pytest.raises(CheckpointError, match="its modules are nested over 3 deep"):
        load_checkpoint(tmp_path / "deep.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def example_state_dict(tied: bool = False, layers: int = 2) -> dict:
    return build_source(PYTORCH_EXAMPLE, 11, layers, tied).state_dict()


def awd_state_dict() -> dict:
    return build_source(AWD_LSTM, 11, 2, True, wdrop=0.5).state_dict()


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


MISMATCHES = {
    "missing key": (lambda: without(example_state_dict(), "rnn.bias_hh_l1"), "lacks `rnn.bias_hh_l1`"),
    "missing raw weight": (lambda: without(awd_state_dict(), "rnns.1.module.weight_hh_l0_raw"),
                           "lacks `rnns.1.module.weight_hh_l0_raw`"),
    "wrong shape": (lambda: {**example_state_dict(), "rnn.weight_ih_l1": torch.zeros(28, 5)},
                    r"`rnn.weight_ih_l1` has shape \(28, 5\), expected \(28, 7\)"),
    "decoder rows": (lambda: {**example_state_dict(), "decoder.bias": torch.zeros(12)},
                     r"`decoder.bias` has shape \(12,\), expected \(11,\)"),
    "vocabulary size": (lambda: example_state_dict(), "vocabulary of 11 words .* gives 12"),
    "GRU": (lambda: ExampleRNNModel("GRU", 11, 5, 7, 2).state_dict(), "layer 0 is a GRU"),
    "plain RNN": (lambda: ExampleRNNModel("RNN_TANH", 11, 5, 7, 2).state_dict(), "layer 0 is a plain RNN"),
    "AWD-LSTM GRU": (lambda: AWDRNNModel("GRU", 11, 5, 7, 1).state_dict(), "layer 0 is a GRU"),
    "bidirectional": (lambda: {**example_state_dict(), "rnn.weight_ih_l0_reverse": torch.zeros(28, 5)},
                      "unexpected keys rnn.weight_ih_l0_reverse"),
    "unknown format": (lambda: {"embed.weight": torch.zeros(11, 5), "lstm.weight_ih_l0": torch.zeros(4, 5)},
                       "match no supported format: pytorch-example .* or awd-lstm"),
    "transformer": (lambda: {"encoder.weight": torch.zeros(11, 5), "pos_encoder.pe": torch.zeros(1)},
                    "TransformerModel, not an LSTM"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatched_checkpoints_are_one_line_errors(tmp_path, case):
    make, message = MISMATCHES[case]
    torch.save(make(), tmp_path / "model.pt")
    (tmp_path / "vocab.txt").write_text("\n".join(["<eos>"] + [f"w{i}" for i in range(10 + (case == "vocabulary size"))]))
    with pytest.raises(CheckpointError, match=message) as error:
        convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=tmp_path / "vocab.txt")
    one_line(error)
    assert not (tmp_path / "out").exists()


def test_other_refusals(tmp_path, corpus_dir):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words))
    model = build_source(AWD_LSTM, len(words), 2, True)
    with published_as(**AWD_CLASSES):  # WikiText-103's split softmax
        torch.save([model, SplitCrossEntropyLoss(NINP, splits=[4]), None], tmp_path / "split.pt")
    torch.save(model.state_dict(), tmp_path / "awd.pt")
    (tmp_path / "noeos.txt").write_text("\n".join(w if w != "<eos>" else "<end>" for w in words))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for checkpoint, options, message in [
        ("split.pt", {}, r"split \(adaptive\) softmax, splits \[4\]"),
        ("awd.pt", {"source": PYTORCH_EXAMPLE}, "`source` is 'pytorch-example', but its keys are those of 'awd-lstm'"),
        ("awd.pt", {"vocab_file": tmp_path / "noeos.txt"}, "has no '<eos>'"),
        ("text.pt", {}, "not a PyTorch checkpoint"),
    ]:
        options = {"vocab_file": vocab, **options}
        with pytest.raises(CheckpointError, match=message) as error:
            convert_checkpoint(tmp_path / checkpoint, tmp_path / "out", **options)
        one_line(error)
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out", vocab_file=vocab)


def eleven_word_vocabulary(tmp_path: Path) -> Path:
    (tmp_path / "vocab.txt").write_text("\n".join(["<eos>"] + [f"w{i}" for i in range(10)]))
    return tmp_path / "vocab.txt"


@pytest.mark.parametrize("key, value", [("encoder.weight", float("nan")), ("rnn.weight_hh_l1", float("inf")),
                                        ("decoder.bias", -float("inf"))])
def test_weights_that_are_not_finite_are_refused_before_writing(tmp_path, key, value):
    state = example_state_dict()
    state[key].view(-1)[3] = value
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=rf"^the checkpoint's `{key}` holds NaN or infinite values") as error:
        convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=eleven_word_vocabulary(tmp_path))
    one_line(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "vocab.txt"]


def test_float64_weights_beyond_float32_and_overflowing_logits_are_refused(tmp_path):
    state = {key: tensor.double() for key, tensor in example_state_dict(layers=1).items()}
    state["encoder.weight"][0, 0] = 1e300
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"`encoder.weight` holds values beyond float32's range \(largest 1e"):
        convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=eleven_word_vocabulary(tmp_path))
    state = {key: torch.zeros_like(tensor) for key, tensor in example_state_dict(layers=1).items()}
    state["rnn.bias_ih_l0"].fill_(100.0)  # every gate open: each hidden unit is tanh(1)
    state["decoder.weight"].fill_(3e38)
    state["decoder.bias"].fill_(3e38)  # finite weights, logits past float32's largest value
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="the source model's own logits overflow float32") as error:
        convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=eleven_word_vocabulary(tmp_path))
    one_line(error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_only_floating_point_weights_convert(tmp_path, dtype):
    state = example_state_dict(layers=1)
    state["rnn.weight_ih_l0"] = (state["rnn.weight_ih_l0"] * 4).to(dtype)
    torch.save(state, tmp_path / "model.pt")
    vocab = eleven_word_vocabulary(tmp_path)
    if dtype.is_floating_point:
        result = convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=vocab)
        assert result.max_logit_difference <= 1e-5
        return
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"^the checkpoint's `rnn.weight_ih_l0` is {name}, not floating point; "
                                              "only float16, bfloat16, float32 or float64 weights convert") as error:
        convert_checkpoint(tmp_path / "model.pt", tmp_path / "out", vocab_file=vocab)
    one_line(error)
    assert not (tmp_path / "out").exists()


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, corpus_dir, monkeypatch):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    checkpoint = save_checkpoint(build_source(PYTORCH_EXAMPLE, len(words), 1, True), PYTORCH_EXAMPLE,
                                 tmp_path / "model.pt", "state_dict")
    inputs = {"train_files": corpus_files(corpus_dir)}
    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(lm_lstm.convert, "CHECK_TOLERANCE", -1.0)  # the check after saving fails
    with pytest.raises(RuntimeError, match="logits differ"):
        convert_checkpoint(checkpoint, tmp_path / "new" / "deeper" / "out", **inputs)
    assert sorted(tmp_path.iterdir()) == before  # no folder, partial or parent left
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="logits differ"):
        convert_checkpoint(checkpoint, tmp_path / "empty", **inputs)
    assert list((tmp_path / "empty").iterdir()) == []
    assert sorted(tmp_path.iterdir()) == sorted([*before, tmp_path / "empty"])
    monkeypatch.undo()
    convert_checkpoint(checkpoint, tmp_path / "empty", **inputs)  # a rerun does not find a half-written folder
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    (tmp_path / "empty" / "config.json").write_text("{}")
    convert_checkpoint(checkpoint, tmp_path / "empty", overwrite=True, **inputs)
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"  # overwriting replaces the converted files only
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "empty").config.vocab_size == len(words)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []

    def no_writing_beside(parent, prefix):  # a folder that can be written in a parent that cannot (a mount point)
        if Path(parent) == tmp_path:
            raise PermissionError(13, "Permission denied", str(parent))
        return make_folder(parent, prefix)

    make_folder = lm_lstm.output_dir._new_folder
    monkeypatch.setattr(lm_lstm.output_dir, "_new_folder", no_writing_beside)
    convert_checkpoint(checkpoint, tmp_path / "empty", overwrite=True, **inputs)
    assert not [p for p in (tmp_path / "empty").iterdir() if p.name.endswith(".partial")]
    with pytest.raises(PermissionError):
        convert_checkpoint(checkpoint, tmp_path / "other", **inputs)


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_a_converted_folder_and_its_weights_get_the_umasks_permissions(tmp_path, corpus_dir):
    """Not mkdtemp's 0700 for the folder, nor safetensors' 0600 for the weights (safetensors/safetensors#782)."""
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    checkpoint = save_checkpoint(build_source(PYTORCH_EXAMPLE, len(words), 1, True), PYTORCH_EXAMPLE,
                                 tmp_path / "model.pt", "state_dict")
    previous = os.umask(0o027)
    try:
        convert_checkpoint(checkpoint, tmp_path / "out", train_files=corpus_files(corpus_dir))
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [tmp_path / "out", *(tmp_path / "out").iterdir()]}
    assert modes.pop("out") == 0o750 and modes["model.safetensors"] == modes["config.json"] == 0o640
    assert set(modes.values()) == {0o640}
    shared = tmp_path / "shared"  # a group's folder: new folders in it take its group, as mkdir makes them
    shared.mkdir()
    shared.chmod(0o2775)
    convert_checkpoint(checkpoint, shared / "out", train_files=corpus_files(corpus_dir))
    assert (shared / "out").stat().st_mode & stat.S_ISGID


def test_cli_convert(tmp_path, corpus_dir, capsys):
    words = Corpus(str(corpus_dir)).dictionary.idx2word
    checkpoint = save_checkpoint(build_source(PYTORCH_EXAMPLE, len(words), 2, True), PYTORCH_EXAMPLE,
                                 tmp_path / "model.pt", "whole")
    argv = ["convert", str(checkpoint), "--train_file", *map(str, corpus_files(corpus_dir)),
            "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PyTorch word_language_model example, whole pickled model" in out and "without running code" in out
    assert "\nModel: 2 LSTM layers (" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(argv) == 2  # the folder is not empty now
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite_output_dir", "--source", "pytorch-example"]) == 0
    capsys.readouterr()
    assert main(argv + ["--vocab", "v.txt"]) == 2  # either the vocabulary or the training text
    assert "not allowed with argument" in capsys.readouterr().err


def test_lower_modules_do_not_import_convert():
    """`import lm_lstm` must not load the converter: only the CLI imports it (inside its command)."""
    package = Path(__import__("lm_lstm").__file__).parent
    for path in package.rglob("*.py"):
        if path.name in ("convert.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "convert" not in (node.module or "") and all(a.name != "convert" for a in node.names), path
            elif isinstance(node, ast.Import):
                assert all("convert" not in a.name for a in node.names), path


def test_pickle_protocol_is_torchs_default():
    """The legacy reader and the opcode scan assume torch.save's pickle protocol 2 (GLOBAL opcodes)."""
    assert torch.serialization.DEFAULT_PROTOCOL == 2
    assert pickle.PROTO == b"\x80"
