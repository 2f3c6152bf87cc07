"""Training for a time budget (`--max_time`): the stopping rule, the learning-rate schedule over time, and the
duration parser.

A run with `--max_time` trains until its training time is spent, or until `--max_steps` (or, when given,
`--num_train_epochs`) is reached, whichever comes first. Training time counts from the start of training,
evaluations and checkpoints included, and adds up over resumptions: checkpoints keep it (`trainer_state.json`, as
`TimeBudget`'s stateful-callback state), so a resumed run trains for the time it had left. Training stops early
enough to leave time for what follows it (an evaluation and a checkpoint at the stopping step, then the final
evaluation and save), estimated from the evaluations and checkpoints measured so far. The learning rate warms up
over its steps, then decays over the time (or the steps, if they run out first): the schedule ends where training
does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
import transformers
from transformers import ProgressCallback, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from .messages import first_line

NO_STEP_LIMIT = sys.maxsize
"""`max_steps` of a run that only its time budget ends: `--max_time` without `--max_steps` or `--num_train_epochs`."""

DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1 - progress,
    "constant_with_warmup": lambda progress: 1.0,
    "constant": lambda progress: 1.0,  # as Trainer's "constant": no warm-up either
}
"""The `--lr_scheduler_type` values a time budget can follow: each decay, from 1 at the start to 0 at the end."""

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", re.IGNORECASE)


def parse_duration(value: float | str | None, option: str = "--max_time") -> float | None:
    """Seconds from a duration: a number of seconds (`600`, `"600"`) or a number with a unit (`"30s"`, `"10m"`,
    `"1.5h"`). `None`, `0` and `"none"` mean no time limit (`None`).

    Raises `ValueError` naming `option` for anything else (negative, not a number, an unknown unit).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = DURATION.fullmatch(str(value))
        seconds = float(match.group(1)) * UNITS[match.group(2).lower()] if match else math.nan
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{option}: expected seconds or a duration such as 30s, 10m or 1h (0 or 'none': no time "
                         f"limit), got {value!r}.")
    return seconds or None


def plain_number(value: float) -> str:
    """`value` to 10 significant digits, with thousands separators and never in exponent notation: 10,000,000 (not
    1e+07), 0.00001 (not 1e-05), 99.99999 (not 100)."""
    return f"{Decimal(f'{value:.10g}'):,f}"


def format_duration(seconds: float) -> str:
    """`seconds` in the largest unit that divides it to a tenth: '10 min', '1.5 h', '45 s', '10,000,001 s'."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and (seconds / size * 10) % 1 == 0:
            return f"{plain_number(seconds / size)} {unit}"
    return f"{plain_number(seconds)} s"


EVALUATION_SHARE = 0.05
"""The share of a time budget one evaluation may take by default: the validation text carved from the training text
is cut to fit it (`--max_eval_tokens`), and the evaluation before training is skipped when it would not fit."""


@torch.no_grad()
def evaluation_speed(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False,
                     min_seconds: float = 1.0) -> float:
    """Tokens per second that `model` scores in evaluation, measured on one batch (`input_ids` of shape
    `(rows, block_size)`) passed forward with its loss repeatedly (after one warm-up) for at least `min_seconds`
    seconds and three passes, under bf16 autocast if `bf16`. The model's training mode is restored."""
    was_training = model.training
    model.eval()
    input_ids = batch["input_ids"].to(model.device)
    passes, start = -1, 0.0  # the first pass warms up, untimed
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        while passes < 3 or time.perf_counter() - start < min_seconds:
            model(input_ids=input_ids, labels=input_ids, use_cache=False)
            passes += 1
            if passes == 0:
                start = time.perf_counter()
    model.train(was_training)
    return passes * input_ids.numel() / (time.perf_counter() - start)


def learning_rate_factor(step: int, progress: float, warmup: float = 0, schedule: str = "cosine",
                         min_lr_rate: float = 0.0) -> float:
    """The learning rate at optimizer step `step`, as a fraction of the peak, when `progress` (0 to 1) of training is
    done: a linear warm-up over the first `warmup` steps (a fraction of the progress if `warmup` < 1), times the
    decay of `schedule` (a key of `DECAYS`) from 1 at progress 0 to `min_lr_rate` at progress 1.
    """
    if schedule == "constant" or not warmup:
        ramp = 1.0
    else:
        ramp = min(1.0, (step if warmup >= 1 else progress) / warmup)
    return ramp * (min_lr_rate + (1 - min_lr_rate) * DECAYS[schedule](progress))


def budget_seconds(args: TrainingArguments) -> float | None:
    """The time budget of `args` in seconds: `LSTMTrainingArguments.max_time` (None for arguments without one)."""
    return getattr(args, "max_time", None)


