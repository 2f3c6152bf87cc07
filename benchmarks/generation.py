"""Generation: new tokens per second and peak memory, lm-lstm `generate()` against two baselines.

- lm-lstm (config B sizes: 33k vocabulary, 650/650 x 2, tied) through `model.generate()`, greedy;
- a plain PyTorch stepping loop over nn.Embedding -> nn.LSTM -> nn.Linear carrying (h, c), greedy argmax;
- `GPT2LMHeadModel`, randomly initialised to a similar parameter count, with its KV cache, through `generate()`.

Each (model, batch) runs in a fresh process, lengths in increasing order, so that the process's peak resident
memory after each length is the peak of generating that many tokens. lm-lstm's memory must not grow with length.

    python benchmarks/generation.py             # 256, 1024, 4096 new tokens; batch 1 and 8 (about 25 minutes)
    python benchmarks/generation.py --device cuda   # the same on a GPU: results/generation-cuda.*, with GPU memory
    python benchmarks/generation.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, result_name, synchronize, write_results  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lm_lstm import LSTMConfig, LSTMForCausalLM  # noqa: E402

FULL = {"vocab": 33278, "embedding": 650, "hidden": 650, "layers": 2, "lengths": [256, 1024, 4096],
        "batches": [1, 8], "gpt2": {"n_embd": 512, "n_layer": 6, "n_head": 8}}
QUICK = {"vocab": 500, "embedding": 32, "hidden": 32, "layers": 2, "lengths": [8, 16], "batches": [1],
         "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2}}
PROMPT_LENGTH = 8


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(kind: str, sizes: dict):
    torch.manual_seed(0)
    if kind == "lm-lstm":
        config = LSTMConfig(vocab_size=sizes["vocab"], embedding_size=sizes["embedding"], hidden_size=sizes["hidden"],
                            num_hidden_layers=sizes["layers"], tie_word_embeddings=True, eos_token_id=None)
        return LSTMForCausalLM(config).eval()
    if kind == "gpt2":
        config = GPT2Config(vocab_size=sizes["vocab"], n_positions=max(sizes["lengths"]) + PROMPT_LENGTH,
                            eos_token_id=None, bos_token_id=None, **sizes["gpt2"])
        return GPT2LMHeadModel(config).eval()
    embedding = torch.nn.Embedding(sizes["vocab"], sizes["embedding"])
    lstm = torch.nn.LSTM(sizes["embedding"], sizes["hidden"], num_layers=sizes["layers"], batch_first=True)
    output = torch.nn.Linear(sizes["hidden"], sizes["vocab"])
    output.weight = embedding.weight
    return torch.nn.ModuleList([embedding, lstm, output]).eval()


@torch.no_grad()
def plain_generate(modules, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    embedding, lstm, output = modules
    hidden, state = lstm(embedding(prompt))
    token = output(hidden[:, -1]).argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(new_tokens - 1):
        hidden, state = lstm(embedding(token), state)
        token = output(hidden[:, -1]).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, 1)


def peak_gpu_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


def worker(kind: str, batch: int, quick: bool, device: torch.device) -> None:
    """Runs in a child process: prints one JSON line per length."""
    sizes = QUICK if quick else FULL
    model = build(kind, sizes).to(device)
    prompt = torch.randint(0, sizes["vocab"], (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    parameters = sum(p.numel() for p in model.parameters())
    baseline = peak_rss_mb()
    gpu_baseline = peak_gpu_mb(device) if device.type == "cuda" else None

    def run(new_tokens: int):
        if kind == "plain":
            return plain_generate(model, prompt, new_tokens)
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    run(4)  # warm-up
    for length in sizes["lengths"]:
        synchronize(device)
        start = time.perf_counter()
        run(length)
        synchronize(device)
        seconds = time.perf_counter() - start
        row = {"model": kind, "batch": batch, "new tokens": length, "parameters": parameters,
               "tokens/s": batch * length / seconds, "peak RSS MB": peak_rss_mb(),
               "growth over load MB": peak_rss_mb() - baseline}
        if gpu_baseline is not None:
            row.update({"peak GPU MB": peak_gpu_mb(device), "GPU growth over load MB": peak_gpu_mb(device) - gpu_baseline})
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argument_parser(__doc__, device=True)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.quick, args.device)
        return
    on_gpu = args.device.type == "cuda"
    memory = "peak GPU MB" if on_gpu else "peak RSS MB"
    sizes = QUICK if args.quick else FULL
    rows = []
    for batch in sizes["batches"]:
        for kind in ("lm-lstm", "plain", "gpt2"):
            command = [sys.executable, __file__, "--worker", kind, str(batch), "--device", str(args.device)]
            command += ["--quick"] if args.quick else []
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
            print(rows[-1], flush=True)
    speed = {(r["model"], r["batch"], r["new tokens"]): r["tokens/s"] for r in rows}
    for row in rows:
        key = (row["batch"], row["new tokens"])
        row["lm-lstm / this"] = speed[("lm-lstm", *key)] / row["tokens/s"]
    first, last = sizes["lengths"][0], sizes["lengths"][-1]
    growth = {}
    for kind in ("lm-lstm", "plain", "gpt2"):
        for batch in sizes["batches"]:
            peak = {r["new tokens"]: r[memory] for r in rows if r["model"] == kind and r["batch"] == batch}
            growth[f"{kind} batch {batch}: {memory.removesuffix(' MB')} growth {first} -> {last} tokens"] = f"{100 * (peak[last] / peak[first] - 1):.1f}%"
    columns = ["model", "batch", "new tokens", "parameters", "tokens/s", "lm-lstm / this", "peak RSS MB",
               "growth over load MB"] + (["peak GPU MB", "GPU growth over load MB"] if on_gpu else [])
    write_results(args, result_name("generation", args.device), rows, columns, extra=growth)


if __name__ == "__main__":
    main()
