"""Sizing a new model for its time budget and the machine: the adaptive recipe of `lm-lstm train`.

A model that is too large for the time sees too little text; one that is too small stops improving early. Given the
time budget, `size_model` measures how many training tokens per second the machine processes at each candidate
size (a few timed training steps, in the precision training will use), and picks the size with the lowest expected
validation loss after the tokens it can see in the budget. The expectation is a scaling-law fit (Hoffmann et al.,
2022, "Training Compute-Optimal Large Language Models", approach 3),

    loss(N, D) = E + A / N**alpha + B / D'**beta    (nats per character),

of the default recipe's final validation loss on the bundled corpus, over N, the LSTM layers' parameters, and D', the
effective characters of training text seen: D itself for the first pass over the U characters of training text, then
fewer for each repetition, D' = U + U R* (1 - exp(-(D / U - 1) / R*)) (after Muennighoff et al., 2023, "Scaling
Data-Constrained Language Models"), which levels off at U (1 + R*); R* = R (N / 1e6)**-gamma, as a smaller model
learns from more repetitions. `benchmarks/scaling.py` trained the grid of
sizes and lengths behind it and wrote the fit to `benchmarks/results/scaling.json`, whose numbers `SCALING_FIT`
holds. Tokens and parameters do not depend on the machine: the same fit serves every machine, and only the measured
speed differs; U is the run's own training text.

The hidden size (`CANDIDATE_HIDDEN_SIZES`, every layer) is chosen with the layout of the training batches: the
number of streams and the BPTT length (`candidate_layouts`), whichever of the two the user left open. A character
seen in a batch of fewer tokens per update teaches more, and a batch of fewer tokens runs at fewer tokens per second
on a CPU; `BatchWorth` (the critical batch of McCandlish et al., 2018) weighs the one against the other. The sizes
are measured in the recipe's layout, then the chosen size in the other layouts. The number of layers and the
embedding size stay the recipe's (`presets.py`). Any size option given by the user disables sizing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import format_duration, plain_number
from .presets import DEFAULT_PRESET
from .configuration_lstm import LSTMConfig
from .modeling_lstm import LSTMForCausalLM

CANDIDATE_HIDDEN_SIZES: tuple[int, ...] = (128, 192, 256, 384, 512)
"""The hidden sizes to choose from: within those of the runs behind `SCALING_FIT` (128 to 512,
benchmarks/results/scaling.md). Beyond, the fit extrapolates, optimistically: every 2 x 1,024 run it chose for 30
minutes ended 0.03 to 0.11 nats/char above its expectation (1.412 to 1.509, benchmarks/results/quality_30min_*.md),
where sizes up to 512 ended within about 0.02 of it."""
TRAINING_SHARE = 0.9
"""The part of a time budget spent in training steps; the rest goes to evaluations and the final save (about 7% on
the bundled corpus with the default recipe: benchmarks/results/quality_10min.json)."""
MIN_TRAINING_SECONDS = 1.0
"""The least training time a budget gives, whatever its measuring took."""
PROBE_SHARE = 0.05
"""At most this part of the budget is spent measuring candidates, as far as the time of each measurement can be
foreseen from the last one's; those that would end later are not measured."""
BUSY_SHARE = 0.25
"""Above this share of its CPUs' time taken by other work while measuring, the sizing line warns that the speeds were
measured low: two 2-thread processes on 2 cores slow each other's steps several-fold (OpenMP threads wait for
each other at every parallel region), and the training that follows runs at the speed of whatever load is left."""
FIT_MIN_CHARACTERS = 999_424
"""The fewest training characters a run behind `SCALING_FIT` saw (benchmarks/results/scaling.json): the expected
losses of shorter runs are extrapolations, and rough ones."""


