"""Model quality at equal wall-clock: lm-lstm's default recipe against GPTs of similar or smaller size, on Tiny
Shakespeare. The LSTM's hidden size, streams and BPTT length are chosen for the budget and the machine as `lm-lstm
train` chooses them (`lm_lstm.sizing`, measuring included in the budget) unless `--set hidden_size=N` fixes them
(`--set per_device_train_batch_size=N` / `block_size=N` fix the layout alone).

The LSTM and the `gpt` variant are trained by the same `Trainer` (`LSTMTrainer`) on the same character-level data
(the last 10% of the text by position held out) for the same training time (`--minutes`, as `--max_time`, with
evaluation and checkpoints off): the learning rate warms up, then follows a cosine over the time budget, and
training stops when the budget is spent (`lm_lstm.budget`). The `small-gpt` variant is the strongest small-GPT
reference: a nanoGPT-style 4 x 128 GPT (context 64, batch 12, no dropout, AdamW betas (0.9, 0.99), weight decay 0.1
on the matrices, 1e-3 after 100 warm-up steps with a cosine over the time budget to 1e-4 at the last step, clipping
1.0) trained by a plain PyTorch loop on random windows of the training text for the same time. The metric is the exact
mean negative log-likelihood per character over the entire validation text: the LSTM reads the text as one stream
with its state carried (every character predicted with its full left context); `gpt` reads it through sliding
windows of its context length moved by a quarter of it (every character has at least 3/4 of a full context);
`small-gpt` scores it in non-overlapping windows of its context (64 characters), as it was trained.

    python benchmarks/quality.py --minutes 5 10              # one result file per budget
    python benchmarks/quality.py --minutes 10 --variants lstm lstm-blocks
    python benchmarks/quality.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, set_seed  # noqa: E402

from lm_lstm.data import DataSource, load_text_datasets  # noqa: E402
from lm_lstm.budget import learning_rate_factor  # noqa: E402
from lm_lstm.evaluation import score_stream  # noqa: E402
from lm_lstm.tokenization import train_char_tokenizer  # noqa: E402
from lm_lstm.arguments import DataArguments, LSTMTrainingArguments, ModelArguments, fast_bf16_available  # noqa: E402
from lm_lstm.trainer import LSTMTrainer  # noqa: E402
from lm_lstm.training import (  # noqa: E402
    build_model, build_training_data, configure_generation, sample_text, size_new_model,
)

VARIANTS = ("lstm", "lstm-blocks", "gpt", "small-gpt")
GPT_VARIANTS = ("gpt", "small-gpt")  # the references the other rows are compared with
TRAINING_LOG = "training log"  # [step, training loss, gradient norm] every 50 steps: in the JSON, not the table
DEFAULT_SEED = 42
GPT_RECIPE = dict(n_layer=4, n_head=4, n_embd=256, n_positions=128, dropout=0.1, learning_rate=2e-3, batch_size=16,
                  weight_decay=0.1, max_grad_norm=1.0)
SMALL_GPT_RECIPE = dict(n_layer=4, n_head=4, n_embd=128, n_positions=64, dropout=0.0, batch_size=12,
                        betas=(0.9, 0.99), weight_decay=0.1, learning_rate=1e-3, min_learning_rate=1e-4,
                        warmup_steps=100, max_grad_norm=1.0)


@dataclass
class Setup:
    """The shared data of every run."""

    tokenizer: object
    raw: object
    validation_ids: list[int]  # EOS, then every validation character
    sample_length: int


def prepare(quick: bool) -> Setup:
    raw = load_text_datasets(DataSource())
    tokenizer = train_char_tokenizer(raw["train"]["text"])
    text = "".join(raw["validation"]["text"])  # the pieces of the held-out text
    if quick:
        text = text[:2000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Setup(tokenizer=tokenizer, raw=raw, validation_ids=[tokenizer.eos_token_id, *ids],
                 sample_length=20 if quick else 200)


BF16: bool | None = None  # bf16 autocast for every variant: None, where it is fast (`fast_bf16_available`)


def use_bf16() -> bool:
    return fast_bf16_available() if BF16 is None else BF16


def training_arguments(output_dir: str, quick: bool, seed: int, minutes: float, **overrides) -> LSTMTrainingArguments:
    """The default recipe's arguments for a budget of `minutes`, with evaluation and checkpoints off (the budget is
    training time)."""
    arguments = dict(
        output_dir=output_dir, seed=seed, bf16=use_bf16(), max_time=minutes * 60, eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, report_to="none", disable_tqdm=True, logging_steps=50,
    )
    if quick:
        arguments.update(per_device_train_batch_size=4, per_device_eval_batch_size=4)
    return LSTMTrainingArguments(**{**arguments, **overrides})


def train_for(model, args, train_dataset, collator, tokenizer, callbacks=()) -> tuple[int, float, list[list[float]]]:
    """Trains until the time budget (`args.max_time`) is spent, with the schedule over it; returns the steps taken,
    the training seconds and the logged [step, training loss, gradient norm] (to tell a bad run from a bad recipe).
    The optimizer is Trainer's, as for `lm-lstm train`: made at `train()`, after `LSTMTrainer` has fitted a recipe
    learning rate to the model's size. `callbacks` are the Trainer's, beside its own."""
    trainer = LSTMTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    output = trainer.train()
    log = [[entry["step"], entry["loss"], entry["grad_norm"]] for entry in trainer.state.log_history
           if "loss" in entry and "grad_norm" in entry]
    return trainer.state.global_step, output.metrics["train_runtime"], log


def recipe_overrides(assignments: list[str]) -> dict[str, dict[str, object]]:
    """`NAME=VALUE` changes to the default recipe, sorted into model, data and training arguments."""
    groups = {"model": ModelArguments, "data": DataArguments, "training": LSTMTrainingArguments}
    overrides: dict[str, dict[str, object]] = {group: {} for group in groups}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        group = next((g for g, cls in groups.items() if name in cls.__dataclass_fields__), None)
        if group is None or not value:
            raise SystemExit(f"--set {assignment!r}: expected NAME=VALUE with NAME an argument of `lm-lstm train`.")
        default = groups[group].__dataclass_fields__[name].default
        if isinstance(default, bool):
            overrides[group][name] = value.lower() == "true"
        elif default is None:  # an option sized or decided later (--hidden_size, --max_time): a number
            overrides[group][name] = float(value) if "." in value else int(value)
        else:
            overrides[group][name] = type(default)(value)
    return overrides


def run_lstm(setup: Setup, minutes: float, stateful: bool, quick: bool, output_dir: str,
             overrides: dict[str, dict[str, object]], seed: int, callbacks=()) -> dict[str, object]:
    sizes = {"embedding_size": 16, "hidden_size": 32} if quick else {}
    model_args = ModelArguments(tokenizer_type="char", **{**sizes, **overrides["model"]})
    data_args = DataArguments(**overrides["data"])
    args = training_arguments(output_dir, quick, seed, minutes, **{"stateful": stateful, **overrides["training"]})
    data = build_training_data(setup.raw, setup.tokenizer, data_args, args)
    choice, data = size_new_model(model_args, data_args, args, setup.raw, setup.tokenizer, data)  # when no size is set
    model = build_model(model_args, setup.tokenizer)
    configure_generation(model, setup.tokenizer)  # samples as `lm-lstm generate` does (and as the GPT's below)
    steps, seconds, log = train_for(model, args, data.train, data.collator, setup.tokenizer, callbacks)
    model.eval()
    nll, count = score_stream(model, setup.validation_ids, block_size=1024)
    tokens = steps * args.per_device_train_batch_size * data_args.block_size
    row = result_row("lstm" if stateful else "lstm-blocks", model, setup, steps, tokens, seconds, nll / count)
    row[TRAINING_LOG] = log
    row["hidden size"] = model.config.hidden_size
    row["streams x BPTT"] = f"{args.per_device_train_batch_size} x {data_args.block_size}"
    if choice is not None:
        row["measuring minutes"] = choice.probe_seconds / 60
        row["expected nats/char"] = choice.chosen.loss
        row["measured tokens/s"] = choice.chosen.measurement.tokens_per_second
        row["trained tokens/s"] = tokens / seconds
    return row


@torch.no_grad()
def score_windows(model, ids: list[int], context: int, stride: int, batch_size: int = 32) -> tuple[float, int]:
    """Summed NLL of `ids[1:]` through sliding windows of `context` tokens moved by `stride`: each window scores the
    `stride` tokens at its end, predicted from everything in the window before them."""
    stream = torch.tensor(ids, device=model.device)
    total, windows = 0.0, []
    for end in range(1, len(ids), stride):
        stop = min(end + stride, len(ids))
        windows.append((max(0, stop - 1 - context), end, stop))  # inputs stream[first:stop-1]; targets [end, stop)
    for begin in range(0, len(windows), batch_size):
        batch = windows[begin : begin + batch_size]
        width = max(stop - 1 - first for first, _, stop in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long, device=model.device)
        targets = torch.full((len(batch), width), -100, dtype=torch.long, device=model.device)
        mask = torch.zeros_like(inputs)
        for row, (first, end, stop) in enumerate(batch):
            length = stop - 1 - first
            inputs[row, :length] = stream[first : stop - 1]
            mask[row, :length] = 1
            targets[row, end - 1 - first : length] = stream[end:stop]
        logits = model(inputs, attention_mask=mask).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
    return total, len(ids) - 1


def gpt_model(tokenizer, recipe: dict[str, object]) -> GPT2LMHeadModel:
    """A new GPT-2 of the recipe's shape and dropout for the character tokenizer."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=recipe["n_positions"], n_embd=recipe["n_embd"],
        n_layer=recipe["n_layer"], n_head=recipe["n_head"], resid_pdrop=recipe["dropout"],
        embd_pdrop=recipe["dropout"], attn_pdrop=recipe["dropout"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def run_gpt(setup: Setup, minutes: float, quick: bool, output_dir: str, recipe: dict[str, object],
            seed: int) -> dict[str, object]:
    if quick:
        recipe = dict(recipe, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    tokenizer = setup.tokenizer
    model = gpt_model(tokenizer, recipe)
    data_args = DataArguments(block_size=recipe["n_positions"])
    args = training_arguments(
        output_dir, quick, seed, minutes, stateful=False, learning_rate=recipe["learning_rate"],
        weight_decay=recipe["weight_decay"], max_grad_norm=recipe["max_grad_norm"],
        **({} if quick else {"per_device_train_batch_size": recipe["batch_size"]}),
    )
    data = build_training_data(setup.raw, tokenizer, data_args, args)
    steps, seconds, log = train_for(model, args, data.train, data.collator, tokenizer)
    model.eval()
    context = recipe["n_positions"]
    nll, count = score_windows(model, setup.validation_ids, context, stride=context // 4)
    tokens = steps * args.per_device_train_batch_size * context
    return {**result_row("gpt", model, setup, steps, tokens, seconds, nll / count), TRAINING_LOG: log}


def run_small_gpt(setup: Setup, minutes: float, seed: int) -> dict[str, object]:
    """The small GPT (`SMALL_GPT_RECIPE`) trained by a plain loop for `minutes`, nanoGPT-style: batches of random
    windows of the training text, weight decay on the matrices only, the learning rate by elapsed time (the last
    step is the one that spends the budget), bf16 autocast as the other variants (`use_bf16`)."""
    recipe = SMALL_GPT_RECIPE
    model = gpt_model(setup.tokenizer, recipe).train()
    text = "".join(setup.raw["train"]["text"])
    train_ids = torch.tensor(setup.tokenizer(text, add_special_tokens=False)["input_ids"])
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": recipe["weight_decay"]}, {"params": others, "weight_decay": 0.0}],
        lr=recipe["learning_rate"], betas=recipe["betas"],
    )
    min_lr_rate = recipe["min_learning_rate"] / recipe["learning_rate"]
    context, batch_size = recipe["n_positions"], recipe["batch_size"]
    generator = torch.Generator().manual_seed(seed)
    budget, steps, progress, log = minutes * 60, 0, 0.0, []
    start = time.perf_counter()
    while progress < 1.0:
        rate = learning_rate_factor(steps, progress, recipe["warmup_steps"], "cosine", min_lr_rate)
        for group in optimizer.param_groups:
            group["lr"] = recipe["learning_rate"] * rate
        offsets = torch.randint(len(train_ids) - context, (batch_size,), generator=generator)
        windows = torch.stack([train_ids[offset : offset + context + 1] for offset in offsets])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16()):
            logits = model(windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps % 50 == 0:
            log.append([steps, loss.item(), grad_norm.item()])
        progress = min(1.0, (time.perf_counter() - start) / budget)
    seconds = time.perf_counter() - start
    model.eval()
    nll, count = score_windows(model, setup.validation_ids, context, stride=context)  # non-overlapping windows
    row = result_row("small-gpt", model, setup, steps, steps * batch_size * context, seconds, nll / count)
    return {**row, TRAINING_LOG: log}


@torch.no_grad()
def sample_in_window(model, tokenizer, length: int, context: int) -> str:
    """Samples as `sample_text` does (temperature 0.8, top-k 50), feeding a GPT only the last `context` tokens."""
    ids = tokenizer("\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    for _ in range(length):
        logits = model(ids[:, -context:]).logits[0, -1] / 0.8
        logits[logits < logits.topk(min(50, logits.numel())).values[-1]] = -float("inf")
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)[None]], dim=1)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def result_row(name, model, setup, steps, tokens, seconds, loss) -> dict[str, object]:
    set_seed(0)
    if isinstance(model, GPT2LMHeadModel):
        sample = sample_in_window(model, setup.tokenizer, setup.sample_length, model.config.n_positions)
    else:
        sample = sample_text(model, setup.tokenizer, max_new_tokens=setup.sample_length)
    print(f"\n{name}: {loss:.4f} nats/char after {steps} steps\n{sample}\n", flush=True)
    return {
        "model": name, "parameters": model.num_parameters(), "steps": steps, "tokens seen": tokens,
        "training minutes": seconds / 60, "nats/char": loss, "bits/char": loss / math.log(2), "sample": sample,
    }


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """`--seed`, `--set` (changes to the LSTM's recipe) and `--bf16`, as this script and those that train its LSTM
    take them."""
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="Seeds the models' initialisation, the data order and dropout.")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="Change the LSTM's recipe (arguments of `lm-lstm train`), to compare recipes.")
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                        help="bf16 autocast for every variant; auto: where it is fast (as lm-lstm train decides).")


