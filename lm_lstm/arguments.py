"""The options of a training run, as dataclasses that `HfArgumentParser` turns into command-line options.

`lm-lstm train`, `examples/run_clm.py` and the benchmarks share them. Names follow `TrainingArguments` and
`run_clm.py`. Defaults have one source each: the model options are `LSTMConfig`'s fields (with their documentation)
and the training options `TrainingArguments`' fields, both overridden by the default recipe (`presets.py`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from .averaging import NonMonotonicAveraging
from .budget import EVALUATION_SHARE, NO_STEP_LIMIT, check_budget_arguments, parse_duration
from .configuration_lstm import LSTMConfig
from .data import DEFAULT_CORPUS, DEFAULT_TOKENIZER_TRAIN_BYTES, DataSource, check_block_size
from .modeling_lstm import cpu_autocast_runs_lstm
from .presets import DEFAULT_PRESET, LEARNING_RATE_WIDTH
from .streams import check_stateful_arguments
from .tokenization import BPE_MINIMUM_VOCABULARY, TOKENIZER_KINDS, WORD_MINIMUM_VOCABULARY, document_start_id

# `LSTMConfig` fields that are not model options: the tokenizer sets these, and `use_cache` is an inference switch.
NOT_OPTIONS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache")


def fast_bf16_available() -> bool:
    """Whether bf16 autocast is fast here: a GPU with bf16 support, or a CPU with AVX-512 BF16 / AMX instructions
    that oneDNN uses (it does not under `ONEDNN_MAX_CPU_ISA=AVX2`, say). Elsewhere bf16 matrix products are emulated,
    30-60x slower than fp32 (DEVELOPERS.md's AVX2-only AMD EPYC)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16")) and cpu_autocast_runs_lstm(torch.bfloat16)


def config_help(name: str) -> str:
    """`LSTMConfig`'s documentation of argument `name`, on one line."""
    match = re.search(rf"^\s+{name} \(.*\n((?:\s{{12,}}.*\n)+)", LSTMConfig.__doc__, flags=re.MULTILINE)
    if match is None:
        return ""
    return " ".join(match.group(1).split())


SIZED_OPTION = "hidden_size"
SIZED_OPTION_HELP = (
    f" Default: sized for the time budget and this machine (lm_lstm.sizing) when --max_time applies, else "
    f"{DEFAULT_PRESET.model[SIZED_OPTION]}."
)


def model_options() -> list[tuple[str, type, dataclasses.Field]]:
    """One option per `LSTMConfig` field that shapes or regularises a new model, defaulting to the default recipe's
    value, else to the config's; `SIZED_OPTION` defaults to None, for `lm_lstm.sizing` to choose."""
    own_fields = inspect.get_annotations(LSTMConfig, eval_str=True)  # those LSTMConfig declares, not its base's
    defaults = {f.name: f.default for f in dataclasses.fields(LSTMConfig)}
    options = []
    for name, kind in own_fields.items():
        if name == SIZED_OPTION:
            options.append((name, kind | None, field(default=None, metadata={"help": config_help(name) + SIZED_OPTION_HELP})))
        elif name not in NOT_OPTIONS:
            default = DEFAULT_PRESET.model.get(name, defaults[name])
            options.append((name, kind, field(default=default, metadata={"help": config_help(name)})))
    return options


MODEL_OPTIONS = model_options()
MODEL_OPTION_DEFAULTS = {name: option.default for name, _, option in MODEL_OPTIONS}


@dataclass
class ModelSource:
    """Where the model and tokenizer come from: new ones (sized by the model options) or existing ones."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this model (a folder or Hub name) instead of training a new one."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Start a new model from this config (a folder or Hub name) instead of the "
                                "model options."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Override config values of a new model, e.g. 'hidden_size=256,num_hidden_layers=3'."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Use this tokenizer (a folder or Hub name) instead of training one.", "aliases": ["--tokenizer"]},
    )
    tokenizer_type: str = field(
        default="auto",
        metadata={
            "help": "Kind of tokenizer to train: 'bpe' (byte-level BPE), 'char' (one token per character), 'word' "
            "(whitespace-separated words, <eos> at every line end, <unk> for the others, as PyTorch's "
            "word_language_model and AWD-LSTM read text), or 'auto' (char for the bundled Tiny Shakespeare corpus, "
            "bpe otherwise).",
            "choices": ["auto", *TOKENIZER_KINDS],
        },
    )
    tokenizer_vocab_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary size of a trained bpe tokenizer (at least 259), or of a word tokenizer (at least "
                  "3: <eos>, <unk> and the most frequent words); a char tokenizer's is set by the text."},
    )
    min_frequency: int = field(
        default=1,
        metadata={"help": "Word tokenizer only: words seen fewer times in the training text are <unk>."},
    )
    tokenizer_train_bytes: int = field(
        default=DEFAULT_TOKENIZER_TRAIN_BYTES,
        metadata={"help": "A new tokenizer is trained on all the training text up to this many bytes (UTF-8); beyond, "
                  "on a sample of about this many bytes spread evenly over it (every k-th piece of about 64k "
                  "characters, cut at line ends), which also gives --min_frequency its counts."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model's folder or repository (other architectures)."}
    )

    def __post_init__(self) -> None:
        self._check_tokenizer_options()
        if self.model_name_or_path is not None and (self.config_name or self.config_overrides):
            raise ValueError("--config_name and --config_overrides build a new model; drop --model_name_or_path.")
        given = [f"--{name}" for name, default in MODEL_OPTION_DEFAULTS.items() if getattr(self, name) != default]
        if given and (self.model_name_or_path or self.config_name):
            source = "--model_name_or_path" if self.model_name_or_path else "--config_name"
            raise ValueError(f"{', '.join(given)} would be ignored: the model comes from {source}. "
                             "Change a new model's config with --config_overrides.")
        if self.model_name_or_path is None and self.config_name is None:
            self._apply_overrides(LSTMConfig(**self.architecture()))  # rejects bad values before any work

    def _check_tokenizer_options(self) -> None:
        """Raises `ValueError` for tokenizer options out of range, or that would be ignored."""
        if self.min_frequency < 1:
            raise ValueError(f"--min_frequency must be at least 1, got {self.min_frequency}.")
        trains_words = self.tokenizer_type == "word" and not (self.tokenizer_name or self.model_name_or_path)
        if self.min_frequency != 1 and not trains_words:
            raise ValueError("--min_frequency applies to a word tokenizer trained on the text (--tokenizer_type word, "
                             "no --tokenizer_name or --model_name_or_path); drop it.")
        if self.tokenizer_train_bytes < 1:
            raise ValueError(f"--tokenizer_train_bytes must be at least 1, got {self.tokenizer_train_bytes}.")
        if self.tokenizer_train_bytes != DEFAULT_TOKENIZER_TRAIN_BYTES and (self.tokenizer_name or self.model_name_or_path):
            raise ValueError("--tokenizer_train_bytes applies to a tokenizer trained on the text (no --tokenizer_name "
                             "or --model_name_or_path); drop it.")
        minimum = {"bpe": BPE_MINIMUM_VOCABULARY, "word": WORD_MINIMUM_VOCABULARY}.get(self.tokenizer_type)
        if minimum is not None and self.tokenizer_vocab_size < minimum:
            raise ValueError(f"--tokenizer_vocab_size must be at least {minimum} for a {self.tokenizer_type} "
                             f"tokenizer, got {self.tokenizer_vocab_size}.")

    def architecture(self) -> dict:
        """The `LSTMConfig` arguments the model options set (the recipe's hidden size when none is given)."""
        options = {name: getattr(self, name) for name in MODEL_OPTION_DEFAULTS}
        if options[SIZED_OPTION] is None:
            options[SIZED_OPTION] = DEFAULT_PRESET.model[SIZED_OPTION]
        return options

    def size_left_open(self) -> bool:
        """Whether nothing sets a new model's hidden size (no option, --config_name or --config_overrides for it), so
        that `lm_lstm.training.size_new_model` chooses it."""
        overridden = re.search(rf"(^|,)\s*{SIZED_OPTION}\s*=", self.config_overrides or "")
        return getattr(self, SIZED_OPTION) is None and not (self.model_name_or_path or self.config_name or overridden)

    def new_config(self, tokenizer: PreTrainedTokenizerBase) -> LSTMConfig:
        """The config of a new model for `tokenizer`: from --config_name or the model options, then the overrides."""
        tokens = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": document_start_id(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        }
        if self.config_name:
            base = AutoConfig.from_pretrained(self.config_name, trust_remote_code=self.trust_remote_code).to_dict()
            config = LSTMConfig(**{**base, **tokens})
        else:
            config = LSTMConfig(**self.architecture(), **tokens)
        return self._apply_overrides(config)

    def _apply_overrides(self, config: LSTMConfig) -> LSTMConfig:
        if not self.config_overrides:
            return config
        config.update_from_string(self.config_overrides)
        return LSTMConfig(**config.to_dict())  # validates the overridden values


ModelArguments = dataclasses.make_dataclass("ModelArguments", MODEL_OPTIONS, bases=(ModelSource,))
ModelArguments.__module__ = __name__
ModelArguments.__doc__ = "The model to train: a new one (the options of `LSTMConfig`), or an existing one to fine-tune."


@dataclass
class DataArguments:
    """The text to train and validate on."""

    train_file: list[str] | None = field(
        default=None,
        metadata={"help": f"Training files (.txt, .json, .jsonl, .csv, .parquet). Default: {DEFAULT_CORPUS.name}, "
                  "the bundled Tiny Shakespeare corpus."},
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Validation files. Default: the last part of the training text."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub, instead of files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text in tabular data."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percentage of the training text (the end, by position) used for validation "
                                "when no validation file is given."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence (the BPTT length). Default: chosen with the model's size for "
                  "the time budget and this machine when that is chosen (lm_lstm.sizing), else "
                  f"{DEFAULT_PRESET.data['block_size']}."},
    )
    recipe_block_size: int | None = field(default=None, init=False, repr=False)
    """The BPTT length the recipe set when --block_size was not given (`block_size_from_recipe`)."""
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})
    max_eval_tokens: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N tokens of the validation text (whole blocks, at least one); 0 keeps "
                  "it all. Default: validation text carved from --train_file (or the bundled corpus) is cut to what "
                  f"one evaluation scores in {EVALUATION_SHARE:.0%}% of --max_time, at the evaluation speed measured "
                  "before training; validation files, Hub datasets and runs without a time budget keep it all."},
    )

    def __post_init__(self) -> None:
        if self.block_size is None:
            self.block_size = self.recipe_block_size = DEFAULT_PRESET.data["block_size"]
        check_block_size(self.block_size)
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 0:
            raise ValueError(f"--preprocessing_num_workers must be at least 0, got {self.preprocessing_num_workers}.")
        if self.max_eval_tokens is not None and self.max_eval_tokens < 0:
            raise ValueError(f"--max_eval_tokens must be at least 0 (0: no limit), got {self.max_eval_tokens}.")
        self.source()  # checks the split percentage before any work

    def block_size_from_recipe(self) -> bool:
        """Whether `block_size` is still the one the recipe set (not given, nor changed since), for
        `lm_lstm.training.size_new_model` to choose."""
        return self.recipe_block_size is not None and self.block_size == self.recipe_block_size

    def source(self) -> DataSource:
        return DataSource(
            train_files=self.train_file,
            validation_files=self.validation_file,
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            text_column=self.text_column,
            validation_split_percentage=self.validation_split_percentage,
        )

    @property
    def uses_default_corpus(self) -> bool:
        return not self.train_file and not self.dataset_name

    @property
    def carves_validation(self) -> bool:
        """Whether the validation text is the end of the training files (or of the bundled corpus)."""
        return not self.validation_file and not self.dataset_name