def check_budget_arguments(args: TrainingArguments) -> None:
    """Raises `ValueError` for training options that a time budget (`args.max_time`) cannot honour."""
    if args.max_time is None:
        return
    schedule = SchedulerType(args.lr_scheduler_type).value
    if schedule not in DECAYS:
        raise ValueError(f"--max_time schedules the learning rate over time: --lr_scheduler_type must be one of "
                         f"{', '.join(DECAYS)}, got {schedule} (or train by steps: --max_time none).")
    if args.lr_scheduler_kwargs:
        raise ValueError("--lr_scheduler_kwargs is not supported with --max_time (the schedule is over time).")
    if args.max_steps == NO_STEP_LIMIT:
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name)
            if value is not None and 0 < value < 1:
                raise ValueError(f"--{name} {value} is a fraction of the training steps, which --max_time alone "
                                 "leaves open: give a number of steps, or --max_steps.")


def largest_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Each of `values`, the largest over the processes of a distributed run (the values themselves otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class TimeBudget(TrainerCallback, ExportableState):
    """Ends training when `args.max_time` seconds of training time are spent, and gives the learning-rate schedule
    its progress (`schedule`). `LSTMTrainer` adds one when `args.max_time` is set and none was passed.

    Training time counts from `on_train_begin`, evaluations and checkpoints included, plus the training time of the
    checkpoint a run resumed from (kept in `trainer_state.json` as this callback's state, and restored whatever
    `restore_callback_states_from_checkpoint` says: it is part of the run's progress, as the step count is).
    Training stops after the first step at which the time spent plus a reserve reaches the budget; the reserve is
    twice the longest pause between two steps so far (an evaluation and a checkpoint): once for the evaluation and
    checkpoint of the stopping step, once for the final evaluation and save that `lm_lstm.training.train` does. At
    that step, as at the last of `--max_steps`, the model is evaluated (step-based `eval_strategy`) and saved
    (step-based `save_strategy`). Under DDP the processes take, at every step, the largest time spent and reserve
    over them: they follow the same schedule and stop at the same step.

    Args:
        clock: returns seconds from any fixed origin (default `time.monotonic`); tests inject their own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.seconds: float | None = None  # the budget, `args.max_time`
        self.elapsed_before = 0.0  # training seconds of the sessions before this one (a resumed run's checkpoint)
        self.longest_pause = 0.0  # seconds, between two training steps
        self.started: float | None = None  # clock reading at `on_train_begin`
        self.paused_at: float | None = None  # clock reading at the end of the last step (or the start of training)
        self.time_progress = 0.0  # fraction of the budget, less the reserve, spent at the last step (all processes)
        self.seconds_left = math.inf  # of the budget at the last step (all processes)
        self.reserve = 0.0  # seconds kept at the last step for what follows training (all processes)
        self.stopped_training = False  # whether the budget ended the last training

    def elapsed(self) -> float:
        """Training seconds spent so far by this run, over resumptions (this process's clock)."""
        return self.elapsed_before + (0.0 if self.started is None else self.clock() - self.started)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"elapsed_before": self.elapsed(), "longest_pause": self.longest_pause}}

    def schedule(self, optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int) -> LambdaLR:
        """`args.lr_scheduler_type` over the budget (`learning_rate_factor`), its progress the larger of the time
        spent (`time_progress`) and the steps done out of `num_training_steps`: it ends where training ends."""
        schedule = SchedulerType(args.lr_scheduler_type).value

        def factor(step: int) -> float:
            progress = min(1.0, max(self.time_progress, step / num_training_steps))
            return learning_rate_factor(step, progress, args.warmup_steps, schedule)

        return LambdaLR(optimizer, factor)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = saved_budget_state(state)
        self.elapsed_before = saved.get("elapsed_before", 0.0)
        self.longest_pause = saved.get("longest_pause", 0.0)
        self.seconds = budget_seconds(args)
        self.started = self.paused_at = self.clock()
        self.time_progress = 0.0
        self.seconds_left = math.inf
        self.reserve = 0.0
        self.stopped_training = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.paused_at is not None:
            self.longest_pause = max(self.longest_pause, self.clock() - self.paused_at)
            self.paused_at = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Before the scheduler's step, which reads `time_progress`; the same on every process.
        if self.seconds is None:
            return
        elapsed, self.reserve = largest_over_processes([self.elapsed(), 2 * self.longest_pause], args.device)
        self.seconds_left = self.seconds - elapsed
        training_seconds = self.seconds - self.reserve
        self.time_progress = 1.0 if training_seconds <= 0 else min(1.0, elapsed / training_seconds)

    def on_step_end(self, args, state, control, **kwargs):
        self.paused_at = self.clock()
        if self.time_progress < 1.0:
            return
        self.stopped_training = control.should_training_stop = True
        if args.eval_strategy == IntervalStrategy.STEPS and args.eval_delay <= state.global_step:
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True

    def on_train_end(self, args, state, control, **kwargs):
        self.paused_at = None  # what follows training is not a pause between steps

    def describe_stop(self) -> str:
        """Why the budget ended training where it did: 'stopping 116.2 s before its end to leave time for the last
        evaluations and saves (twice the longest pause between steps so far, 58 s)'; '' when it did not end
        training. The pauses are those of evaluations and checkpoints, and of the start of an epoch's data."""
        if not self.stopped_training:
            return ""
        return (f"stopping {plain_number(round(max(0.0, self.seconds_left), 1))} s before its end to leave time for "
                "the last evaluations and saves (twice the longest pause between steps so far, "
                f"{plain_number(round(self.reserve / 2, 1))} s)")


