"""Generation from an exported ONNX folder (`lm-lstm export`) with onnxruntime and numpy only: no torch, no transformers.
This file imports nothing else, so that it can be copied beside the folder to a machine without them.

The prompt goes through the prefill graph once; each new token through the one-token decode graph, carrying the
state (h and c of each layer), so memory stays flat however many tokens are generated. Greedy decoding gives the
tokens `model.generate()` gives, padding and end-of-sequence handling included; sampling applies temperature, top-k
and top-p in `generate`'s order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime

ONNX_CONFIG_NAME = "onnx_config.json"


class OnnxLM:
    """The two graphs of an exported folder in onnxruntime sessions. Raises `OSError` for a folder without a readable
    `onnx_config.json` or without its graphs."""

    def __init__(self, folder: str | Path, session_options: onnxruntime.SessionOptions | None = None):
        folder = Path(folder)
        config_file = folder / ONNX_CONFIG_NAME
        if not config_file.is_file():
            raise OSError(f"{folder}: no {ONNX_CONFIG_NAME}; export a model with `lm-lstm export` first.")
        try:
            self.config = json.loads(config_file.read_text(encoding="utf-8"))
            missing = {"graphs", "state_sizes", "vocab_size"} - set(self.config)
            if missing:
                raise KeyError(", ".join(sorted(missing)))
            graph_files = {graph: folder / spec["file"] for graph, spec in self.config["graphs"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise OSError(f"{config_file} is not an lm-lstm ONNX description ({type(error).__name__}: {error}).")
        if set(graph_files) != {"prefill", "decode"} or not all(path.is_file() for path in graph_files.values()):
            raise OSError(f"{folder}: the graphs {ONNX_CONFIG_NAME} names are not all there; export the model again.")
        if session_options is None:
            session_options = onnxruntime.SessionOptions()
            session_options.log_severity_level = 3  # the exporter leaves unused constants that onnxruntime reports
        self.sessions = {
            graph: onnxruntime.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
            for graph, path in graph_files.items()
        }

    def initial_states(self, batch_size: int) -> list[np.ndarray]:
        """Zero states for `batch_size` rows, `(batch, size)` float32 each, in the graphs' order."""
        return [np.zeros((batch_size, size), np.float32) for size in self.config["state_sizes"]]

    def start_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """The states a prompt is read from, as `model.generate()` starts: after the document-start token
        (`document_start_id`) for the rows whose first real token is not that token, zeros for the others."""
        states = self.initial_states(len(input_ids))
        start = self.config.get("document_start_id")
        if start is None:
            return states
        rows = input_ids[np.arange(len(input_ids)), attention_mask.argmax(axis=1)] != start
        if not rows.any():
            return states
        _, started = self.run("decode", states, input_ids=np.full((len(input_ids), 1), start))
        return [np.where(rows[:, None], after, zero) for after, zero in zip(started, states)]

    def run(self, graph: str, states: list[np.ndarray], **inputs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runs "prefill" or "decode" on int64 `input_ids` (and `attention_mask`: all ones if not given) from
        `states`; returns the `(batch, vocab)` logits of the last real position and the new states. The values are
        not checked here (`generate` checks them)."""
        spec = self.config["graphs"][graph]
        if "attention_mask" in spec["inputs"] and "attention_mask" not in inputs:
            inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
        feed = {name: np.asarray(inputs[name]).astype(np.int64) for name in spec["inputs"] if name in inputs}
        feed.update(zip(spec["inputs"][len(feed):], states))
        logits, *new_states = self.sessions[graph].run(None, feed)
        return logits, new_states

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> np.ndarray:
        """`(batch, prompt + new)` token ids: the `(batch, prompt)` integer prompt, left-padded where the 0/1
        `attention_mask` has zeros, then up to `max_new_tokens` new tokens, greedy, or drawn with `do_sample` (after
        `temperature`, `top_k` (0: all) and `top_p`). Generation ends when every row has produced the end-of-sequence
        token; rows that ended continue with the padding token. Raises `ValueError` for bad inputs or options."""
        input_ids, attention_mask = self._checked_prompt(input_ids, attention_mask)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be an integer >= 0, got {max_new_tokens!r}.")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
            raise ValueError(
                f"Sampling needs `temperature` > 0, 0 < `top_p` <= 1 and `top_k` >= 0; got {temperature}, {top_p}, "
                f"{top_k}."
            )
        rng = np.random.default_rng(seed)
        eos = self.config.get("eos_token_id")
        eos = list(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.config.get("pad_token_id")
        logits, states = self.run("prefill", self.start_states(input_ids, attention_mask), input_ids=input_ids,
                                  attention_mask=attention_mask)
        unfinished = np.ones(len(input_ids), bool)
        new_tokens = np.zeros((len(input_ids), min(max_new_tokens, 1024)), np.int64)  # doubled as needed
        for step in range(max_new_tokens):
            tokens = sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
            if pad is not None:
                tokens = np.where(unfinished, tokens, pad)
            if step == new_tokens.shape[1]:
                new_tokens = np.concatenate([new_tokens, np.zeros_like(new_tokens)], 1)
            new_tokens[:, step] = tokens
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any():
                max_new_tokens = step + 1
                break
            logits, states = self.run("decode", states, input_ids=tokens[:, None])
        return np.concatenate([input_ids, new_tokens[:, :max_new_tokens]], 1)

    def _checked_prompt(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """The prompt and its mask as int64 arrays, after the checks `model.generate()` makes: a non-empty
        `(batch, length)` array of integer ids in `[0, vocab_size)`, and a mask of 0 and 1 of the same shape with
        padding on the left only."""
        ids = np.asarray(input_ids)
        vocab_size = self.config["vocab_size"]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"`input_ids` must be integers of shape (batch, length >= 1), got {ids.dtype} {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"`input_ids` must be in [0, {vocab_size}), got values from {ids.min()} to {ids.max()}.")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"`attention_mask` must hold 0 and 1 in the shape of `input_ids` {ids.shape}.")
        if (np.diff(mask.astype(np.int64), axis=1) < 0).any():
            raise ValueError("`attention_mask` has padding after a real token; pad prompts on the left only.")
        return ids.astype(np.int64), mask.astype(np.int64)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row of `(batch, vocab)` logits: scaled by `1 / temperature`, kept to the `top_k` most likely
    (0: all) and to the smallest set whose probability reaches `top_p`, then drawn."""
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, -1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, -1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= top_p  # the most likely token always stays
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])
