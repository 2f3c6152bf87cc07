"""ONNX decoding: onnxruntime generation (`lm_lstm.onnx_generation`) against `generate()` and a plain PyTorch loop.

Two sizes: the default recipe's model (65 characters, embedding 128, 2 x 512, untied: 3.5M parameters) and config B
(33,278 words, 650/650 x 2, tied). For each size and batch (1, 8), greedy generation of the same new tokens by
- `model.generate()`;
- the plain stepping loop of benchmarks/generation.py (nn.Embedding -> nn.LSTM -> nn.Linear, same weights);
- onnxruntime on the graphs of `lm-lstm export`, float32 and `--int8` (dynamic quantisation),
alternating in rounds in one process; each figure is the median of the rounds. Every variant must produce the
tokens `generate()` produces (int8 excepted). Then onnxruntime's peak resident memory after 256 and after 4,096 new
tokens, in a fresh process (the default size, batch 1).

    python benchmarks/onnx.py          # about 5 minutes on 2 cores
    python benchmarks/onnx.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import argument_parser, write_results  # noqa: E402
from generation import peak_rss_mb, plain_generate  # noqa: E402

# This file is onnx.py: once the benchmarks' modules are imported, its folder leaves the path, where it would shadow
# the `onnx` package that torch's exporter and onnxruntime import later.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

from lm_lstm import LSTMConfig, LSTMForCausalLM  # noqa: E402
from lm_lstm.export import export_onnx  # noqa: E402
from lm_lstm.onnx_generation import OnnxLM  # noqa: E402

SIZES = {
    "default (3.5M)": dict(vocab_size=65, embedding_size=128, hidden_size=512, num_hidden_layers=2,
                           tie_word_embeddings=False),
    "config B": dict(vocab_size=33278, embedding_size=650, hidden_size=650, num_hidden_layers=2,
                     tie_word_embeddings=True),
}
QUICK_SIZES = {"tiny": dict(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                            tie_word_embeddings=False)}
FULL = {"batches": [1, 8], "new_tokens": 256, "rounds": 5, "memory_lengths": [256, 4096]}
QUICK = {"batches": [2], "new_tokens": 8, "rounds": 1}
PROMPT_LENGTH = 8


def build(sizes: dict) -> LSTMForCausalLM:
    torch.manual_seed(0)
    config = LSTMConfig(**sizes, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = LSTMForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # every run generates all the tokens asked for
    return model


def plain_modules(model: LSTMForCausalLM) -> torch.nn.ModuleList:
    """nn.Embedding -> one multi-layer nn.LSTM -> nn.Linear holding the model's weights."""
    config = model.config
    lstm = torch.nn.LSTM(config.embedding_size, config.hidden_size, config.num_hidden_layers, batch_first=True)
    for index, layer in enumerate(model.model.layers):
        for name, parameter in layer.rnn.named_parameters():
            getattr(lstm, name.replace("_l0", f"_l{index}")).data.copy_(parameter)
    return torch.nn.ModuleList([model.model.embeddings, lstm, model.lm_head]).eval()


def timed(run) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, np.asarray(tokens)


def memory_worker(folder: str, lengths: list[int]) -> None:
    """In a fresh process: onnxruntime's peak resident memory after each length, one JSON line each."""
    onnx_lm = OnnxLM(folder)
    prompt = np.arange(PROMPT_LENGTH)[None] % onnx_lm.config["vocab_size"]
    onnx_lm.generate(prompt, max_new_tokens=4)
    loaded = peak_rss_mb()
    for length in lengths:
        onnx_lm.generate(prompt, max_new_tokens=length)
        print(json.dumps({"new tokens": length, "peak RSS MB": peak_rss_mb(), "growth over load MB":
                          peak_rss_mb() - loaded}), flush=True)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.memory_worker:
        memory_worker(args.memory_worker, FULL["memory_lengths"])
        return
    rows, notes = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for size_name, sizes in (QUICK_SIZES if args.quick else SIZES).items():
            model = build(sizes)
            parameters = sum(p.numel() for p in model.parameters())
            folders = {}
            for weights in ("fp32", "int8"):
                folders[weights] = Path(scratch) / f"{size_name}-{weights}"
                start = time.perf_counter()
                export_onnx(model, folders[weights], int8=weights == "int8")
                notes[f"{size_name}: export {weights} seconds"] = round(time.perf_counter() - start, 1)
            onnx_lms = {weights: OnnxLM(folder) for weights, folder in folders.items()}
            plain = plain_modules(model)
            for batch in plan["batches"]:
                prompt = torch.randint(sizes["vocab_size"], (batch, PROMPT_LENGTH),
                                       generator=torch.Generator().manual_seed(1))
                count = plan["new_tokens"]
                runs = {
                    "generate()": lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                         max_new_tokens=count, do_sample=False)[:, PROMPT_LENGTH:],
                    "plain PyTorch loop": lambda: plain_generate(plain, prompt, count),
                    "onnxruntime fp32": lambda: onnx_lms["fp32"].generate(prompt.numpy(), max_new_tokens=count)[
                        :, PROMPT_LENGTH:],
                    "onnxruntime int8": lambda: onnx_lms["int8"].generate(prompt.numpy(), max_new_tokens=count)[
                        :, PROMPT_LENGTH:],
                }
                seconds = {name: [] for name in runs}
                outputs = {}
                with torch.no_grad():
                    for run in runs.values():
                        run()  # warm-up
                    for _ in range(plan["rounds"]):
                        for name, run in runs.items():
                            elapsed, outputs[name] = timed(run)
                            seconds[name].append(elapsed)
                for name in runs:
                    same = bool(np.array_equal(outputs[name], outputs["generate()"]))
                    if not same and name != "onnxruntime int8":
                        raise AssertionError(f"{size_name}, batch {batch}: {name} generated other tokens")
                    median = statistics.median(seconds[name])
                    rows.append({"size": size_name, "parameters": parameters, "batch": batch, "variant": name,
                                 "tokens/s": batch * count / median,
                                 "vs generate()": statistics.median(seconds["generate()"]) / median,
                                 "same tokens as generate()": same})
                    print(rows[-1], flush=True)
            if size_name == "default (3.5M)":  # (quick mode: tests/test_export.py checks the memory)
                command = [sys.executable, __file__, "--memory_worker", str(folders["fp32"])]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                memory = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
                for entry in memory:
                    notes[f"{size_name}: onnxruntime batch 1, peak RSS after {entry['new tokens']} new tokens (MB)"] \
                        = round(entry["peak RSS MB"], 1)
                first, last = memory[0]["peak RSS MB"], memory[-1]["peak RSS MB"]
                notes[f"{size_name}: peak RSS growth {memory[0]['new tokens']} -> {memory[-1]['new tokens']} tokens"] \
                    = f"{100 * (last / first - 1):.1f}%"
    notes["new tokens per run"] = plan["new_tokens"]
    notes["rounds (median)"] = plan["rounds"]
    columns = ["size", "parameters", "batch", "variant", "tokens/s", "vs generate()", "same tokens as generate()"]
    write_results(args, "onnx", rows, columns, extra=notes)


if __name__ == "__main__":
    main()
