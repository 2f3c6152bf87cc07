"""Perplexity and bits per byte of a model on text.

Two context policies over a file:
- `carry` (the default): the whole file is one token stream, preceded by EOS (a document start, as in training);
  it is fed in chunks of `block_size` with the recurrent state carried from chunk to chunk, so every token is
  predicted with its full left context, and every token of the file is predicted exactly once: the EOS between
  documents too, but not the EOS that would end the last one, unless it is a line end (a word-level tokenizer's
  `<eos>` ends every line, the last one included, and counts as a word).
- `blocks`: the file is cut into independent blocks exactly as training data is (`lm_lstm.data`), each starting
  from a zero state; this reproduces `Trainer`'s `eval_loss` on those blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerBase

from .messages import first_line
from .tokenization import document_start_id, eos_ends_lines, load_tokenizer, tokenizer_kind

CONTEXT_POLICIES = ("carry", "blocks")


def bits_per_byte(nll: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte of text whose tokens have a summed negative log-likelihood of `nll` nats: a measure that
    does not depend on the tokenizer."""
    return nll / math.log(2) / num_bytes


def perplexity(loss: float) -> float:
    """exp of a mean NLL per token (nats); capped so that a diverged loss gives a huge number, not an overflow."""
    return math.exp(min(loss, 700.0))


@dataclass
class Score:
    """Summed negative log-likelihood (nats) of `tokens` predicted tokens spanning `bytes` bytes of text;
    `left_out` tokens of the text were not in any block (the 'blocks' context cuts as training does)."""

    nll: float
    tokens: int
    bytes: int
    left_out: int = 0

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats), as `eval_loss` reports it."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.bytes)


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Loads a saved model in evaluation mode and its tokenizer as `load_tokenizer` does.

    Raises `OSError` when `name_or_path` is a path (it cannot be a Hub name) to no folder, names neither a folder nor
    a model the Hub gives, or its weights cannot be read (a truncated `model.safetensors`), and `ValueError` when its tokenizer cannot be loaded.
    """
    looks_like_path = str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise OSError(f"{name_or_path}: no such model folder.")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError as error:
        raise OSError(f"{name_or_path}: its weights cannot be read ({error}).") from error
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            raise
        raise OSError(f"{name_or_path}: no such folder here, and not loadable as a Hub name ({first_line(error)})"
                      ) from error
    try:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise ValueError(f"{name_or_path}: its tokenizer cannot be loaded ({first_line(error)}).") from error
    return model.eval(), tokenizer


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood; targets of -100 give 0."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def window_nlls(model, windows: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The negative log-likelihood (nats) of the tokens of each window (1-D token ids) after its first, the state
    carried from window to window: a window starts with the last token of the one before, so this scores a stream
    fed window by window, holding one window at a time. Each is float32 on the CPU, of the window's length less one."""
    cache = DynamicCache(config=model.config)
    for window in windows:
        ids = window.to(model.device)[None]
        logits = model(ids[:, :-1], cache=cache, use_cache=True).logits
        yield _token_nll(logits, ids[:, 1:])[0].float().cpu()


def stream_windows(token_ids: torch.Tensor, block_size: int) -> Iterator[torch.Tensor]:
    """`token_ids` in windows of `block_size + 1` tokens overlapping by one (see `window_nlls`)."""
    return (token_ids[start : start + block_size + 1] for start in range(0, len(token_ids) - 1, block_size))


def token_nlls(model, token_ids: list[int], block_size: int = 512) -> torch.Tensor:
    """Negative log-likelihood (nats) of each of `token_ids[1:]`, predicted from everything before it: the sequence
    is fed in chunks of `block_size` tokens with the state carried across them. Shape `(len(token_ids) - 1,)`,
    float32, on the CPU. Raises `ValueError` for `block_size` < 1."""
    if block_size < 1:
        raise ValueError(f"`block_size` must be at least 1, got {block_size}.")
    nlls = list(window_nlls(model, stream_windows(torch.tensor(token_ids), block_size)))
    return torch.cat(nlls) if nlls else torch.zeros(0)


def score_windows(model, windows: Iterable[torch.Tensor]) -> tuple[float, int]:
    """The summed NLL (nats) of the tokens `window_nlls` scores, and their number."""
    total, count = 0.0, 0
    for nlls in window_nlls(model, windows):
        total += float(nlls.double().sum())
        count += len(nlls)
    return total, count


def score_stream(model, token_ids: list[int], block_size: int) -> tuple[float, int]:
    """Sums the NLL of `token_ids[1:]`, each predicted from everything before it (state carried across chunks)."""
    return score_windows(model, stream_windows(torch.tensor(token_ids), block_size))


def file_windows(
    tokenizer: PreTrainedTokenizerBase, pieces, block_size: int, progress: bool = False,
    max_positions: int | None = None,
) -> Iterator[torch.Tensor]:
    """The token stream the `carry` policy scores from the pieces of a file's documents (`tokenize_documents`), in
    windows of `block_size + 1` tokens that overlap by one (see `score_windows`), read from the memory-mapped pieces
    a window at a time: the document-start token, then every token, less a last EOS that only separates documents
    (see the module docstring). With `progress`, a tqdm bar counts the windows.

    Raises `ValueError` if the stream is longer than `max_positions`, the most a model with position embeddings
    sees."""
    from .data import TokenDocuments

    ids = TokenDocuments.from_pieces(pieces).ids
    end = len(ids) - (not eos_ends_lines(tokenizer))  # the stream's last position; position p > 0 holds ids[p - 1]
    if max_positions is not None and end > max_positions:
        raise ValueError(f"the 'carry' context feeds the model the whole file, {end} tokens, and it sees at most "
                         f"{max_positions} positions: use --context blocks with --block_size at most {max_positions}.")
    for start in tqdm(range(0, end, block_size), desc="Scoring", unit="window", disable=not progress):
        window = torch.from_numpy(ids.read(max(start - 1, 0), min(start + block_size, end)))
        yield torch.cat([torch.tensor([document_start_id(tokenizer)]), window]) if start == 0 else window