def saved_budget_state(state: TrainerState) -> dict:
    """The `TimeBudget` attributes that `state` (of a checkpoint a run resumes from) holds, if any."""
    return state.stateful_callbacks.get(TimeBudget.__name__, {}).get("attributes", {})


def read_checkpoint_file(path: Path, fields: dict[str, type | tuple[type, ...]],
                         required: tuple[str, ...] = ()) -> dict:
    """One of a checkpoint's JSON files: an object whose `fields` have the given types where present, and which holds
    the `required` ones. Raises `ValueError` naming the file otherwise (a damaged checkpoint)."""

    def damaged(reason: str) -> ValueError:
        return ValueError(f"{path}: damaged, {reason}; resume from another checkpoint.")

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise damaged(f"not JSON ({first_line(error)})") from None
    if not isinstance(saved, dict):
        raise damaged("not a JSON object")
    problems = [f"no {name}" for name in required if name not in saved] + [
        f"its {name} is {saved[name]!r}" for name, kind in fields.items()
        if name in saved and not isinstance(saved[name], kind)
    ]
    if problems:
        raise damaged(", ".join(problems))
    return saved


def checkpoint_state(checkpoint: str | Path) -> TrainerState:
    """The `TrainerState` a checkpoint saved (`trainer_state.json`); raises `ValueError` when it is damaged or holds
    fields this version of transformers does not know (a newer one wrote it: `Trainer` could not resume from it)."""
    path = Path(checkpoint) / TRAINER_STATE_NAME
    saved = read_checkpoint_file(path, {"global_step": int, "train_batch_size": int, "stateful_callbacks": dict},
                                 required=("global_step", "train_batch_size"))
    unknown = sorted(set(saved) - {field.name for field in dataclasses.fields(TrainerState)})
    if unknown:
        raise ValueError(f"{path}: holds {', '.join(unknown)}, which transformers {transformers.__version__} does not "
                         "know: the checkpoint was written by another version; resume with that one.")
    return TrainerState(**saved)


def check_limits_left(checkpoint: str | Path, args: TrainingArguments) -> None:
    """Raises `ValueError` when the run of `checkpoint` already reached `args.max_steps` or spent `args.max_time`
    (the `TimeBudget` stopping rule on its saved state): `Trainer` would still train one more step from it, at the
    schedule's end."""
    state = checkpoint_state(checkpoint)
    if 0 < args.max_steps != NO_STEP_LIMIT and state.global_step >= args.max_steps:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: its run is at step {state.global_step}, and "
                         f"--max_steps is {args.max_steps}; give a larger --max_steps to train further.")
    seconds = budget_seconds(args)
    saved = saved_budget_state(state)
    if seconds is not None and saved.get("elapsed_before", 0.0) + 2 * saved.get("longest_pause", 0.0) >= seconds:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: its run already spent --max_time "
                         f"{format_duration(seconds)} ({saved['elapsed_before']:.0f} s trained, and the time its final "
                         "evaluation and save take); give a longer --max_time to train further.")


class BudgetProgressCallback(ProgressCallback):
    """Trainer's progress bar; when only the time budget ends training (no step total), a bar over the budget's
    seconds (a resumed run's starting where its checkpoint left it), with the step count beside it.

    Args:
        clock: returns seconds from any fixed origin (default `time.monotonic`); tests inject their own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock
        self.started: float | None = None  # clock reading at which the run's budget would have started

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != NO_STEP_LIMIT:
            return super().on_train_begin(args, state, control, **kwargs)
        elapsed_before = saved_budget_state(state).get("elapsed_before", 0.0)
        self.started = self.clock() - elapsed_before
        if state.is_world_process_zero:
            # No rate: it would read "1.00s/s", seconds of budget per second.
            self.training_bar = tqdm(total=round(budget_seconds(args)), initial=round(elapsed_before), unit="s",
                                     desc="training time", dynamic_ncols=True,
                                     bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps != NO_STEP_LIMIT:
            return super().on_step_end(args, state, control, **kwargs)
        if state.is_world_process_zero:
            seconds = min(self.training_bar.total, round(self.clock() - self.started))
            self.training_bar.set_postfix_str(f"step {state.global_step}", refresh=False)
            if seconds != self.training_bar.n:  # redrawn once a second, not at every step: a log file keeps each one
                self.training_bar.update(seconds - self.training_bar.n)
        self.current_step = state.global_step
