"""`LSTMTrainer`: `transformers.Trainer` for LSTM language models."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from transformers import ProgressCallback, Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from .arguments import LSTMTrainingArguments
from .averaging import NonMonotonicAveraging
from .budget import (NO_STEP_LIMIT, BudgetProgressCallback, TimeBudget, budget_seconds, check_limits_left,
                     read_checkpoint_file)
from .evaluation import perplexity
from .hub import push_folder
from .presets import recipe_learning_rate
from .streams import STREAM_COLUMNS, StatefulBPTT

TRAINING_ARGS_JSON = "training_args.json"


def checkpoint_to_resume(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint `resume_from_checkpoint` names: itself, or for True the last one in `output_dir` (None when
    there is none, or nothing to resume).

    Raises `ValueError` when the folder is missing or not a checkpoint: no `trainer_state.json`, or no optimizer
    state (a finished run's folder, or a checkpoint saved with `--save_only_model`: Trainer would go on with a new
    optimizer)."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if not resume_from_checkpoint:
        return None
    folder = Path(resume_from_checkpoint)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {folder}: no such folder.")
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"--resume_from_checkpoint {folder}: not a checkpoint (no {TRAINER_STATE_NAME} in it); name "
                         "a checkpoint-N folder, or give True for the last one in --output_dir.")
    if not any((folder / name).is_file() for name in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)):
        raise ValueError(f"--resume_from_checkpoint {folder}: no optimizer state ({OPTIMIZER_NAME}) to resume from: a "
                         "finished run's folder (resume from one of its checkpoint-N folders) or a checkpoint saved "
                         "with --save_only_model; to train it further from its weights, fine-tune it with "
                         "--model_name_or_path.")
    return str(folder)


def saved_training_args(checkpoint: str | Path) -> dict:
    """The training arguments a checkpoint's run saved (`training_args.json`; empty if it has none); raises
    `ValueError` when it is damaged."""
    saved = Path(checkpoint) / TRAINING_ARGS_JSON
    fields = {"learning_rate": (int, float), "per_device_train_batch_size": int}  # the ones lm-lstm reads
    return read_checkpoint_file(saved, fields) if saved.is_file() else {}


def check_resume(args: TrainingArguments, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint `resume_from_checkpoint` names (`checkpoint_to_resume`); raises `ValueError` when there is none
    in `args.output_dir` for True, or it has no step or time left under `args` (`check_limits_left`)."""
    checkpoint = checkpoint_to_resume(args.output_dir, resume_from_checkpoint)
    if checkpoint is None and resume_from_checkpoint:
        raise ValueError(f"--resume_from_checkpoint: no checkpoint in {args.output_dir}.")
    if checkpoint is not None:
        check_limits_left(checkpoint, args)
    return checkpoint