UNIT_NOTES = {
    "word": "each line end, <eos>, counts as a word",
    "character": "a character the tokenizer never saw counts once per UTF-8 byte",
}
"""What the units of `perplexity_unit` other than "token" count, in words: how its tokens differ from the unit."""


def perplexity_unit(tokenizer: PreTrainedTokenizerBase) -> str:
    """What a perplexity of this tokenizer's model is per: "word" for a word-level tokenizer (each `<eos>` line end
    counts as a word, as in the PTB convention), "character" for a character-level one (a character outside its
    vocabulary is one token per UTF-8 byte: `UNIT_NOTES`), else "token"."""
    return {"word-level": "word", "character-level": "character"}.get(tokenizer_kind(tokenizer), "token")


def describe_unit(unit: str) -> str:
    """`unit` with what it counts in brackets, where it is not plainly the tokens (`UNIT_NOTES`): "character (a
    character the tokenizer never saw counts once per UTF-8 byte)"."""
    return f"{unit} ({UNIT_NOTES[unit]})" if unit in UNIT_NOTES else unit


@torch.no_grad()
def score_blocks(model, batches: Iterable[list[list[int]]]) -> tuple[float, int]:
    """Sums the NLL of every block's tokens after the first, each block on its own from a zero state, a batch of
    blocks at a time."""
    total, count = 0.0, 0
    for blocks in batches:
        batch = torch.tensor(blocks, device=model.device)
        logits = model(batch[:, :-1], use_cache=False).logits
        total += float(_token_nll(logits, batch[:, 1:]).sum())
        count += batch[:, 1:].numel()
    return total, count


def evaluate_file(
    model,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    block_size: int = 512,
    context: Literal["carry", "blocks"] = "carry",
    batch_size: int = 16,
    text_column: str = "text",
    progress: bool = False,
) -> Score:
    """Scores a text file (see the module docstring for the context policies); `text_column` names the text of
    .json/.jsonl/.csv/.parquet records. The file is read, tokenised (into the `datasets` cache) and scored a bounded
    piece at a time, so memory does not grow with its size. With `progress`, a tqdm bar shows the scoring.

    Raises `ValueError` for a model with position embeddings (`config.max_position_embeddings`, a GPT-2 say) given
    blocks longer than its positions, or the 'carry' context on a file longer than them."""
    if context not in CONTEXT_POLICIES:
        raise ValueError(f"`context` must be one of {CONTEXT_POLICIES}, got {context!r}.")
    # Imported here: `datasets` is slow to import, and loading a model for `lm-lstm generate` does not need it.
    import pyarrow.compute as pc

    from .data import group_blocks, load_pieces, tokenize_documents

    max_positions = getattr(model.config, "max_position_embeddings", None)  # None for lm-lstm: no position limit
    if context == "blocks" and max_positions is not None and block_size > max_positions:
        raise ValueError(f"--block_size {block_size} is longer than the {max_positions} positions the model sees.")
    texts = load_pieces([str(path)], text_column)
    pieces = tokenize_documents(texts, tokenizer)
    if context == "carry":
        nll, count = score_windows(model, file_windows(tokenizer, pieces, block_size, progress, max_positions))
        num_bytes = pc.sum(pc.binary_length(texts.with_format("arrow")["text"])).as_py()
        return Score(nll=nll, tokens=count, bytes=num_bytes)
    blocks = group_blocks(pieces, block_size)
    if len(blocks) == 0:
        raise ValueError(f"{path}: shorter than one block of {block_size} tokens; use a smaller --block_size.")
    batches = tqdm(blocks.iter(batch_size=batch_size), total=math.ceil(len(blocks) / batch_size), desc="Scoring",
                   unit="batch", disable=not progress)
    nll, count = score_blocks(model, (batch["input_ids"] for batch in batches))
    total = pc.sum(pc.list_value_length(pieces.with_format("arrow")["input_ids"])).as_py()
    return Score(nll=nll, tokens=count, bytes=max(1, pc.sum(blocks.with_format("arrow")["scored_bytes"]).as_py()),
                 left_out=total - len(blocks) * block_size)


@torch.no_grad()
def text_perplexities(
    model,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 16,
    add_start_token: bool = True,
    max_length: int | None = None,
) -> list[float]:
    """Perplexity of each text on its own (as the Hub's `perplexity` metric computes it), batched with padding.

    With `add_start_token`, the document-start token (`document_start_id`: what the model was trained to start
    documents from, the BOS of lm-lstm tokenizers) is prepended so that the first token is predicted too; it counts
    towards `max_length`, which truncates each text's tokens (only when given). Raises `ValueError` for a text of
    fewer than two tokens (start token included) and, with `add_start_token`, a tokenizer without EOS.
    """
    start = [document_start_id(tokenizer)] if add_start_token else []
    encoded = [start + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if max_length is not None:
        encoded = [ids[:max_length] for ids in encoded]
    for text, ids in zip(texts, encoded):
        if len(ids) < 2:
            raise ValueError(
                f"Each text needs at least two tokens to score (one with add_start_token=True); got {text!r}."
            )
    perplexities = []
    for begin in range(0, len(encoded), batch_size):
        batch = encoded[begin : begin + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = _token_nll(logits[:, :-1], targets).sum(1) / mask[:, 1:].sum(1)
        perplexities.extend(torch.exp(nll).tolist())
    return perplexities
