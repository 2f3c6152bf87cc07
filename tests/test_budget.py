"""Training for a time budget (`--max_time`): the duration parser, the stopping rule and the schedule over time (on an
injected clock), resuming with the budget left, the card, and DDP processes stopping together."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerControl, TrainerState

from lm_lstm.arguments import DataArguments, LSTMTrainingArguments, ModelArguments
from lm_lstm.budget import (NO_STEP_LIMIT, BudgetProgressCallback, TimeBudget, checkpoint_state, format_duration,
                            learning_rate_factor, parse_duration)
from lm_lstm.data import collate_blocks
from lm_lstm.trainer import LSTMTrainer, saved_training_args
from lm_lstm.training import train

from conftest import tiny_model

TESTS = Path(__file__).resolve().parent
PEAK = 1e-2


class StepClock(TrainerCallback):
    """A clock that training moves: `step_seconds` at each optimizer step, `eval_seconds` at each evaluation. Listed
    before the `TimeBudget` it drives, so that the budget reads the clock after it has moved."""

    def __init__(self, step_seconds: float = 1.0, eval_seconds: float = 0.0, now: float = 0.0):
        self.step_seconds, self.eval_seconds, self.now = step_seconds, eval_seconds, now

    def __call__(self) -> float:
        return self.now

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.now += self.step_seconds

    def on_evaluate(self, args, state, control, **kwargs):
        self.now += self.eval_seconds


def budget_callbacks(clock: StepClock) -> list[TrainerCallback]:
    return [clock, TimeBudget(clock)]


@pytest.mark.parametrize("value, seconds", [
    (600, 600.0), (12.5, 12.5), ("600", 600.0), ("30s", 30.0), ("10m", 600.0), ("1.5h", 5400.0), (" 2 M ", 120.0),
    (0, None), ("0", None), ("none", None), ("None", None), (None, None),
])
def test_durations_parse_to_seconds(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["ten minutes", "-5", -1, "10d", "", "inf", math.nan, "1e3", "m"])
def test_bad_durations_raise_one_line_naming_the_option(value):
    with pytest.raises(ValueError, match="^--max_time: expected seconds") as error:
        parse_duration(value)
    assert "\n" not in str(error.value)


def test_durations_format_in_the_largest_unit():
    assert [format_duration(s) for s in (600, 90, 45, 3600, 5400, 100, 0.5, 1e7, 1e-5)] == [
        "10 min", "1.5 min", "45 s", "1 h", "1.5 h", "100 s", "0.5 s", "10,000,000 s", "0.00001 s"]


def arguments(tmp_path, **overrides) -> LSTMTrainingArguments:
    values = dict(output_dir=str(tmp_path), bf16=False, report_to="none", disable_tqdm=True, eval_strategy="no",
                  eval_on_start=False, save_strategy="no", load_best_model_at_end=False, logging_steps=1,
                  per_device_train_batch_size=2, learning_rate=PEAK, warmup_steps=4, seed=0)
    return LSTMTrainingArguments(**{**values, **overrides})


def test_step_and_epoch_limits_under_a_budget(tmp_path):
    assert arguments(tmp_path, max_time="20s").max_steps == NO_STEP_LIMIT  # the budget alone ends training
    assert arguments(tmp_path, max_time="20s", max_steps=8).max_steps == 8
    epochs = arguments(tmp_path, max_time="20s", num_train_epochs=2)
    assert (epochs.max_steps, epochs.num_train_epochs) == (-1, 2)  # Trainer's own epoch limit
    steps_only = arguments(tmp_path, max_time="none")
    assert (steps_only.max_time, steps_only.max_steps, steps_only.num_train_epochs) == (None, -1, 3.0)
    assert arguments(tmp_path, max_time="20s", max_steps=10, logging_steps=0.5).logging_steps == 0.5  # of 10 steps


def test_the_default_budget_applies_only_without_a_step_or_epoch_limit(tmp_path):
    assert arguments(tmp_path).max_time == 600  # the default recipe: 10 minutes
    assert arguments(tmp_path, max_steps=2500).max_time is None  # the 2,500-step recipe runs all its steps
    assert arguments(tmp_path, num_train_epochs=1).max_time is None
    assert arguments(tmp_path, max_steps=2500, max_time="10m").max_time == 600  # both given: the first limit wins


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_scheduler_type="polynomial"), "--lr_scheduler_type must be one of cosine, linear"),
    (dict(lr_scheduler_kwargs={"num_cycles": 2}), "--lr_scheduler_kwargs is not supported with --max_time"),
    (dict(logging_steps=0.5), "--logging_steps 0.5 is a fraction of the training steps"),
])
def test_options_a_budget_cannot_honour_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        arguments(tmp_path, max_time="20s", **overrides)


def blocks(count: int = 64, length: int = 12) -> list[dict[str, list[int]]]:
    ids = torch.randint(3, 40, (count, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row.tolist()} for row in ids]


@pytest.mark.parametrize("max_steps, steps, limit", [(-1, 20, "time"), (8, 8, "steps")])
def test_the_first_limit_ends_training_and_the_schedule(tmp_path, max_steps, steps, limit):
    """20 s of budget at 1 s a step: the time ends training at step 20, or --max_steps 8 at step 8; either way the
    cosine (after 4 warm-up steps) reaches zero where training stops."""
    clock = StepClock()
    trainer = LSTMTrainer(model=tiny_model().train(), args=arguments(tmp_path, max_time=20, max_steps=max_steps),
                          train_dataset=blocks(), data_collator=collate_blocks, callbacks=budget_callbacks(clock))
    trainer.train()
    assert trainer.state.global_step == steps and trainer.training_limit() == limit
    assert clock.now == steps
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # Step k runs at the rate set after step k - 1: warm-up (k - 1) / 4, cosine at (k - 1) of `steps`.
    expected = [PEAK * min(1, (k - 1) / 4) * 0.5 * (1 + math.cos(math.pi * (k - 1) / steps))
                for k in range(1, steps + 1)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert set(trainer.lr_scheduler.get_last_lr()) == {0.0}  # the schedule's end, at the budget or the step limit


@pytest.mark.parametrize("max_time", [100, None])
def test_an_epoch_limit_is_named_as_one(tmp_path, max_time):
    """Trainer turns --num_train_epochs into a step count: the run still ended by its epochs, not by a step limit."""
    trainer = LSTMTrainer(model=tiny_model().train(), train_dataset=blocks(), data_collator=collate_blocks,
                          args=arguments(tmp_path, max_time=max_time, num_train_epochs=0.25),
                          callbacks=budget_callbacks(StepClock()))
    trainer.train()
    assert trainer.state.global_step == 8 and trainer.training_limit() == "epochs"  # a quarter of 32 batches


def test_learning_rate_factor_warms_up_by_steps_or_by_a_fraction_of_the_time():
    assert learning_rate_factor(2, 0.5, warmup=4, schedule="linear") == pytest.approx(0.5 * 0.5)
    assert learning_rate_factor(2, 0.05, warmup=0.1, schedule="constant_with_warmup") == pytest.approx(0.5)
    assert learning_rate_factor(0, 0.0, warmup=4, schedule="constant") == 1.0
    assert learning_rate_factor(500, 1.0, warmup=100, schedule="cosine", min_lr_rate=0.1) == pytest.approx(0.1)


def run_train(corpus, output, callbacks, hidden_size: int | None = 32, **overrides):
    """`train()` of a tiny model (`hidden_size` None: sized for the budget) on `corpus`, `overrides` its arguments."""
    model_args = ModelArguments(tokenizer_type="char", embedding_size=16, hidden_size=hidden_size)
    data_args = DataArguments(train_file=[str(corpus)], block_size=32)
    training_args = arguments(output, per_device_train_batch_size=4, per_device_eval_batch_size=4, **overrides)
    return train(model_args, data_args, training_args, callbacks=callbacks)


def test_training_leaves_time_for_the_evaluations_and_the_card_names_the_limit(corpus, tmp_path):
    """Evaluations take 3 s on the clock: after the one at the start, 6 s are kept for an evaluation at the stopping
    step and the final one. Training stops at step 8 (8 steps + 2 evaluations = 14 s), and the whole job ends within the
    20 s budget: the final evaluation is the one at the stopping step, whose weights are the final ones."""
    clock = StepClock(eval_seconds=3.0)
    result = run_train(corpus, tmp_path / "model", budget_callbacks(clock), max_time=20, eval_strategy="steps",
                       eval_steps=5, save_strategy="steps", save_steps=5, eval_on_start=True,
                       load_best_model_at_end=True)
    history = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert history["global_step"] == 8
    evaluations = [entry["step"] for entry in history["log_history"] if "eval_loss" in entry]
    assert evaluations == [0, 5, 8]  # the start, every 5 steps, the stopping step (train() reuses its metrics)
    assert (result.output_dir / "checkpoint-8").is_dir()
    assert clock.now == 17.0  # within the 20 s budget: the reserve kept for a final evaluation was not needed
    card = (result.output_dir / "README.md").read_text()
    assert "| time budget | 20 s of training, evaluations included |" in card
    # Why it stopped 6 s before the budget: 2 x 3 s kept (the longest evaluation, from the start), 14 s spent.
    assert "| steps | 8 (" in card and ("ended by the time budget (20 s), stopping 6 s before its end to leave time "
                                         "for the last evaluations and saves (twice the longest pause between steps "
                                         "so far, 3 s) |") in card


def test_resumed_run_trains_for_the_budget_it_had_left(corpus, tmp_path):
    """A 12 s budget at 1 s a step ends at step 12; resumed from step 4 (its clock elsewhere), the run trains the 8 s
    it had left, on the same schedule, to the same weights."""
    def run(output, clock, resume=None):
        run_train(corpus, output, budget_callbacks(clock), max_time=12, save_strategy="steps", save_steps=4,
                  save_total_limit=None, resume_from_checkpoint=resume)
        return json.loads((output / "trainer_state.json").read_text()), load_file(output / "model.safetensors")

    state, uninterrupted = run(tmp_path / "a", StepClock())
    assert state["global_step"] == 12
    checkpoint = tmp_path / "a" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["TimeBudget"]
    assert saved["attributes"]["elapsed_before"] == 4.0
    clock = StepClock(now=1000.0)
    state, resumed = run(tmp_path / "b", clock, resume=str(checkpoint))
    assert state["global_step"] == 12 and clock.now == 1008.0
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=0, rtol=0)


@pytest.mark.parametrize("content, reason", [
    ('{"global_step": 4, "log_hi', r"not JSON \(Unterminated string"),
    (b"\xff\xfe", r"not JSON \('utf-8' codec"),
    ("[]", "not a JSON object"),
    ('{"train_batch_size": 8}', "no global_step"),
    ('{"global_step": NaN, "train_batch_size": 8}', "its global_step is nan"),
    ('{"global_step": 4, "train_batch_size": 8, "stateful_callbacks": []}', r"its stateful_callbacks is \[\]"),
])
def test_a_damaged_trainer_state_is_a_one_line_error_naming_it(tmp_path, content, reason):
    """A truncated, binary or misshapen checkpoint file is refused in one line naming it, before any work, not by a
    decoding error or a traceback from deep inside Trainer once training has run."""
    path = tmp_path / "trainer_state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: damaged, {reason}.*; resume from another checkpoint"):
        checkpoint_state(tmp_path)


def test_checkpoint_files_from_another_transformers_or_with_wrong_values_are_refused(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"global_step": 4, "train_batch_size": 8, "bogus": 1}')
    with pytest.raises(ValueError, match=r"trainer_state.json: holds bogus, which transformers .* does not know"):
        checkpoint_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text('{"global_step": 4, "train_batch_size": 8}')
    assert checkpoint_state(tmp_path).global_step == 4
    (tmp_path / "training_args.json").write_text('{"learning_rate": "fast"}')
    with pytest.raises(ValueError, match=r"training_args.json: damaged, its learning_rate is 'fast'; resume from "):
        saved_training_args(tmp_path)
    (tmp_path / "training_args.json").write_text("3")
    with pytest.raises(ValueError, match=r"training_args.json: damaged, not a JSON object; "):
        saved_training_args(tmp_path)


def test_a_finished_run_is_not_resumed_by_one_more_step(corpus, tmp_path):
    """Trainer would train one more step from the last checkpoint of a finished run, at the schedule's end: the
    resumed run asks for a larger limit instead, and trains on to it when given one."""
    steps = dict(save_strategy="steps", save_steps=3, save_total_limit=None)
    run_train(corpus, tmp_path / "a", [], max_steps=6, **steps)
    with pytest.raises(ValueError, match=r"checkpoint-6: its run is at step 6, and --max_steps is 6; give a larger "):
        run_train(corpus, tmp_path / "b", [], max_steps=6, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*/a/nothing: no such folder.$"):
        run_train(corpus, tmp_path / "b", [], max_steps=6, resume_from_checkpoint=str(tmp_path / "a" / "nothing"))
    (tmp_path / "a" / "runs").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*/a/runs: not a checkpoint \(no trainer_state.json "):
        run_train(corpus, tmp_path / "b", [], max_steps=6, resume_from_checkpoint=str(tmp_path / "a" / "runs"))
    with pytest.raises(ValueError, match=r"/a: no optimizer state \(optimizer.pt\) to resume from: a finished run's "):
        run_train(corpus, tmp_path / "b", [], max_steps=8, resume_from_checkpoint=str(tmp_path / "a"))
    assert not (tmp_path / "b").exists()  # refused before any work
    # another rate than the checkpoint's: Trainer would go on at the checkpoint's, whatever the arguments say
    with pytest.raises(ValueError, match=r"^--learning_rate 0.001: the run of .*checkpoint-6 trains at 0.01, and a "):
        run_train(corpus, tmp_path / "a", [], max_steps=8, resume_from_checkpoint=True, learning_rate=1e-3)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    # its last checkpoint; a rate left to the recipe is the checkpoint's
    run_train(corpus, tmp_path / "a", [], max_steps=8, resume_from_checkpoint="True", learning_rate=None, **steps)
    assert json.loads((tmp_path / "a" / "trainer_state.json").read_text())["global_step"] == 8
    assert json.loads((tmp_path / "a" / "training_args.json").read_text())["learning_rate"] == PEAK
    # resuming into another folder does not replace the model there
    with pytest.raises(ValueError, match=r"--output_dir .*/a already holds a model"):
        run_train(corpus, tmp_path / "a", [], max_steps=6, resume_from_checkpoint=str(tmp_path / "other" / "checkpoint-3"))
    # a step-limited run resumed under a time budget: its checkpoints had no `TimeBudget` state to update
    run_train(corpus, tmp_path / "a", budget_callbacks(StepClock()), max_steps=10, max_time=100,
              resume_from_checkpoint=True, **steps)
    state = json.loads((tmp_path / "a" / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and state["stateful_callbacks"]["TimeBudget"]["attributes"]["elapsed_before"] == 1

    # the time budget: 12 s at 1 s a step ends at step 12, with a checkpoint there
    run_train(corpus, tmp_path / "c", budget_callbacks(StepClock()), max_time=12, save_strategy="steps",
              save_steps=5, save_total_limit=None)
    with pytest.raises(ValueError, match=r"checkpoint-12: its run already spent --max_time 12 s \(12 s trained"):
        run_train(corpus, tmp_path / "d", budget_callbacks(StepClock()), max_time=12,
                  resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-12"))
    clock = StepClock(now=100.0)
    run_train(corpus, tmp_path / "d", budget_callbacks(clock), max_time=15,
              resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-12"))
    assert json.loads((tmp_path / "d" / "trainer_state.json").read_text())["global_step"] == 15 and clock.now == 103.0


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from transformers import TrainerCallback
from test_budget import StepClock, budget_callbacks, run_train
import lm_lstm.sizing as sizing
from lm_lstm.sizing import Measurement

class Record(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        torch.save({{"steps": state.global_step, "weights": model.state_dict()}}, {output!r} + f"/rank{{rank}}.pt")

rank = int(os.environ["RANK"])
clock = StepClock(step_seconds=1.0 + rank)  # process 1's clock runs twice as fast as process 0's
# Each process would choose another size: the hidden size 32 is fast on process 0 and slow on process 1.
sizing.CANDIDATE_HIDDEN_SIZES = (16, 32)
sizing.measure = lambda config, size, layout, bf16, device: Measurement(size, size, 1e6 if (size == 32) == (rank == 0) else 1.0,
                                                              layout)
# The faster, the better, whatever the fit says of such tiny models on this tiny text.
sizing.expected_candidate = lambda measurement, budget, *args: sizing.Candidate(
    measurement, measurement.tokens_per_second * budget, 1 / measurement.tokens_per_second)
run_train({corpus!r}, {output!r}, [*budget_callbacks(clock), Record()], hidden_size=None, max_time=12, ddp_timeout=60)
"""