@dataclass(frozen=True)
class LossFit:
    """`loss(N, D) = irreducible + a / N**alpha + b / D'**beta`, in nats per character, with N the parameters of the
    LSTM layers and D' the effective training characters (`effective_characters`)."""

    irreducible: float
    a: float
    alpha: float
    b: float
    beta: float
    repetitions: float  # R at 1M parameters: how many repetitions of the text are worth learning from
    repetitions_exponent: float  # gamma: R* = repetitions * (N / 1e6)**-gamma

    def effective_characters(self, characters: float, unique_characters: float, parameters: float) -> float:
        """D': the `characters` seen, counting repetitions of the `unique_characters` of training text less, the less
        the more `parameters`."""
        if characters <= unique_characters:
            return characters
        repeated = characters / unique_characters - 1
        worth = self.repetitions * (parameters / 1e6) ** -self.repetitions_exponent
        return unique_characters * (1 + worth * (1 - math.exp(-repeated / worth)))

    def loss(self, parameters: float, characters: float, unique_characters: float) -> float:
        seen = self.effective_characters(characters, unique_characters, parameters)
        return self.irreducible + self.a / parameters**self.alpha + self.b / seen**self.beta


SCALING_FIT = LossFit(  # benchmarks/results/scaling.json
    irreducible=6.46437e-15, a=23.2103, alpha=0.215879, b=6671.49, beta=0.642882,
    repetitions=3.85918, repetitions_exponent=0.778021,
)


@dataclass(frozen=True)
class BatchWorth:
    """What a character seen in a batch of `b` tokens per update is worth, in characters seen at the
    `reference_tokens` per update of the runs behind `SCALING_FIT`: (1 + reference / B) / (1 + b / B), with B the
    critical batch, in tokens (McCandlish et al., 2018, "An Empirical Model of Large-Batch Training": reaching a loss
    takes E = E_min (1 + b / B) examples)."""

    critical_tokens: float  # B
    reference_tokens: float  # the tokens per update at which the worth is 1

    def worth(self, tokens_per_update: float) -> float:
        return (1 + self.reference_tokens / self.critical_tokens) / (1 + tokens_per_update / self.critical_tokens)


BATCH_WORTH = BatchWorth(critical_tokens=1_880, reference_tokens=2_048)  # benchmarks/results/batch_worth.json
"""Fitted by `benchmarks/batch_worth.py` to 11 runs of the recipe at 1,024 to 8,192 tokens per update, for 5 and 10
minutes, read through `SCALING_FIT`, whose runs used 16 streams x 128 tokens."""


@dataclass(frozen=True)
class Layout:
    """How training batches are laid out: `streams` rows (blocks, or streams under stateful BPTT) of `block_size`
    tokens (the BPTT length) per process, over `processes` processes and `accumulation` gradient-accumulation
    steps."""

    streams: int
    block_size: int
    processes: int = 1
    accumulation: int = 1

    @property
    def tokens_per_update(self) -> int:
        """Tokens in one optimizer update, over all processes."""
        return self.streams * self.block_size * self.processes * self.accumulation

    def describe(self) -> str:
        return (f"batches of {self.streams} x {self.block_size} tokens" + (" per process" if self.processes > 1 else "")
                + (f", {self.accumulation} accumulated per update" if self.accumulation > 1 else ""))


CANDIDATE_STREAMS: tuple[int, ...] = (8, 16, 32)
"""Streams (rows of a batch) per process."""
CANDIDATE_BLOCK_SIZES: tuple[int, ...] = (64, 128)
"""The BPTT lengths measured with the recipe (benchmarks/results/recipe/); shorter ones cut the gradient through
more of the text's structure than the batch worth knows of."""
TOKENS_PER_UPDATE_RANGE = (1_024, 8_192)
"""The tokens per update at which `BATCH_WORTH` was measured: layouts outside are not candidates."""
RECIPE_LAYOUT = (DEFAULT_PRESET.training["per_device_train_batch_size"], DEFAULT_PRESET.data["block_size"])


def candidate_layouts(streams: int | None, block_size: int | None, processes: int = 1,
                      accumulation: int = 1) -> list[Layout]:
    """The layouts to choose from, the recipe's (or the nearest to it) first: `CANDIDATE_STREAMS` x
    `CANDIDATE_BLOCK_SIZES`, with a given `streams` or `block_size` in place of its candidates, within
    `TOKENS_PER_UPDATE_RANGE`; if none is, the one with the tokens per update nearest the recipe's."""
    layouts = [Layout(s, b, processes, accumulation)
               for s in (CANDIDATE_STREAMS if streams is None else [streams])
               for b in (CANDIDATE_BLOCK_SIZES if block_size is None else [block_size])]
    recipe = Layout(*RECIPE_LAYOUT, processes, accumulation).tokens_per_update

    def distance(layout: Layout) -> tuple:  # from the recipe: its tokens per update, then its streams
        return abs(math.log(layout.tokens_per_update / recipe)), abs(math.log(layout.streams / RECIPE_LAYOUT[0]))

    layouts.sort(key=distance)
    low, high = TOKENS_PER_UPDATE_RANGE
    return [layout for layout in layouts if low <= layout.tokens_per_update <= high] or layouts[:1]


