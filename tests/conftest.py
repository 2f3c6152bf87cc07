"""Shared fixtures: tiny models and tokenizers built locally; nothing is ever downloaded."""

import functools
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lm_lstm import LSTMConfig, LSTMForCausalLM, modeling_lstm  # noqa: E402
from lm_lstm.data import DEFAULT_CORPUS  # noqa: E402
from lm_lstm.tokenization import train_char_tokenizer  # noqa: E402

NO_DROPOUT = dict(embedding_dropout=0.0, input_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0, weight_dropout=0.0)


def tiny_config(**overrides) -> LSTMConfig:
    """A two-layer model small enough for any test: untied, distinct sizes at every level."""
    arguments = dict(
        vocab_size=40, embedding_size=6, hidden_size=10, num_hidden_layers=2, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **NO_DROPOUT,
    )
    arguments.update(overrides)
    return LSTMConfig(**arguments)


def tiny_model(seed: int = 0, **overrides) -> LSTMForCausalLM:
    torch.manual_seed(seed)
    return LSTMForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, vocab_size: int = 40, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


def left_padded_prompts(
    lengths: tuple[int, ...] = (3, 7, 5),
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prompts of `lengths` tokens, and them left-padded into one batch: (prompts, ids, attention mask)."""
    prompts = [random_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.stack([torch.nn.functional.pad(p, (width - len(p), 0), value=0) for p in prompts])
    mask = torch.stack([torch.nn.functional.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    return prompts, ids, mask


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return DEFAULT_CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def char_tokenizer(shakespeare_text):
    return train_char_tokenizer([shakespeare_text])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text) -> Path:
    """A training file of the first 20,000 characters of Tiny Shakespeare (modules may define their own)."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(shakespeare_text[:20_000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def forced_step_kernel(monkeypatch):
    """One-token steps take `step_matmul` whatever this machine would measure: the same arithmetic on every machine."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "step_matmul")


def measuring_step_kernels(monkeypatch, trials: int) -> None:
    """One-token steps measure their kernels afresh (`STEP_KERNEL` None), `trials` timed calls of each."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", None)
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL_TRIALS", trials)
    for name in ("_step_kernel_ranking", "_step_kernel_seconds", "_step_kernel_saving", "_transposed_copy_seconds"):
        monkeypatch.setattr(modeling_lstm, name, {})


def step_weights(model: LSTMForCausalLM) -> list[torch.Tensor]:
    """The weights a one-token step multiplies by: the output layer's, then each layer's input and recurrent ones."""
    return [model.lm_head.weight] + [w for layer in model.model.layers for w in layer.rnn.all_weights[0][:2]]


def transposed_copies_ranked_first(monkeypatch, weights: list[torch.Tensor], saving: float, cost: float) -> None:
    """As if `step_kernel` had ranked the transposed copy first for one-row steps on `weights`, then `step_matmul`,
    saving `saving` seconds a call against `F.linear`, and a copy of each had taken `cost` seconds to make."""
    measuring_step_kernels(monkeypatch, trials=1)
    for weight in weights:
        modeling_lstm._step_kernel_ranking[(1, *weight.shape)] = ("transposed_matmul", "step_matmul", "linear")
        modeling_lstm._step_kernel_saving[(1, *weight.shape)] = saving
        modeling_lstm._transposed_copy_seconds[tuple(weight.shape)] = cost


@functools.cache
def import_noise_lines() -> int:
    """How many lines importing the package prints to stderr here before any command runs: torchao's warnings, where
    it is installed and its compiled kernels do not match this Python and torch (transformers imports it); else 0."""
    result = subprocess.run([sys.executable, "-c", "import lm_lstm.cli"], capture_output=True, text=True)
    return len(result.stderr.strip().splitlines())


def command_stderr_lines(stderr: str) -> list[str]:
    """A command's own stderr lines: what follows the lines its imports printed (`import_noise_lines`)."""
    return stderr.strip().splitlines()[import_noise_lines():]
