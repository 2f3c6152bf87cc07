"""How the warm-up decides when training leaves the character-frequency plateau, and how much that varies by seed.

An LSTM language model first learns the characters' frequencies (a training loss of about 3.3 nats on Tiny
Shakespeare), then, at some step, starts to use its state. With the default recipe at 5 minutes in fp32 (2 x 384 in 16
streams of 64 characters, 3e-3, a cosine over about 3,000 steps; `results/quality_5min_sized_layout_fp32.md`) seed 42
stayed there for about 300 steps, seed 1 for under 100. This runs the first `--steps` steps of that recipe, its
schedule over `--schedule_steps`, for each warm-up (`--warmup_steps`: a fraction of training below 1) and seed, and
reports the training loss Trainer logs every 25 steps: the step it first falls below 2.8 nats, and where it is at the
end.

    python benchmarks/warmup.py                          # warm-ups 0.02 and 0.1, seeds 42 and 1-6
    python benchmarks/warmup.py --warmup_steps 0.05 --seeds 1 2 3
    python benchmarks/warmup.py --quick                  # a tiny model, 50 steps, the first seed: that it runs
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402

from transformers import TrainerCallback, set_seed  # noqa: E402

import quality  # noqa: E402
from lm_lstm.arguments import DataArguments, ModelArguments  # noqa: E402
from lm_lstm.trainer import LSTMTrainer  # noqa: E402
from lm_lstm.training import build_model, build_training_data  # noqa: E402

PLATEAU_EXIT = 2.8  # nats: below the frequency plateau (about 3.3), which every run starts on
LOGGING_STEPS = 25


class StopAtStep(TrainerCallback):
    """Ends training after `step` optimizer steps, leaving the schedule as it was planned."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def first_steps(setup: quality.Setup, warmup: float, seed: int, steps: int, schedule_steps: int, hidden_size: int,
                streams: int, block_size: int) -> list[tuple[int, float]]:
    """The [step, training loss] Trainer logs over the first `steps` steps of the recipe with `warmup`."""
    with tempfile.TemporaryDirectory() as output_dir:
        set_seed(seed)
        args = quality.training_arguments(
            output_dir, False, seed, minutes=0, max_time=None, max_steps=schedule_steps, warmup_steps=warmup,
            per_device_train_batch_size=streams, logging_steps=LOGGING_STEPS,
        )
        data_args = DataArguments(block_size=block_size)
        data = build_training_data(setup.raw, setup.tokenizer, data_args, args)
        model = build_model(ModelArguments(tokenizer_type="char", hidden_size=hidden_size), setup.tokenizer)
        trainer = LSTMTrainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                              processing_class=setup.tokenizer, callbacks=[StopAtStep(steps)])
        trainer.train()
        return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--warmup_steps", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5, 6])
    parser.add_argument("--steps", type=int, default=400, help="Steps run of each schedule.")
    parser.add_argument("--schedule_steps", type=int, default=3000, help="Steps the schedule is planned over.")
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=False)
    args = parser.parse_args()
    quality.BF16 = args.bf16
    sizes = dict(hidden_size=32, streams=4, block_size=16) if args.quick else dict(hidden_size=384, streams=16,
                                                                                    block_size=64)
    steps, schedule_steps = (2 * LOGGING_STEPS, 100) if args.quick else (args.steps, args.schedule_steps)
    seeds = args.seeds[:1] if args.quick else args.seeds
    setup = quality.prepare(args.quick)
    rows = []
    for warmup in args.warmup_steps:
        for seed in seeds:
            log = first_steps(setup, warmup, seed, steps, schedule_steps, **sizes)
            print(f"warm-up {warmup:g}, seed {seed}: {log}", flush=True)
            exit_step = next((step for step, loss in log if loss < PLATEAU_EXIT), None)
            losses = {f"loss at {step}": loss for step, loss in log if step % 100 == 0 or step == steps}
            rows.append({"warm-up": warmup, "seed": seed, f"first step below {PLATEAU_EXIT}": exit_step, **losses,
                         "log": log})
    last = f"loss at {steps}"
    summary = ""
    for warmup in args.warmup_steps:
        ends = [row[last] for row in rows if row["warm-up"] == warmup and last in row]
        if ends:
            summary += (f"- warm-up {warmup:g}: loss at step {steps} {statistics.mean(ends):.3f} on average, from "
                        f"{min(ends):.2f} to {max(ends):.2f}\n")
    columns = [c for c in rows[0] if c != "log"]
    write_results(args, "warmup", rows, columns, extra={"bf16": args.bf16, "hidden size": sizes["hidden_size"],
                                                        "streams x BPTT": f"{sizes['streams']} x {sizes['block_size']}",
                                                        "schedule steps": schedule_steps},
                  appendix="\n" + summary)


if __name__ == "__main__":
    main()