def seconds_left_to_train(budget_seconds: float, probe_seconds: float) -> float:
    """The seconds of a budget left to train in once measuring took `probe_seconds` of it: at least
    `MIN_TRAINING_SECONDS`."""
    return max(MIN_TRAINING_SECONDS, budget_seconds - probe_seconds)


def with_hidden_size(config: LSTMConfig, hidden_size: int) -> LSTMConfig:
    """A copy of `config` with every layer `hidden_size` units wide."""
    return LSTMConfig(**{**config.to_dict(), "hidden_size": hidden_size})


def layer_parameters(config: LSTMConfig) -> int:
    """Parameters of the LSTM layers of `config`: 4 gates' input and recurrent weights and their two biases."""
    return sum(4 * hidden * (inputs + hidden) + 8 * hidden for inputs, hidden in config.layer_sizes)


@dataclass(frozen=True)
class Measurement:
    """Training speed of one candidate size in one layout on this machine."""

    hidden_size: int
    parameters: int  # of the LSTM layers (`layer_parameters`)
    tokens_per_second: float  # training tokens per second, over all processes
    layout: Layout  # measured in


@dataclass(frozen=True)
class Candidate:
    """A measured size and layout, and what the budget gives it."""

    measurement: Measurement
    characters: float  # expected training characters seen in the budget
    loss: float  # expected validation nats per character: `SCALING_FIT`, at most the untrained model's loss
    worth: float = 1.0  # of a character in this layout (`BatchWorth`)


@dataclass
class SizeChoice:
    """What `size_model` chose, and why."""

    budget_seconds: float  # the whole budget, measuring included
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    probe_seconds: float = 0.0  # spent measuring, out of the budget
    untrained_loss: float = math.inf  # nats per character of the untrained model, ln(vocabulary size): the cap
    other_work_share: float = 0.0  # of this process's CPUs' time, taken by other work while measuring

    @property
    def hidden_size(self) -> int:
        return self.chosen.measurement.hidden_size

    @property
    def training_seconds(self) -> float:
        """The budget's seconds left to train in once measuring is done (`seconds_left_to_train`)."""
        return seconds_left_to_train(self.budget_seconds, self.probe_seconds)

    @property
    def layout(self) -> Layout:
        return self.chosen.measurement.layout

    def describe(self) -> str:
        """One line: the budget, the measured speed, the expected text, and the chosen size and layout."""
        chosen, first = self.chosen, self.candidates[0].measurement.layout if self.candidates else self.layout
        sizes = ", ".join(f"{c.measurement.hidden_size}: {c.loss:.3f}" for c in self.candidates
                          if c is not chosen and c.measurement.layout == first)
        others = [c for c in self.candidates if c.measurement.layout != first]  # all of one size, the best measured
        layouts = ", ".join(f"{c.measurement.layout.streams} x {c.measurement.layout.block_size}: {c.loss:.3f}"
                            for c in others if c is not chosen)
        worth = (f" (each worth {chosen.worth:.2f} of one in batches of {BATCH_WORTH.reference_tokens:,.0f} tokens)"
                 if chosen.worth != 1 else "")
        return (
            f"Sized for a {format_duration(self.budget_seconds)} budget: hidden size {self.hidden_size} "
            f"({chosen.measurement.parameters / 1e6:.2f}M LSTM parameters) in {self.layout.describe()} trains at "
            f"{chosen.measurement.tokens_per_second:,.0f} tokens/s here, so about {chosen.characters / 1e6:.1f}M "
            f"characters in the budget{worth}, for an expected {chosen.loss:.3f} nats/char, the lowest of the sizes "
            f"and layouts measured in {plain_number(round(self.probe_seconds, 1))} s; training takes "
            f"{plain_number(round(self.training_seconds, 1))} s, evaluations included."
            + (f" Other work kept {self.other_work_share:.0%} of this process's CPUs busy while measuring: the speeds, "
               "and so the size, may be low (--hidden_size sets it)." if self.other_work_share > BUSY_SHARE else "")
            + f" Expected nats/char of the others, by hidden size in {first.describe()}: {sizes or 'none'}"
            + (f"; by streams x tokens at hidden size {others[0].measurement.hidden_size}: {layouts}"
               if layouts else "")
            + (f"; below the {FIT_MIN_CHARACTERS / 1e6:.1f}M characters of the fit's shortest run, these expected "
               "losses are rough extrapolations" if chosen.characters < FIT_MIN_CHARACTERS else "")
            + (f"; expected losses are capped at {self.untrained_loss:.3f}, an untrained model's loss (ln of the "
               "vocabulary size)" if any(c.loss == self.untrained_loss for c in self.candidates) else "")
            + "."
        )


