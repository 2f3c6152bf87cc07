"""The scaling-law fit behind lm-lstm's adaptive recipe (`lm_lstm.sizing`): validation loss against model size and
training text, on the bundled corpus.

Each run trains the default recipe (`lm-lstm train`'s, stateful, on the character tokenizer) with one hidden size for
a fixed number of training tokens (`--max_steps`, the cosine over them; no time budget), then scores the whole
validation text exactly as `quality.py` does (nats per character). Tokens and parameters do not depend on the
machine, so neither do the results; only the time each run takes does. The fit,

    loss(N, D) = E + A / N**alpha + B / D'**beta,   D' = U + U R* (1 - exp(-(D / U - 1) / R*)) beyond one pass,
    R* = R (N / 1e6)**-gamma,

with N the LSTM layers' parameters, D the training characters and U those of the training text (repetitions count
less and less, after Muennighoff et al., 2023; a smaller model learns from more of them: on this corpus a 2 x 128
LSTM still improves after 16 passes where a 2 x 512 one stops after about 5), minimises the Huber loss (delta 1e-3) of the log losses, as Hoffmann et al.
(2022, approach 3) do, from a grid of starting points. Beside the grid's runs it fits the `lstm` rows of the
earlier `quality_{5,10,30}min.json` runs (the same recipe at hidden size 512, for a time budget, bf16): they reach
16M characters. Rows are appended to the results file as each run ends, so an interrupted grid resumes where it
stopped; `--fit_only` refits the rows there.

    python benchmarks/scaling.py                   # the grid, then the fit: results/scaling.json and .md
    python benchmarks/scaling.py --fit_only
    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402
from quality import DEFAULT_SEED, prepare, run_lstm  # noqa: E402

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from lm_lstm.arguments import DataArguments  # noqa: E402
from lm_lstm.configuration_lstm import LSTMConfig  # noqa: E402
from lm_lstm.presets import DEFAULT_PRESET  # noqa: E402
from lm_lstm.sizing import LossFit, layer_parameters  # noqa: E402

# (hidden size, training tokens in millions): small sizes to long runs, large ones to short runs, as budgets reach;
# run in this order, the costliest last
GRID = [(128, 1), (128, 4), (128, 16), (256, 1), (384, 1), (512, 1), (256, 4), (384, 4), (512, 4), (256, 16)]
QUICK_GRID = [(16, 0.002), (32, 0.002), (16, 0.004)]


def tokens_per_step(quick: bool) -> int:
    streams = 4 if quick else DEFAULT_PRESET.training["per_device_train_batch_size"]  # as `quality.run_lstm`
    return streams * DataArguments().block_size


def run(setup, hidden_size: int, million_tokens: float, quick: bool, seed: int) -> dict[str, object]:
    steps = max(1, round(million_tokens * 1e6 / tokens_per_step(quick)))
    overrides = {"model": {"hidden_size": hidden_size}, "data": {},
                 "training": {"max_steps": steps, "max_time": None}}
    with tempfile.TemporaryDirectory() as scratch:
        set_seed(seed)
        row = run_lstm(setup, 0, stateful=True, quick=quick, output_dir=scratch, overrides=overrides, seed=seed)
    config = LSTMConfig(vocab_size=len(setup.tokenizer), **{**DEFAULT_PRESET.model, "hidden_size": hidden_size})
    if quick:
        config = LSTMConfig(**{**config.to_dict(), "embedding_size": 16})
    row.pop("sample")
    return {"hidden size": hidden_size, "layer parameters": layer_parameters(config), **row}


def huber(residuals: torch.Tensor, delta: float = 1e-3) -> torch.Tensor:
    small = residuals.abs() <= delta
    return torch.where(small, 0.5 * residuals**2, delta * (residuals.abs() - 0.5 * delta)).sum()


def quality_rows(results: Path, hidden_size: int = 512) -> list[dict[str, object]]:
    """The `lstm` rows of the earlier quality runs (hidden size 512), as grid rows."""
    config = LSTMConfig(vocab_size=259, **{**DEFAULT_PRESET.model, "hidden_size": hidden_size})
    rows = []
    for minutes in (5, 10, 30):
        for row in json.loads((results / f"quality_{minutes}min.json").read_text())["rows"]:
            if row["model"] == "lstm":
                rows.append({"source": f"quality_{minutes}min.json", "hidden size": hidden_size,
                             "layer parameters": layer_parameters(config),
                             **{key: row[key] for key in ("steps", "tokens seen", "training minutes", "nats/char")}})
    return rows


def fit(rows: list[dict[str, object]], unique: float, thorough: bool = True) -> dict[str, float]:
    """E, A, alpha, B, beta, R*, gamma of the loss law for `unique` characters of training text, fitted in log space
    (E = exp(e), A = exp(a), B = exp(b); R* = exp(r) (N / 1e6)**-gamma); from 432 starting points, or one unless
    `thorough`."""
    n = torch.tensor([float(r["layer parameters"]) for r in rows], dtype=torch.float64)
    d = torch.tensor([float(r["tokens seen"]) for r in rows], dtype=torch.float64)  # characters: one token each
    loss = torch.tensor([float(r["nats/char"]) for r in rows], dtype=torch.float64)
    repeated = (d / unique - 1).clamp(min=0)

    def objective(p: torch.Tensor) -> torch.Tensor:
        e, a, alpha, b, beta, r, gamma = p
        worth = r.exp() * (n / 1e6) ** -gamma  # R*: smaller models learn from more repetitions
        seen = torch.where(d <= unique, d, unique * (1 + worth * (1 - torch.exp(-repeated / worth))))
        terms = torch.stack([e.expand_as(n), a - alpha * n.log(), b - beta * seen.log()])
        return huber(torch.logsumexp(terms, dim=0) - loss.log())

    best, best_value = None, float("inf")
    starts = itertools.product([-0.5, 0.0, 0.5], [0.0, 5.0, 10.0], [0.3, 0.6], [0.0, 5.0, 10.0], [0.3, 0.6],
                                   [0.0, 1.5], [0.0, 1.0])
    for start in itertools.islice(starts, None if thorough else 1):
        p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([p], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = objective(p)
            value.backward()
            return value

        try:
            optimizer.step(closure)
        except RuntimeError:
            continue
        with torch.no_grad():
            value = float(objective(p))
        if value < best_value and torch.isfinite(p).all():
            best, best_value = p.detach(), value
    e, a, alpha, b, beta, r, gamma = best.tolist()
    return {"irreducible": math.exp(e), "a": math.exp(a), "alpha": alpha, "b": math.exp(b), "beta": beta,
            "repetitions": math.exp(r), "repetitions_exponent": gamma, "unique characters": unique,
            "objective": best_value}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--fit_only", action="store_true", help="Refit the rows already in the results file.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    name = "scaling-quick" if args.quick else "scaling"
    path = Path(args.results_dir) / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [{"source": "grid", **row} for row in rows if row.get("source", "grid") == "grid"]  # quality's: below
    setup = prepare(args.quick)
    if not args.fit_only:
        for hidden_size, million_tokens in QUICK_GRID if args.quick else GRID:
            if any(r["hidden size"] == hidden_size and r["million tokens"] == million_tokens for r in rows):
                continue
            row = {"million tokens": million_tokens, **run(setup, hidden_size, million_tokens, args.quick, args.seed)}
            row.setdefault("source", "grid")
            rows.append(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rows": rows}, indent=2))  # each row kept as soon as it exists
    if not args.quick:
        rows += quality_rows(Path(args.results_dir))
    unique = sum(len(text) for text in setup.raw["train"]["text"])
    coefficients = fit(rows, unique, thorough=not args.quick)
    law = LossFit(**{name: coefficients[name] for name in LossFit.__dataclass_fields__})
    for row in rows:
        row["fitted nats/char"] = law.loss(row["layer parameters"], row["tokens seen"], unique)
    columns = ["source", "hidden size", "layer parameters", "tokens seen", "steps", "training minutes", "nats/char",
               "fitted nats/char"]
    args.results_dir = str(path.parent)
    args.quick = False  # the file name already says quick
    write_results(args, name, rows, columns, {"fit": coefficients, "seed": args.seed,
                                             "recipe": {**DEFAULT_PRESET.model, **DEFAULT_PRESET.training}})


if __name__ == "__main__":
    main()
