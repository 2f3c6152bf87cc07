"""One-token decoding kernels: `step_matmul` (`weight @ rows.T`) against `F.linear`, alone and in the decode step.

1. The output layer of config B (33,278 x 650, fp32) on 1 to 1024 rows: `F.linear(rows, weight)` against
   `step_matmul(rows, weight)`, which lm-lstm uses for one-token steps where `has_step_matmul` says so.
2. The whole decode step `model(token, cache=cache)` of lm-lstm at config B, with `step_matmul` switched off
   (`torch.lstm_cell` and `F.linear`, the previous path) and on, at batch 1, 2, 8 and 32.

The two methods alternate round after round in this one process; the table holds medians.

    python benchmarks/step_kernels.py           # about a minute
    python benchmarks/step_kernels.py --quick
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, median_seconds, write_results  # noqa: E402

from lm_lstm import LSTMConfig, LSTMForCausalLM  # noqa: E402
from lm_lstm import modeling_lstm  # noqa: E402

FULL = {"vocab": 33278, "width": 650, "layers": 2, "kernel rows": [1, 2, 4, 8, 64, 1024], "step batches": [1, 2, 8, 32],
        "repeats": 20, "rounds": 3}
QUICK = {"vocab": 500, "width": 32, "layers": 2, "kernel rows": [1, 2], "step batches": [1], "repeats": 2, "rounds": 1}


def alternate(methods: dict[str, Callable[[], object]], repeats: int, rounds: int) -> dict[str, float]:
    """Median milliseconds of each method, timed in turn for `rounds` rounds of `repeats` calls."""
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            times[name].append(1e3 * median_seconds(method, repeats, warmup=2))
    return {name: statistics.median(values) for name, values in times.items()}


def kernel_rows(sizes: dict) -> list[dict]:
    weight = torch.randn(sizes["vocab"], sizes["width"])
    rows = []
    for count in sizes["kernel rows"]:
        inputs = torch.randn(count, sizes["width"])
        ms = alternate({"F.linear": lambda: F.linear(inputs, weight),
                        "step_matmul": lambda: modeling_lstm.step_matmul(inputs, weight)},
                       sizes["repeats"], sizes["rounds"])
        rows.append({"measure": f"output layer {sizes['vocab']} x {sizes['width']}", "rows": count,
                     "before ms (F.linear, lstm_cell)": ms["F.linear"], "step_matmul ms": ms["step_matmul"]})
        print(rows[-1], flush=True)
    return rows


def decode_step_rows(sizes: dict) -> list[dict]:
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=sizes["vocab"], embedding_size=sizes["width"], hidden_size=sizes["width"],
                        num_hidden_layers=sizes["layers"], tie_word_embeddings=True)
    model = LSTMForCausalLM(config).eval()
    rows = []
    for batch in sizes["step batches"]:
        prompt = torch.randint(0, sizes["vocab"], (batch, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            cache = model(prompt, use_cache=True).cache

        @torch.no_grad()
        def step(fast: bool) -> None:
            with mock.patch.object(modeling_lstm, "STEP_MATMUL", fast):  # forced, not measured per machine
                model(prompt[:, -1:], cache=cache, use_cache=True)

        ms = alternate({"before": lambda: step(False), "step_matmul": lambda: step(True)},
                       sizes["repeats"], sizes["rounds"])
        rows.append({"measure": "decode step, config B sizes", "rows": batch,
                     "before ms (F.linear, lstm_cell)": ms["before"], "step_matmul ms": ms["step_matmul"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    sizes = QUICK if args.quick else FULL
    rows = kernel_rows(sizes) + decode_step_rows(sizes)
    for row in rows:
        row["speed-up"] = row["before ms (F.linear, lstm_cell)"] / row["step_matmul ms"]
    columns = ["measure", "rows", "before ms (F.linear, lstm_cell)", "step_matmul ms", "speed-up"]
    write_results(args, "step_kernels", rows, columns, extra={"rounds": sizes["rounds"], "calls per round": sizes["repeats"]})


if __name__ == "__main__":
    main()