@dataclass
class CardArguments:
    """Metadata for the model card that is not in the run itself."""

    license: str = field(default="apache-2.0", metadata={"help": "License of the trained model (Hub identifier)."})
    language: str | None = field(
        default=None,
        metadata={"help": "Language code of the training text, for the card. Default: en for the bundled corpus, else "
                  "none."},
    )


def _recipe(name: str, help: str) -> dataclasses.Field:
    """A training option whose default is the default recipe's."""
    return field(default=DEFAULT_PRESET.training[name], metadata={"help": help})


@dataclass
class LSTMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the default recipe's values and the options of LSTM training."""

    output_dir: str | None = field(default="lm-lstm-model", metadata={"help": "Where the trained model is written."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into --output_dir even if it already holds a model or checkpoints (they are replaced). "
                  "Without it such a folder is refused, unless the run resumes from it (--resume_from_checkpoint)."},
    )
    max_time: float | str | None = field(
        default=None,
        metadata={"help": "Time budget: train for this long (seconds, or 30s / 10m / 1h; 0 or 'none': no time limit), "
                  "evaluations and checkpoints included, stopping early enough for the final evaluation and save; the "
                  "learning-rate schedule runs over this time. With --max_steps or --num_train_epochs, whichever "
                  "limit comes first ends training. A resumed run trains for the time it had left. Default: "
                  f"{DEFAULT_PRESET.training['max_time']} (the default recipe) when neither --max_steps nor "
                  "--num_train_epochs is given, else no time limit."},
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "Stop after this many optimisation steps (-1: no step limit; overrides --num_train_epochs)."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Stop after this many passes over the training data. Default: no epoch limit with "
                  "--max_time, else 3 (Trainer's default)."},
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Training blocks per batch and device (with --stateful: streams per device). Default: chosen "
                  "with the model's size for the time budget and this machine when that is chosen (lm_lstm.sizing), "
                  f"else {DEFAULT_PRESET.training['per_device_train_batch_size']}."},
    )
    sizing_seconds: float = field(default=0.0, init=False, repr=False)
    """Seconds of `max_time` that choosing the model's size took (`lm_lstm.training.size_new_model`), out of the
    budget; kept in checkpoints, for a resumed run to take them out again."""
    time_budget_seconds: float | None = field(default=None, init=False, repr=False)
    """The budget given (`--max_time`), the sizing's seconds included, once `max_time` holds the training time left
    after them (`lm_lstm.training.size_new_model`)."""
    recipe_train_batch_size: int | None = field(default=None, init=False, repr=False)
    """The streams the recipe set when --per_device_train_batch_size was not given (`train_batch_size_from_recipe`)."""
    per_device_eval_batch_size: int = _recipe(
        "per_device_eval_batch_size", "Validation blocks per batch and device (with --stateful: streams per device)."
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak AdamW learning rate. Default: the recipe's for the model's hidden size, "
                  f"{DEFAULT_PRESET.training['learning_rate']:g} up to {LEARNING_RATE_WIDTH} units, "
                  f"{DEFAULT_PRESET.training['learning_rate']:g} x {LEARNING_RATE_WIDTH} / hidden size above."},
    )
    recipe_learning_rate: float | None = field(default=None, init=False, repr=False)
    """The rate the recipe set when `--learning_rate` was not given (`learning_rate_from_recipe`)."""
    lr_scheduler_type: str = _recipe("lr_scheduler_type", "Learning-rate schedule after warm-up.")
    warmup_steps: float = _recipe("warmup_steps", "Linear warm-up steps (or a fraction if < 1).")
    weight_decay: float = _recipe("weight_decay", "AdamW weight decay.")
    max_grad_norm: float = _recipe("max_grad_norm", "Gradient clipping norm: LSTMs need it.")
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast. Default: on where it is fast (AMX / AVX-512 BF16 CPUs, bf16 GPUs).",
                  "nargs": "?", "const": True},  # `--bf16` alone means True, as for the other switches
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    eval_steps: float | None = _recipe("eval_steps", "Evaluate every N steps.")
    save_steps: float = _recipe("save_steps", "Save a checkpoint every N steps.")
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Finish with the best checkpoint."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Metric choosing the best."})
    logging_steps: float = _recipe("logging_steps", "Log the training loss every N steps.")
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step's loss too."})
    eval_on_start: bool | None = field(
        default=None,
        metadata={"help": "Evaluate before training (step 0). Default: with a time budget, when one evaluation is "
                  f"expected to take at most {EVALUATION_SHARE:.0%}% of --max_time (measured before training by "
                  "`lm-lstm train`; off for a Trainer built otherwise); without one, on.",
                  "nargs": "?", "const": True},
    )
    hub_strategy: str = field(
        default="end", metadata={"help": "With --push_to_hub: 'end' pushes the finished folder with its card once."}
    )
    use_cache: bool = field(
        default=True,
        metadata={"help": "Saved as the model's `use_cache` (Trainer writes this option into the config): whether "
                  "the model returns its recurrent state for generation. Training is the same either way."},
    )
    weight_averaging_patience: int | None = field(
        default=None,
        metadata={"help": "NT-ASGD-style weight averaging: once the validation loss is worse than the best of the "
                  "evaluations more than N evaluations ago, average the weights of every later step, and evaluate "
                  "and save the average. Default: off."},
    )
    stateful: bool = field(
        default=True,
        metadata={"help": "Stateful truncated BPTT: lay the text out as batch-size contiguous streams per process and "
                  "carry the (detached) recurrent state from batch to batch, reset at document starts; evaluation "
                  "runs the same way, so every token is predicted with its left context."},
    )

    def __post_init__(self):
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() == "true":
            self.resume_from_checkpoint = True  # from the command line: the last checkpoint of --output_dir
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = self.recipe_train_batch_size = \
                DEFAULT_PRESET.training["per_device_train_batch_size"]
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be at least 1, got {self.per_device_train_batch_size}.")
        if self.learning_rate is None:
            self.set_recipe_learning_rate(DEFAULT_PRESET.training["learning_rate"])  # LSTMTrainer fits it to the model
        if self.max_time is None:  # not given: an explicit step or epoch limit is not cut short by a default budget
            limited = self.max_steps > 0 or self.num_train_epochs is not None
            self.max_time = None if limited else DEFAULT_PRESET.training["max_time"]
        self.max_time = parse_duration(self.max_time)
        if self.eval_on_start is None and self.max_time is None:
            self.eval_on_start = True  # no budget to weigh an evaluation against
        if self.num_train_epochs is None:
            if self.max_time is not None and self.max_steps <= 0:
                self.max_steps = NO_STEP_LIMIT  # the budget alone ends training
            self.num_train_epochs = TrainingArguments.num_train_epochs
        if self.bf16 is None:
            self.bf16 = fast_bf16_available()
        if not torch.accelerator.is_available():
            # Trainer runs bf16, and DDP over gloo (torchrun, accelerate launch), on a CPU only when told to use it.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # nothing to pin for
        for name in ("eval_steps", "save_steps", "logging_steps"):
            # TrainingArguments takes an eval_steps of 0 as "as logging_steps" and a save_steps of 0 as given.
            value = getattr(self, name)
            if value is not None and not (0 < value < 1 or float(value).is_integer() and value > 0):
                raise ValueError(f"--{name} must be a positive whole number of steps, or below 1 a fraction of the "
                                 f"training steps, got {value:g}.")
        warmup = self.warmup_steps
        if not (0 <= warmup < 1 or warmup >= 1 and float(warmup).is_integer()):  # NaN and infinity included
            # Trainer would take int(1.5) = 1 step, a time budget 1.5.
            raise ValueError(f"--warmup_steps must be a whole number of steps, or below 1 a fraction of training, got "
                             f"{warmup}.")
        check_best_model_steps(self)
        super().__post_init__()
        check_output_dir(self)
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}.")
        check_budget_arguments(self)
        if self.stateful:
            check_stateful_arguments(self)
        if self.weight_averaging_patience is not None:
            NonMonotonicAveraging(self.weight_averaging_patience)  # checks the value before any work


    def train_batch_size_from_recipe(self) -> bool:
        """Whether `per_device_train_batch_size` is still the one the recipe set (not given, nor changed since), for
        `lm_lstm.training.size_new_model` to choose."""
        return self.recipe_train_batch_size is not None and self.per_device_train_batch_size == self.recipe_train_batch_size

    def learning_rate_from_recipe(self) -> bool:
        """Whether `learning_rate` is still the one the recipe set (not given, nor changed since), for `LSTMTrainer` to
        fit to its model's width (`presets.recipe_learning_rate`)."""
        return self.recipe_learning_rate is not None and self.learning_rate == self.recipe_learning_rate

    def set_recipe_learning_rate(self, rate: float) -> None:
        """Sets `learning_rate` to the recipe's `rate`."""
        self.learning_rate = self.recipe_learning_rate = rate