@dataclass(frozen=True)
class CpuReading:
    """Clocks read together: wall seconds, this process's CPU seconds, and the busy seconds of the CPUs it may run
    on."""

    wall: float
    own: float
    busy: float
    cpus: int


def read_cpus() -> CpuReading | None:
    """The clocks of `CpuReading` now; busy time from /proc/stat (user, nice, system, irq, softirq and steal, the
    time a hypervisor gave to other guests), None where it cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    ticks = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            ticks += user + nice + system + irq + softirq + steal
    return CpuReading(time.monotonic(), time.process_time(), ticks / os.sysconf("SC_CLK_TCK"), len(cpus))


def other_work_share(before: CpuReading | None, after: CpuReading | None) -> float:
    """The share (0 to 1) of the CPUs' time between two readings that went to other work than this process's (0
    without readings)."""
    if before is None or after is None or after.wall <= before.wall:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(1.0, max(0.0, others / ((after.wall - before.wall) * after.cpus)))


def expected_candidate(measurement: Measurement, budget_seconds: float, unique_characters: float,
                       characters_per_token: float = 1.0, fit: LossFit = SCALING_FIT,
                       untrained_loss: float = math.inf, batch_worth: BatchWorth = BATCH_WORTH) -> Candidate:
    """What `budget_seconds` give the measured size and layout: the characters it trains on, and the fit's expected
    loss at them, each worth what `batch_worth` says of its layout's tokens per update (taken within
    `TOKENS_PER_UPDATE_RANGE`, where it was measured); at most `untrained_loss` (the fit's power law grows without
    bound below its range, a model's loss does not; a budget of no time, as when measuring took all of it, trains on
    nothing)."""
    characters = max(0.0, measurement.tokens_per_second * budget_seconds * TRAINING_SHARE * characters_per_token)
    low, high = TOKENS_PER_UPDATE_RANGE
    worth = batch_worth.worth(min(max(measurement.layout.tokens_per_update, low), high))
    loss = min(untrained_loss, fit.loss(measurement.parameters, characters * worth, unique_characters)
               if characters > 0 else math.inf)
    return Candidate(measurement, characters, loss, worth)


def choose_size(measurements: Sequence[Measurement], budget_seconds: float, unique_characters: float,
                characters_per_token: float = 1.0, fit: LossFit = SCALING_FIT,
                probe_seconds: float = 0.0, untrained_loss: float = math.inf,
                batch_worth: BatchWorth = BATCH_WORTH) -> SizeChoice:
    """The measured size and layout with the lowest expected loss (`expected_candidate`) for `budget_seconds` of
    training on `unique_characters` of text (ties, such as several sizes at the `untrained_loss` cap: the smaller
    size, then the layout measured first, the recipe's or the nearest to it).

    Deterministic given the measurements. Raises `ValueError` if there are none."""
    if not measurements:
        raise ValueError("No candidate size was measured.")
    candidates = [expected_candidate(m, budget_seconds, unique_characters, characters_per_token, fit, untrained_loss,
                                     batch_worth) for m in measurements]
    _, chosen = min(enumerate(candidates), key=lambda pair: (pair[1].loss, pair[1].measurement.hidden_size, pair[0]))
    return SizeChoice(budget_seconds, chosen, candidates, probe_seconds, untrained_loss)


def training_step_seconds(model: LSTMForCausalLM, batch_size: int, block_size: int, bf16: bool,
                          steps: int = 2) -> float:
    """Seconds of the fastest of `steps` training steps (forward, backward, AdamW update) of `model`, on its device, on
    a random batch of (batch_size, block_size) tokens, after one untimed step, with bf16 autocast if `bf16`: other
    work on the CPUs only ever slows a step, and the fastest is the least disturbed. On an accelerator each step is
    timed to the end of its work (the device is synchronised). The model's weights change: measure a throwaway copy."""
    model.train()
    device = model.device
    synchronize = getattr(torch, device.type).synchronize if device.type != "cpu" else lambda: None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(model.config.vocab_size, (batch_size, block_size), device=device)
    times = []
    for _ in range(steps + 1):
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def measure(config: LSTMConfig, hidden_size: int, layout: Layout, bf16: bool,
            device: torch.device | str = "cpu") -> Measurement:
    """Training tokens per second, over all processes, of `config` with `hidden_size` in `layout`, on `device` (the one
    training will use: `training_step_seconds` of one process's batch)."""
    sized = with_hidden_size(config, hidden_size)
    seconds = training_step_seconds(LSTMForCausalLM(sized).to(device), layout.streams, layout.block_size, bf16)
    tokens_per_second = layout.processes * layout.streams * layout.block_size / seconds
    return Measurement(hidden_size, layer_parameters(sized), tokens_per_second, layout)


def size_model(config: LSTMConfig, budget_seconds: float, layouts: Sequence[Layout], bf16: bool,
               unique_characters: float, characters_per_token: float = 1.0, sizes: Sequence[int] | None = None,
               fit: LossFit = SCALING_FIT, clock: Callable[[], float] = time.perf_counter,
               device: torch.device | str = "cpu") -> SizeChoice:
    """Measures (`measure`, on the `device` training will use) the candidate `sizes` (default
    `CANDIDATE_HIDDEN_SIZES`) of `config` from the smallest up in the first of `layouts` (`candidate_layouts`), then
    the best of them in the other layouts, and chooses one size and layout (`choose_size`); `budget_seconds` includes
    the time spent measuring.

    Measuring sizes stops at the first whose expected loss is no lower than the previous one's (for a given budget
    the expected loss falls, then rises, with the size); all measuring stops before a measurement expected to end
    past `PROBE_SHARE` of the budget. Expected losses are at most the untrained model's, ln(`config.vocab_size`) nats
    per token. The choice records how busy other work kept the CPUs meanwhile (`other_work_share`). Raises
    `ValueError` without layouts.
    """
    if not layouts:
        raise ValueError("No candidate layout to measure.")
    untrained_loss = math.log(config.vocab_size) / characters_per_token
    start, cpus_before = clock(), read_cpus()

    def expected(measurement: Measurement) -> Candidate:
        return expected_candidate(measurement, budget_seconds, unique_characters, characters_per_token, fit,
                                  untrained_loss)

    measurements: list[Measurement] = []
    durations: list[float] = []  # seconds each measurement took

    def measured_within_share(hidden_size: int, layout: Layout) -> bool:
        """Measures `hidden_size` in `layout` unless the measurement is expected to end past `PROBE_SHARE` of the
        budget (the first is always made): it takes about as long as the last, times the ratio of their steps' work,
        parameters times tokens."""
        if measurements:
            last, parameters = measurements[-1], layer_parameters(with_hidden_size(config, hidden_size))
            work = parameters * layout.streams * layout.block_size
            last_work = last.parameters * last.layout.streams * last.layout.block_size
            if clock() - start + durations[-1] * work / last_work > PROBE_SHARE * budget_seconds:
                return False
        began = clock()
        measurements.append(measure(config, hidden_size, layout, bf16, device))
        durations.append(clock() - began)
        return True

    for hidden_size in sorted(sizes or CANDIDATE_HIDDEN_SIZES):
        if not measured_within_share(hidden_size, layouts[0]):
            break
        if len(measurements) > 1 and expected(measurements[-1]).loss >= expected(measurements[-2]).loss:
            break
    best = min(measurements, key=lambda m: (expected(m).loss, m.hidden_size)).hidden_size
    for layout in layouts[1:]:
        if not measured_within_share(best, layout):
            break
    probe_seconds = clock() - start
    choice = choose_size(measurements, budget_seconds - probe_seconds, unique_characters, characters_per_token, fit,
                         probe_seconds, untrained_loss)
    choice.budget_seconds = budget_seconds
    choice.other_work_share = other_work_share(cpus_before, read_cpus())
    return choice
