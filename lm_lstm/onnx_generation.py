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
    """The two graphs of an exported folder in onnxruntime sessions. Raises `OSError` for a folder without
    `onnx_config.json` or its graphs."""

    def __init__(self, folder: str | Path, session_options: onnxruntime.SessionOptions | None = None):
        folder = Path(folder)
        if not (folder / ONNX_CONFIG_NAME).is_file():
            raise OSError(f"{folder}: no {ONNX_CONFIG_NAME}; export a model with `lm-lstm export` first.")
        self.config = json.loads((folder / ONNX_CONFIG_NAME).read_text(encoding="utf-8"))
        if session_options is None:
            session_options = onnxruntime.SessionOptions()
            session_options.log_severity_level = 3  # the exporter leaves unused constants that onnxruntime reports
        self.sessions = {
            graph: onnxruntime.InferenceSession(str(folder / spec["file"]), session_options,
                                                providers=["CPUExecutionProvider"])
            for graph, spec in self.config["graphs"].items()
        }

    def initial_states(self, batch_size: int) -> list[np.ndarray]:
        """Zero states for `batch_size` rows, `(batch, size)` float32 each, in the graphs' order."""
        return [np.zeros((batch_size, size), np.float32) for size in self.config["state_sizes"]]

    def run(self, graph: str, states: list[np.ndarray], **inputs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runs "prefill" or "decode" on int64 `input_ids` (and `attention_mask`) from `states`; returns the
        `(batch, vocab)` logits of the last real position and the new states."""
        spec = self.config["graphs"][graph]
        feed = {name: inputs[name].astype(np.int64) for name in spec["inputs"] if name in inputs}
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
        """`(batch, prompt + new)` token ids: the prompt (left-padded where `attention_mask` has zeros), then up to
        `max_new_tokens` new tokens. Generation ends when every row has produced the end-of-sequence token; rows that
        ended continue with the padding token."""
        input_ids = np.asarray(input_ids, np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        rng = np.random.default_rng(seed)
        eos = self.config["eos_token_id"]
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.config["pad_token_id"]
        logits, states = self.run("prefill", self.initial_states(len(input_ids)), input_ids=input_ids,
                                  attention_mask=np.asarray(attention_mask))
        unfinished = np.ones(len(input_ids), bool)
        new_tokens = np.zeros((len(input_ids), max_new_tokens), np.int64)
        for step in range(max_new_tokens):
            tokens = sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
            if pad is not None:
                tokens = np.where(unfinished, tokens, pad)
            new_tokens[:, step] = tokens
            unfinished &= ~np.isin(tokens, list(eos))
            if not unfinished.any():
                new_tokens = new_tokens[:, : step + 1]
                break
            logits, states = self.run("decode", states, input_ids=tokens[:, None])
        return np.concatenate([input_ids, new_tokens], 1)

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