def check_best_model_steps(args: LSTMTrainingArguments) -> None:
    """Raises `ValueError` naming both options when `--load_best_model_at_end` cannot hold: it needs a checkpoint at
    every evaluation, so `--save_steps` a multiple of `--eval_steps` (TrainingArguments' own message names neither
    fix), and the same evaluation and save strategies (unknown ones are left to TrainingArguments, which names them);
    `--save_strategy best` needs evaluations, which choose what it saves."""
    eval_strategy, save_strategy = (str(getattr(s, "value", s)) for s in (args.eval_strategy, args.save_strategy))
    strategies = {s.value for s in IntervalStrategy}
    if eval_strategy not in strategies or save_strategy not in strategies | {"best"}:
        return
    if save_strategy == "best" and eval_strategy == "no":
        raise ValueError("--save_strategy best saves a checkpoint when an evaluation finds a better model, and "
                         "--eval_strategy no makes none: give --eval_strategy steps or epoch, or another "
                         "--save_strategy.")
    if not args.load_best_model_at_end:
        return
    if save_strategy != "best" and eval_strategy != save_strategy:
        raise ValueError(f"--eval_strategy {eval_strategy} with --save_strategy {save_strategy}: "
                         "--load_best_model_at_end (on by default) picks a checkpoint by its evaluation, so both need "
                         "the same strategy; give one, or --load_best_model_at_end False.")
    if not (eval_strategy == "steps" and save_strategy == "steps"):
        return
    eval_steps = args.eval_steps if args.eval_steps is not None else args.logging_steps  # as TrainingArguments does
    if eval_steps >= 1 and args.save_steps >= 1 and args.save_steps % eval_steps:
        raise ValueError(f"--save_steps {args.save_steps:g} is not a multiple of --eval_steps {eval_steps:g}, which "
                         "--load_best_model_at_end (on by default) needs: change one (--eval_steps "
                         f"{args.save_steps:g} or --save_steps {eval_steps:g}, say), or give --load_best_model_at_end "
                         "False.")


def check_output_dir(args: LSTMTrainingArguments) -> None:
    """Raises `ValueError` rather than replace a model or checkpoints already in `output_dir`, unless the run resumes
    from a checkpoint in it or `--overwrite_output_dir` says to."""
    folder = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    resumes_here = resume is True or bool(resume) and Path(resume).resolve().is_relative_to(folder.resolve())
    if args.overwrite_output_dir or resumes_here or not folder.is_dir():
        return
    found = sorted(p.name for p in folder.iterdir() if p.name in ("config.json", "model.safetensors")
                   or p.name.startswith("checkpoint-"))
    if found:
        raise ValueError(f"--output_dir {folder} already holds a model ({', '.join(found[:3])}): choose another "
                         "folder, resume with --resume_from_checkpoint, or replace it with --overwrite_output_dir.")