def set_precision(bf16: str) -> None:
    """Sets `BF16` from a `--bf16` value: "auto" (None: where it is fast), "true" or "false"."""
    global BF16
    BF16 = {"auto": None, "true": True, "false": False}[bf16]


def results_name(stem: str, assignments: list[str], seed: int) -> str:
    """The results' file name: `stem`, the recipe changes, a seed other than the default and a forced precision."""
    name = stem + "".join(f"_{assignment}" for assignment in assignments)
    if seed != DEFAULT_SEED:
        name += f"_seed{seed}"
    if BF16 is not None:
        name += "_bf16" if BF16 else "_fp32"
    return name


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0], help="Training-time budgets, one run each.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["lstm", "gpt", "small-gpt"],
                        help="lstm: the default recipe (stateful, sized for the budget); lstm-blocks: the same on independent blocks; gpt: "
                        "a GPT of similar size by the same Trainer; small-gpt: the small GPT by a plain loop.")
    add_recipe_options(parser)
    parser.add_argument("--gpt_set", nargs="*", default=[], metavar="NAME=VALUE",
                        help=f"Change the GPT's recipe: {', '.join(GPT_RECIPE)}.")
    args = parser.parse_args()
    set_precision(args.bf16)
    overrides = recipe_overrides(args.set)
    gpt_recipe = dict(GPT_RECIPE)
    for assignment in args.gpt_set:
        name, _, value = assignment.partition("=")
        if name not in GPT_RECIPE:
            raise SystemExit(f"--gpt_set {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(GPT_RECIPE)}.")
        gpt_recipe[name] = type(GPT_RECIPE[name])(value)
    setup = prepare(args.quick)
    for minutes in [0.05] if args.quick else args.minutes:
        rows = []
        for variant in args.variants:
            set_seed(args.seed)
            with tempfile.TemporaryDirectory() as scratch:
                if variant == "gpt":
                    rows.append(run_gpt(setup, minutes, args.quick, scratch, gpt_recipe, args.seed))
                elif variant == "small-gpt":
                    rows.append(run_small_gpt(setup, minutes, args.seed))
                else:
                    rows.append(run_lstm(setup, minutes, variant == "lstm", args.quick, scratch, overrides, args.seed))
        for reference in [row for row in rows if row["model"] in GPT_VARIANTS] or rows[-1:]:
            for row in rows:
                row["vs " + reference["model"]] = row["nats/char"] / reference["nats/char"]
        columns = list(dict.fromkeys(column for row in rows for column in row if column not in ("sample", TRAINING_LOG)))
        samples = "".join(f"\n## Sample: {row['model']}\n\n```\n{row['sample']}\n```\n" for row in rows)
        extra = {"budget minutes": minutes, "bf16": use_bf16(), "seed": args.seed, "gpt recipe": gpt_recipe,
                 "small-gpt recipe": SMALL_GPT_RECIPE, "lstm recipe changes": args.set}
        name = results_name(f"quality_{minutes:g}min", args.set + args.gpt_set, args.seed)
        write_results(args, name, rows, columns, extra, appendix=samples)

if __name__ == "__main__":
    main()
