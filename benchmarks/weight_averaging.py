"""Weight averaging over the end of training, for the default recipe: do the running mean of the weights from a
fraction of the training time on (tail averaging, as SWA averages; Izmailov et al., 2018, "Averaging Weights Leads
to Wider Optima and Better Generalization"), or an exponential moving average of the weights of every step, score
better than the weights training ends with?

The LSTM is trained as `quality.py` trains it (the same data, recipe, `--set` changes, budget and seed); the averages
are kept beside it, then each is scored as `quality.py` scores the LSTM: the exact mean negative log-likelihood per
character over the whole validation text, read as one stream. One training gives every row, so the rows compare
within one run. `lm-lstm train`'s own averaging (`--weight_averaging_patience`, NT-ASGD) starts on a validation
trigger that the cosine schedule does not pull.

    python benchmarks/weight_averaging.py --minutes 30 --bf16 false --set hidden_size=512
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402

import quality  # noqa: E402
from lm_lstm.averaging import WeightAverage  # noqa: E402
from lm_lstm.evaluation import score_stream  # noqa: E402

TAIL_STARTS = (0.5, 0.7, 0.85)  # fractions of the training time
EMA_DECAYS = (0.998, 0.9995)  # per step: a mean over about the last 500 and 2,000 steps


class ExponentialAverage(WeightAverage):
    """An exponential moving average of a model's parameters, `decay` per update."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        for mean, parameter in zip(self.mean, self.parameters):
            mean.lerp_(parameter.detach(), 1 - self.decay)
        self.count += 1


class Averages(TrainerCallback):
    """Keeps the tail averages (from `TAIL_STARTS` of the training time, `args.max_time`) and the exponential
    averages (`EMA_DECAYS`) of the model trained, updated after every step."""

    def __init__(self):
        self.model: torch.nn.Module | None = None
        self.started = 0.0
        self.tails: dict[float, WeightAverage] = {}
        self.start_steps: dict[float, int] = {}
        self.exponential: dict[float, ExponentialAverage] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.started = model, time.monotonic()
        self.exponential = {decay: ExponentialAverage(model, decay) for decay in EMA_DECAYS}

    def on_step_end(self, args, state, control, **kwargs):
        for average in self.exponential.values():
            average.update()
        progress = (time.monotonic() - self.started) / args.max_time
        for start in TAIL_STARTS:
            if start in self.tails:
                self.tails[start].update()
            elif progress >= start:
                self.tails[start] = WeightAverage(self.model)
                self.start_steps[start] = state.global_step

    def named(self) -> dict[str, WeightAverage]:
        return {**{f"mean from {start:g} of the time": average for start, average in self.tails.items()},
                **{f"EMA {decay:g}": average for decay, average in self.exponential.items()}}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="Training-time budget.")
    quality.add_recipe_options(parser)
    args = parser.parse_args()
    quality.set_precision(args.bf16)
    setup = quality.prepare(args.quick)
    minutes = 0.05 if args.quick else args.minutes
    averages = Averages()
    set_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        trained = quality.run_lstm(setup, minutes, True, args.quick, scratch, quality.recipe_overrides(args.set),
                                   args.seed, callbacks=[averages])
    rows = [{"weights": "as trained", "steps in the average": 1, "nats/char": trained["nats/char"]}]
    for name, average in averages.named().items():
        with average.applied():
            nll, count = score_stream(averages.model, setup.validation_ids, block_size=1024)
        rows.append({"weights": name, "steps in the average": average.count, "nats/char": nll / count})
    for row in rows:
        row["vs as trained"] = row["nats/char"] / trained["nats/char"]
    extra = {"budget minutes": minutes, "bf16": quality.use_bf16(), "seed": args.seed, "lstm recipe changes": args.set,
             "training": {key: value for key, value in trained.items() if key not in ("sample", quality.TRAINING_LOG)},
             "tail start steps": averages.start_steps}
    write_results(args, quality.results_name(f"weight_averaging_{minutes:g}min", args.set, args.seed), rows,
                  list(rows[0]), extra)


if __name__ == "__main__":
    main()