class LSTMTrainer(Trainer):
    """`Trainer` that reports validation perplexity beside the loss, evaluates and saves the averaged weights once
    NT-ASGD-style averaging has started, pushes Hub-complete folders, runs stateful truncated BPTT when its
    datasets are `StreamBlocks` (`--stateful`; see `lm_lstm.streams`), and trains for a time budget with
    `args.max_time` (seconds; see `lm_lstm.budget`: a `TimeBudget` callback, added unless one is passed, ends
    training and drives the learning-rate schedule). Arguments whose learning rate was left to the recipe get the
    rate for the model's hidden size (`recipe_learning_rate`).

    Raises `ValueError` when stateful BPTT is asked of a model without a recurrent state or with options it cannot
    honour.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hidden_size = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if self._learning_rate_from_recipe() and hidden_size is not None:
            self.args.set_recipe_learning_rate(recipe_learning_rate(hidden_size))
        # Trainer's label smoother would score the logits against unshifted `labels` (it shifts only for the built-in
        # causal LMs) and never sees the streams' `shift_labels`; the model smooths its own targets instead.
        self.label_smoother = None
        self.stateful_bptt = StatefulBPTT.for_datasets(
            self.model, self.args, self.train_dataset, self.eval_dataset, compute_metrics=self.compute_metrics
        )
        if budget_seconds(self.args) is not None and self.time_budget is None:
            self.add_callback(TimeBudget())
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(BudgetProgressCallback)

    @property
    def time_budget(self) -> TimeBudget | None:
        """The `TimeBudget` callback, if any (looked up each time: restoring callback states from a checkpoint
        replaces it)."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, TimeBudget)), None)

    def training_limit(self) -> str:
        """Which limit ended the last training: 'time' (`max_time`), 'steps' (`max_steps`) or 'epochs'."""
        budget = self.time_budget
        if budget is not None and budget.stopped_training:
            return "time"
        # Trainer turns an epoch limit into `state.max_steps` too: only a step limit given is one.
        return "steps" if 0 < self.args.max_steps != NO_STEP_LIMIT else "epochs"

    def describe_training_stop(self) -> str:
        """Why the time budget ended training where it did (`TimeBudget.describe_stop`); '' when it did not."""
        budget = self.time_budget
        return budget.describe_stop() if budget is not None else ""

    def _learning_rate_from_recipe(self) -> bool:
        return isinstance(self.args, LSTMTrainingArguments) and self.args.learning_rate_from_recipe()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; raises `ValueError` when the checkpoint to resume from has no step or time left
        (`check_limits_left`), or was trained at another `learning_rate` than the one given (Trainer would go on at
        the checkpoint's); a rate left to the recipe becomes the checkpoint's."""
        checkpoint = check_resume(self.args, resume_from_checkpoint)
        if checkpoint is not None:
            self._continue_learning_rate(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _continue_learning_rate(self, checkpoint: str) -> None:
        saved = saved_training_args(checkpoint).get("learning_rate")
        if saved is None:
            return
        if self._learning_rate_from_recipe():
            self.args.set_recipe_learning_rate(saved)
        elif not math.isclose(self.args.learning_rate, saved):
            raise ValueError(f"--learning_rate {self.args.learning_rate:g}: the run of {checkpoint} trains at "
                             f"{saved:g}, and a resumed run goes on with its schedule; leave --learning_rate out, or "
                             "start a new run.")

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer updates the state of each stateful callback by name and fails on one that the checkpoint a run
        # resumed from did not have (a `TimeBudget` added to a run that had none).
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks.setdefault(type(callback).__name__, {})
        super()._save_checkpoint(model, trial)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule, or with a time budget the same kind of schedule over the training time."""
        budget = self.time_budget
        if budget is None or budget_seconds(self.args) is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = budget.schedule(optimizer or self.optimizer, self.args, num_training_steps)
        self._created_lr_scheduler = True  # as Trainer's own: the next `train()` makes a new one
        return self.lr_scheduler

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token=None, revision=None,
                    **kwargs):
        """Uploads `output_dir` as `lm-lstm push` does: model, code, tokenizer and card; no checkpoints or pickles.

        The card is the one `train()` wrote; call this after it.
        """
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self._finish_current_push()
        return push_folder(
            self.args.output_dir,
            self.hub_model_id,
            private=bool(self.args.hub_private_repo),
            revision=revision or self.args.hub_revision,
            token=token or self.args.hub_token,
            commit_message=commit_message,
        )

    def _averaged_weights(self) -> contextlib.AbstractContextManager:
        """The averaged weights in place (see `NonMonotonicAveraging`) once averaging has started."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, NonMonotonicAveraging) and callback.average is not None:
                return callback.average.applied()
        return contextlib.nullcontext()

    def evaluate(self, *args, **kwargs):
        with self._averaged_weights():
            return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self._averaged_weights():
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves as `Trainer` does, with the training arguments as JSON (`training_args.json`) instead of a pickle:
        no folder written here holds a pickle but what a checkpoint needs to resume (optimizer, scheduler, RNG)."""
        super()._save(output_dir, state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (folder / TRAINING_ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")

    def _get_train_sampler(self, train_dataset=None):
        if self.stateful_bptt is None:
            return super()._get_train_sampler(train_dataset)
        return self.stateful_bptt.sampler(train_dataset if train_dataset is not None else self.train_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.stateful_bptt is not None:
            self._signature_columns += [c for c in STREAM_COLUMNS if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.args.label_smoothing_factor:
            # Training loss only: the validation loss stays the exact NLL that perplexity is made of.
            inputs = {**inputs, "label_smoothing": self.args.label_smoothing_factor}
        if self.stateful_bptt is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        split = "train" if model.training else "eval"
        loss, outputs = super().compute_loss(
            model, self.stateful_bptt.model_inputs(split, inputs), return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        self.stateful_bptt.carry(split, outputs.cache)
        return (loss, outputs) if return_outputs else loss

    def _save_rng_state(self, output_dir: str) -> None:
        # A checkpoint keeps what a resumed run needs to continue exactly; for streams, that includes their state.
        super()._save_rng_state(output_dir)
        if self.stateful_bptt is not None:
            self.stateful_bptt.save(output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self.stateful_bptt is not None and checkpoint is not None:
            self.stateful_bptt.load(
                checkpoint, self.args.per_device_train_batch_size, self.args.process_index, self.args.device
            )

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self.stateful_bptt is not None:
            output = self.stateful_bptt.evaluation_loop(self, dataloader, metric_key_prefix)
        else:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output
