"""What a character seen in a batch of b tokens per update is worth: the critical batch behind `lm_lstm.sizing`'s
choice of streams and BPTT length (`BATCH_WORTH`).

No training: it reads the `lstm` rows of time-budgeted `quality.py` runs of the default recipe in several layouts
(`RUNS`), reads each final validation loss back through the scaling fit (`lm_lstm.sizing.SCALING_FIT`, whose runs
all used 16 streams of 128 characters) as the characters that would have given that loss there, and divides by the
characters the run saw: the worth of one of its characters. It then fits the critical-batch form of McCandlish et
al. (2018, "An Empirical Model of Large-Batch Training"),

    worth = c / (1 + b / B),

with B, the critical batch in tokens, shared by all runs, and c one per budget and precision (the scaling fit misses
the level of each by its own factor: near its levelling off, a small error in loss is a large one in characters), by
least squares on the log worths over a grid of B. Only budgets run in several layouts tell anything of B: the 5
minutes of the recipe's choice (bf16) and 10 minutes in fp32. What `BATCH_WORTH` uses is the worth
relative to the fit's 2,048 tokens per update, (1 + 2048 / B) / (1 + b / B), which c does not enter.

    python benchmarks/batch_worth.py        # results/batch_worth.json and .md
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, argument_parser, write_results  # noqa: E402

from lm_lstm.configuration_lstm import LSTMConfig  # noqa: E402
from lm_lstm.presets import DEFAULT_PRESET  # noqa: E402
from lm_lstm.sizing import SCALING_FIT, layer_parameters  # noqa: E402

RUNS = [
    "recipe/quality_5min_batch16.json",  # 16 x 128
    "recipe/quality_5min_batch32.json",  # 32 x 128
    "recipe/quality_5min_batch64.json",  # 64 x 128
    "recipe/quality_5min_batch64_block64.json",  # 64 x 64
    "recipe/quality_5min_block_size=64.json",  # 16 x 64
    "quality_5min.json",  # 16 x 128
    "quality_5min_sized_bf16.json",  # 16 x 128
    "quality_10min_sized_fp32_seed1.json",  # 16 x 128, fp32, seed 1
    "recipe/quality_10min_fp32.json",  # 16 x 128, fp32, seed 42
    "recipe/quality_10min_block_size=64_fp32.json",  # 16 x 64
    "recipe/quality_10min_per_device_train_batch_size=8_fp32.json",  # 8 x 128
]
LEFT_OUT = {
    "quality_10min_sized_fp32.json": "16 x 128, fp32, seed 42: 1.565, its command run again gave 1.453 "
    "(recipe/quality_10min_fp32.json); a bad run, 0.1 above every other run of the recipe at 10 minutes",
}
REFERENCE_TOKENS = 2048  # the scaling fit's runs: 16 streams x 128 tokens
RECIPE_HIDDEN_SIZE = 512  # of the runs that predate the "hidden size" column


def equivalent_characters(loss: float, parameters: float, unique: float) -> float:
    """The characters at which `SCALING_FIT` expects `loss` (bisection: the expected loss falls with them)."""
    low, high = 1e3, 1e13
    for _ in range(200):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if SCALING_FIT.loss(parameters, middle, unique) > loss else (low, middle)
    return math.sqrt(low * high)


def read_runs(unique: float) -> list[dict[str, object]]:
    rows = []
    for name in RUNS:
        result = json.loads((RESULTS / name).read_text())
        row = next(r for r in result["rows"] if r["model"] == "lstm")
        hidden_size = row.get("hidden size", RECIPE_HIDDEN_SIZE)
        config = LSTMConfig(vocab_size=65, **{**DEFAULT_PRESET.model, "hidden_size": hidden_size})
        parameters = layer_parameters(config)
        tokens_per_update = round(row["tokens seen"] / row["steps"])
        worth = equivalent_characters(row["nats/char"], parameters, unique) / row["tokens seen"]
        precision = "fp32" if result.get("bf16") is False else "bf16"  # the oldest runs: bf16, as on this machine
        rows.append({"run": name, "budget": f"{result['budget minutes']:g} min {precision}", "hidden size": hidden_size,
                     "tokens per update": tokens_per_update, "characters": row["tokens seen"],
                     "nats/char": row["nats/char"], "worth": worth})
    return rows


def fit(rows: list[dict[str, object]]) -> tuple[float, dict[float, float]]:
    """B and each budget's c of `worth = c / (1 + b / B)`, least squares on log worth, B on a 10-token grid."""
    budgets = sorted({row["budget"] for row in rows})

    def levels(critical: float) -> dict[float, float]:  # the best log c of each budget for this B
        return {m: sum(math.log(r["worth"]) + math.log(1 + r["tokens per update"] / critical)
                       for r in rows if r["budget"] == m) / sum(r["budget"] == m for r in rows) for m in budgets}

    def error(critical: float) -> float:
        c = levels(critical)
        return sum((math.log(r["worth"]) - c[r["budget"]] + math.log(1 + r["tokens per update"] / critical)) ** 2
                   for r in rows)

    critical = min(range(100, 50_001, 10), key=error)
    return float(critical), {m: math.exp(v) for m, v in levels(critical).items()}


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    unique = json.loads((RESULTS / "scaling.json").read_text())["fit"]["unique characters"]
    rows = read_runs(unique)
    critical, levels = fit(rows)
    for row in rows:
        row["fitted worth"] = levels[row["budget"]] / (1 + row["tokens per update"] / critical)
        row["vs 2,048 tokens"] = (1 + REFERENCE_TOKENS / critical) / (1 + row["tokens per update"] / critical)
    extra = {"critical_tokens": critical, "reference_tokens": REFERENCE_TOKENS,
             "c per budget": levels, "unique characters": unique, "left out": LEFT_OUT}
    columns = ["run", "budget", "hidden size", "tokens per update", "characters", "nats/char", "worth",
               "fitted worth", "vs 2,048 tokens"]
    write_results(args, "batch_worth", rows, columns, extra)


if __name__ == "__main__":
    main()