def test_ddp_processes_agree_on_the_size_and_the_time_and_stop_at_the_same_step(corpus, tmp_path):
    """Under torchrun (2 processes, gloo) each process reads its own clock, one twice as fast as the other; they
    agree on the larger time spent, so both stop at step 6 (12 s at 2 s a step) with the same weights. The model size
    is the one process 0 measured and chose, although process 1's measurements would choose another."""
    script = tmp_path / "ddp_budget.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS), corpus=str(corpus), output=str(tmp_path))))
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    try:
        _, stderr = torchrun.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # processes stopping at different steps wait for each other for ever
        os.killpg(torchrun.pid, signal.SIGKILL)
        raise
    assert torchrun.returncode == 0, stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["steps"] for r in ranks] == [6, 6]
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], weight, atol=0, rtol=0)
    assert ranks[0]["weights"]["model.layers.0.rnn.weight_hh_l0"].shape == (4 * 32, 32)
    card = (tmp_path / "README.md").read_text()
    assert "ended by the time budget (12 s)" in card and "| model size | Sized for a 12 s budget: hidden size 32 (" in card


def test_the_progress_bar_runs_over_the_budget_seconds(tmp_path):
    """With only the budget to end training, the bar's total is the budget in seconds, its position the time spent
    (a resumed run's counting its checkpoint's), with the step beside it; a step limit keeps Trainer's step bar."""
    clock = StepClock(now=500.0)
    bar = BudgetProgressCallback(clock)
    args, control = arguments(tmp_path, max_time="1m"), TrainerControl()
    state = TrainerState(max_steps=NO_STEP_LIMIT, global_step=3, is_world_process_zero=True,
                         stateful_callbacks={"TimeBudget": {"attributes": {"elapsed_before": 20.0}}})
    bar.on_train_begin(args, state, control)
    assert (bar.training_bar.total, bar.training_bar.n) == (60, 20)
    redraws, bar.training_bar.mininterval = [], 0  # tqdm's own limit off: the callback's is the one tested
    bar.training_bar.refresh = lambda *a, **k: redraws.append(bar.training_bar.n)
    for clock.now, state.global_step in [(512.1, 4), (512.4, 5)]:
        bar.on_step_end(args, state, control)
    assert bar.training_bar.n == 32 and bar.training_bar.postfix == "step 5"
    assert "training time:  53%|" in str(bar.training_bar)
    assert "| 32/60 s [" in str(bar.training_bar) and ", step 5]" in str(bar.training_bar)
    assert "s/s" not in str(bar.training_bar)
    assert redraws == [32]  # once per second of the budget, not at every step
    clock.now = 600.0
    bar.on_step_end(args, state, control)
    assert bar.training_bar.n == 60  # no further than the total
    bar.on_train_end(args, state, control)

    stepped = BudgetProgressCallback(clock)
    stepped.on_train_begin(args, TrainerState(max_steps=8, is_world_process_zero=True), control)
    assert stepped.training_bar.total == 8 and stepped.training_bar.unit == "it"
