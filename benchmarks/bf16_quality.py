"""bf16 autocast against fp32 training: validation loss at the same step count, and wall time.

The default `lm-lstm train` recipe on Tiny Shakespeare, the same seed and data order, run once in each precision, by
steps (no time budget: both runs follow the same step schedule).

    python benchmarks/bf16_quality.py --max_steps 300
    python benchmarks/bf16_quality.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402

from lm_lstm.arguments import (  # noqa: E402
    DataArguments, LSTMTrainingArguments, ModelArguments, fast_bf16_available,
)
from lm_lstm.training import train  # noqa: E402


def run(bf16: bool, max_steps: int, quick: bool, output_dir: str) -> dict[str, object]:
    model_args = ModelArguments(tokenizer_type="char", **({"embedding_size": 16, "hidden_size": 32} if quick else {}))
    data_args = DataArguments(max_train_samples=64 if quick else None, max_eval_samples=16 if quick else None)
    training_args = LSTMTrainingArguments(
        output_dir=output_dir, max_steps=max_steps, max_time=None, bf16=bf16, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, report_to="none", disable_tqdm=True,
        **({"per_device_train_batch_size": 8} if quick else {}),
    )
    start = time.perf_counter()
    result = train(model_args, data_args, training_args)
    return {"precision": "bf16 autocast" if bf16 else "fp32", "steps": max_steps,
            "validation loss": result.metrics["eval_loss"], "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--max_steps", type=int, default=300, help="Training steps of each run.")
    args = parser.parse_args()
    steps = 3 if args.quick else args.max_steps
    with tempfile.TemporaryDirectory() as scratch:
        # bf16 only where it has hardware arithmetic: elsewhere it is emulated, 30-60x slower than fp32.
        precisions = (False, True) if fast_bf16_available() else (False,)
        rows = [run(bf16, steps, args.quick, str(Path(scratch) / str(bf16))) for bf16 in precisions]
    for row in rows:
        row["loss vs fp32"] = row["validation loss"] / rows[0]["validation loss"]
        row["speed vs fp32"] = rows[0]["minutes"] / row["minutes"]
    write_results(args, "bf16_quality", rows, ["precision", "steps", "validation loss", "loss vs fp32", "minutes",
                                                "speed vs fp32"])


if __name__ == "__main__":
    main()
