"""Training with `transformers.Trainer`: text files in; model, tokenizer, results and card out.

The argument dataclasses (model, data, training, card) are what `lm-lstm train` and `examples/run_clm.py` parse
with `HfArgumentParser`; `train()` runs the whole job from them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import EvalLoopOutput

from .averaging import NonMonotonicAveraging
from .card import RunSummary, write_model_card
from .configuration_lstm import LSTMConfig
from .data import (
    DEFAULT_CORPUS,
    DataSource,
    StreamBlocks,
    check_block_size,
    collate_blocks,
    collate_stream_blocks,
    load_text_datasets,
    tokenize_dataset,
    tokenize_documents,
)
from .evaluation import predicted_bytes
from .hub import push_folder
from .modeling_lstm import CELL_STATE, HIDDEN_STATE, LSTMForCausalLM
from .tokenization import TOKENIZER_KINDS, document_start_id, encode_prompt, load_tokenizer, train_tokenizer

def fast_bf16_available() -> bool:
    """Whether bf16 autocast is fast here: a GPU with bf16 support, or a CPU with AVX-512 BF16 / AMX instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


@dataclass
class ModelArguments:
    """The model to train: a new one of the given sizes, or an existing one to fine-tune."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this model (a folder or Hub name) instead of training a new one."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Start a new model from this config (a folder or Hub name) instead of the "
                                "size options below."}
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
            "help": "Kind of tokenizer to train: 'bpe' (byte-level BPE), 'char' (one token per character), or "
            "'auto' (char for the bundled Tiny Shakespeare corpus, bpe otherwise).",
            "choices": ["auto", *TOKENIZER_KINDS],
        },
    )
    tokenizer_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a trained BPE tokenizer."})
    embedding_size: int = field(default=128, metadata={"help": "Size of the token embeddings."})
    hidden_size: int = field(default=512, metadata={"help": "Size of the LSTM hidden and cell states."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Number of stacked LSTM layers."})
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "Share input embedding and output weights (the last layer is then embedding-sized)."}
    )
    embedding_dropout: float = field(default=0.0, metadata={"help": "Probability of dropping a whole word type."})
    input_dropout: float = field(default=0.1, metadata={"help": "Locked dropout on the embeddings."})
    hidden_dropout: float = field(default=0.1, metadata={"help": "Locked dropout between LSTM layers."})
    output_dropout: float = field(default=0.2, metadata={"help": "Locked dropout before the output layer."})
    weight_dropout: float = field(default=0.1, metadata={"help": "DropConnect on the hidden-to-hidden weights."})
    activation_regularization: float = field(
        default=0.0, metadata={"help": "AR: weight of the mean squared (dropped-out) last-layer output in the loss."}
    )
    temporal_activation_regularization: float = field(
        default=0.0, metadata={"help": "TAR: weight of the mean squared step-to-step change of the last-layer output."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model's folder or repository (other architectures)."}
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is not None and (self.config_name or self.config_overrides):
            raise ValueError("--config_name and --config_overrides build a new model; drop --model_name_or_path.")
        if self.model_name_or_path is None and self.config_name is None:
            self._apply_overrides(LSTMConfig(**self.architecture()))  # rejects bad values before any work

    def architecture(self) -> dict:
        """The `LSTMConfig` arguments these options set."""
        names = ("embedding_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings", "embedding_dropout",
                 "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout", "activation_regularization",
                 "temporal_activation_regularization")
        return {name: getattr(self, name) for name in names}

    def new_config(self, tokenizer: PreTrainedTokenizerBase) -> LSTMConfig:
        """The config of a new model for `tokenizer`: from --config_name or the size options, then the overrides."""
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
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (the BPTT length)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        self.source()  # checks the split percentage before any work

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


@dataclass
class CardArguments:
    """Metadata for the model card that is not in the run itself."""

    license: str = field(default="apache-2.0", metadata={"help": "License of the trained model (Hub identifier)."})
    language: str | None = field(
        default=None, metadata={"help": "Language code of the training text (default: en for the bundled corpus)."}
    )


@dataclass
class LSTMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults suited to LSTM language models on a CPU."""

    output_dir: str | None = field(default="lm-lstm-model", metadata={"help": "Where the trained model is written."})
    max_steps: int = field(default=2500, metadata={"help": "Total optimisation steps (overrides num_train_epochs)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Training blocks per batch and device (with --stateful: streams per device)."}
    )
    per_device_eval_batch_size: int = field(
        default=16, metadata={"help": "Validation blocks per batch and device (with --stateful: streams per device)."}
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warm-up steps (or a fraction if < 1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping norm: LSTMs need it."})
    bf16: bool = field(
        default=fast_bf16_available(),  # decided once, when the module is imported
        metadata={"help": "bf16 autocast. Default: on where it is fast (AMX / AVX-512 BF16 CPUs, bf16 GPUs)."},
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    eval_steps: float | None = field(default=250, metadata={"help": "Evaluate every N steps."})
    save_steps: float = field(default=250, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Finish with the best checkpoint."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Metric choosing the best."})
    logging_steps: float = field(default=50, metadata={"help": "Log the training loss every N steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step's loss too."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate before training (step 0)."})
    hub_strategy: str = field(
        default="end", metadata={"help": "With --push_to_hub: 'end' pushes the finished folder with its card once."}
    )
    weight_averaging_patience: int | None = field(
        default=None,
        metadata={"help": "NT-ASGD-style weight averaging: once the validation loss is worse than the best of the "
                  "evaluations more than N evaluations ago, average the weights of every later step, and evaluate "
                  "and save the average. Off by default."},
    )
    stateful: bool = field(
        default=True,
        metadata={"help": "Stateful truncated BPTT: lay the text out as batch-size contiguous streams per process and "
                  "carry the (detached) recurrent state from batch to batch, reset at document starts; evaluation "
                  "runs the same way, so every token is predicted with its left context."},
    )

    def __post_init__(self):
        if not torch.accelerator.is_available():
            # Trainer runs bf16, and DDP over gloo (torchrun, accelerate launch), on a CPU only when told to use it.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # nothing to pin for
        super().__post_init__()
        if self.stateful:
            check_stateful_arguments(self)
        if self.weight_averaging_patience is not None:
            NonMonotonicAveraging(self.weight_averaging_patience)  # checks the value before any work


def check_stateful_arguments(args: TrainingArguments) -> None:
    """Raises `ValueError` for training options that stateful BPTT cannot honour."""
    if args.activation_checkpointing:
        raise ValueError(
            "--stateful needs the state of every batch; it cannot be used with activation (gradient) checkpointing."
        )


STREAM_COLUMNS = ("shift_labels", "reset")


class LSTMTrainer(Trainer):
    """`Trainer` that reports validation perplexity beside the loss, pushes Hub-complete folders, and runs stateful
    truncated BPTT when given `StreamBlocks` datasets (`--stateful`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._carried_states: dict[str, list[tuple[torch.Tensor, torch.Tensor]] | None] = {"train": None, "eval": None}
        streams = [d for d in (self.train_dataset, self.eval_dataset) if isinstance(d, StreamBlocks)]
        if streams and not isinstance(self.model, LSTMForCausalLM):
            raise ValueError(
                f"--stateful carries an LSTM's state; {type(self.model).__name__} has none: use --stateful False."
            )
        if streams:
            check_stateful_arguments(self.args)

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

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, StreamBlocks):
            return SequentialSampler(dataset)  # the rows are already in stream order
        return super()._get_train_sampler(train_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in STREAM_COLUMNS:  # read by `compute_loss` (`reset`) and the loss (`shift_labels`)
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _with_carried_state(self, key: str, inputs: dict) -> dict:
        """`inputs` (without `reset`) with a cache holding the state the previous batch of these streams ended with,
        zeroed where a stream starts a document."""
        inputs = dict(inputs)
        reset = inputs.pop("reset")
        cache = DynamicCache(config=self.model.config)
        states = self._carried_states[key]
        if states is not None:
            keep = (~reset.to(states[0][0].device))[:, None]
            for layer_idx, layer_states in enumerate(states):
                for slot, state in zip((HIDDEN_STATE, CELL_STATE), layer_states):
                    cache.update_recurrent_state(state * keep, layer_idx, state_idx=slot)
        return {**inputs, "cache": cache, "use_cache": True}

    def _carry(self, key: str, cache: DynamicCache) -> None:
        self._carried_states[key] = [
            tuple(layer.recurrent_states[slot].detach() for slot in (HIDDEN_STATE, CELL_STATE)) for layer in cache.layers
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "reset" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        key = "train" if model.training else "eval"
        loss, outputs = super().compute_loss(
            model, self._with_carried_state(key, inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._carry(key, outputs.cache)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if isinstance(dataloader.dataset, StreamBlocks):
            output = self._stream_evaluation_loop(dataloader, metric_key_prefix)
        else:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 700.0))
        return output

    @torch.no_grad()
    def _stream_evaluation_loop(self, dataloader, metric_key_prefix: str) -> EvalLoopOutput:
        """Exact mean NLL per token over the streams, the state carried through each (summed over processes)."""
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        model.eval()
        self._carried_states["eval"] = None
        total = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed NLL, targets
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            with self.autocast_smart_context_manager():
                # With `num_items_in_batch=1` the loss is the summed NLL of the batch.
                outputs = model(**self._with_carried_state("eval", inputs), num_items_in_batch=1)
            self._carry("eval", outputs.cache)
            total += torch.stack([outputs.loss.double(), inputs["shift_labels"].ne(-100).sum().double()])
        self._carried_states["eval"] = None
        nll, count = self.accelerator.reduce(total, reduction="sum").tolist()
        metrics = {f"{metric_key_prefix}_loss": nll / max(count, 1)}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset))


@dataclass
class TrainingResult:
    """What a finished run produced."""

    output_dir: Path
    metrics: dict[str, float]
    sample: str
    is_main_process: bool = True


def build_tokenizer(model_args: ModelArguments, data_args: DataArguments, train_texts) -> PreTrainedTokenizerBase:
    """The named tokenizer, the fine-tuned model's, or a new one trained on the training text."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return load_tokenizer(name)
    kind = model_args.tokenizer_type
    if kind == "auto":
        kind = "char" if data_args.uses_default_corpus else "bpe"
    return train_tokenizer(train_texts, kind=kind, vocab_size=model_args.tokenizer_vocab_size)


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> LSTMForCausalLM:
    """A new model sized for the tokenizer, or the model to fine-tune (its vocabulary grown to fit if needed)."""
    if model_args.model_name_or_path is None:
        return LSTMForCausalLM(model_args.new_config(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def _limit(dataset, count: int | None):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def build_datasets(raw, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, training_args):
    """The training and validation datasets and their collator: independent blocks, or streams with `--stateful`."""
    if not getattr(training_args, "stateful", False):
        blocks = tokenize_dataset(raw, tokenizer, data_args.block_size, data_args.preprocessing_num_workers)
        train = _limit(blocks["train"], data_args.max_train_samples)
        return train, _limit(blocks["validation"], data_args.max_eval_samples), collate_blocks
    pieces = tokenize_documents(raw, tokenizer, data_args.preprocessing_num_workers)
    train, validation = (
        StreamBlocks.from_pieces(
            pieces[split], tokenizer, data_args.block_size, num_streams=batch_size,
            world_size=training_args.world_size, max_blocks=limit,
        )
        for split, batch_size, limit in (
            ("train", training_args.per_device_train_batch_size, data_args.max_train_samples),
            ("validation", training_args.per_device_eval_batch_size, data_args.max_eval_samples),
        )
    )
    return train, validation, collate_stream_blocks


def configure_generation(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Sampling defaults for `generate()`, saved as `generation_config.json`; generation without a prompt (and the
    model config's `bos_token_id`) starts from the document-start token, as training does."""
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = model.config.bos_token_id = document_start_id(tokenizer)
    config.do_sample = True
    config.temperature = 0.8
    config.top_k = 50
    config.max_new_tokens = 200


def sample_text(model, tokenizer: PreTrainedTokenizerBase, prompt: str = "\n", max_new_tokens: int = 200) -> str:
    """A short sample from the model, for the end-of-training report."""
    model.eval()
    inputs = encode_prompt(tokenizer, prompt).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def describe_data(data_args: DataArguments) -> tuple[str, list[str], str | None]:
    """A sentence on the training data for the card, the Hub dataset ids, and the language if known."""
    if data_args.dataset_name:
        config = f" (configuration {data_args.dataset_config_name})" if data_args.dataset_config_name else ""
        return f"The Hub dataset `{data_args.dataset_name}`{config}.", [data_args.dataset_name], None
    split = (
        f"validation files {', '.join(Path(f).name for f in data_args.validation_file)}"
        if data_args.validation_file
        else f"the last {data_args.validation_split_percentage:g}% of the text by position held out for validation"
    )
    if data_args.uses_default_corpus:
        return (
            "Tiny Shakespeare (1.1 MB of plays by William Shakespeare, public domain; the corpus of char-rnn and "
            f"nanoGPT), bundled with lm-lstm, with {split}.",
            ["karpathy/tiny_shakespeare"],
            "en",
        )
    return f"Local files {', '.join(Path(f).name for f in data_args.train_file)}, with {split}.", [], None


def _data_counts(trainer: Trainer, block_size: int) -> dict:
    """Block and token counts of the run's data, and how the validation loss was measured, for `RunSummary`."""
    train, validation, tokenizer = trainer.train_dataset, trainer.eval_dataset, trainer.processing_class
    counts = {"train_blocks": len(train), "eval_blocks": len(validation), "block_size": block_size}
    if isinstance(validation, StreamBlocks):
        targets = validation.target_ids()
        text = tokenizer.decode(targets, skip_special_tokens=True)
        return {
            **counts,
            "train_tokens": len(train.target_ids()),
            "eval_tokens": len(targets),
            "scored_tokens": len(targets),
            "validation_bytes": max(1, len(text.encode("utf-8"))),
            "evaluation_method": f"as {validation.num_streams * validation.world_size} contiguous streams with the "
            "state carried from block to block (reset at document starts): every token is scored once",
        }
    return {
        **counts,
        "train_tokens": len(train) * block_size,
        "eval_tokens": len(validation) * block_size,
        "scored_tokens": len(validation) * (block_size - 1),
        "validation_bytes": predicted_bytes(tokenizer, validation["input_ids"]),
        "evaluation_method": f"in independent blocks of {block_size} tokens (each block starts from a zero state; "
        "its first token is not scored)",
    }


def summarize_run(trainer: Trainer, data_args: DataArguments, card_args: CardArguments, metrics, wall_time) -> RunSummary:
    args, state = trainer.args, trainer.state
    description, dataset_ids, language = describe_data(data_args)
    output_dir = Path(args.output_dir)
    return RunSummary(
        model_name=args.hub_model_id.split("/")[-1] if args.hub_model_id else output_dir.name,
        repo_id=args.hub_model_id or str(output_dir),
        metrics=metrics,
        log_history=state.log_history,
        hyperparameters={
            "steps": state.global_step,
            "epochs": state.epoch or 0.0,
            "batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "max_grad_norm": args.max_grad_norm,
            "precision": "bf16 autocast" if args.bf16 else ("fp16 autocast" if args.fp16 else "fp32"),
            "seed": args.seed,
            "bptt": (
                f"stateful: {args.per_device_train_batch_size * args.world_size} streams, the state carried from batch "
                "to batch (reset at document starts)"
                if isinstance(trainer.train_dataset, StreamBlocks)
                else "truncated at each block (every block starts from a zero state)"
            ),
        },
        **_data_counts(trainer, data_args.block_size),
        wall_time_seconds=wall_time,
        data_description=description,
        dataset_ids=dataset_ids,
        language=card_args.language or language,
        license=card_args.license,
        example_prompt="ROMEO:" if data_args.uses_default_corpus else "The",
    )


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    card_args: CardArguments | None = None,
    callbacks: list | None = None,
    do_train: bool = True,
    do_eval: bool = True,
) -> TrainingResult:
    """Trains (or fine-tunes) a model and writes it, its tokenizer, results and card to `output_dir`.

    With `do_train=False` only the evaluation runs; the card (which reports the evaluation) needs both.
    """
    start = time.time()
    set_seed(training_args.seed)
    raw = load_text_datasets(data_args.source())
    tokenizer = build_tokenizer(model_args, data_args, (row["text"] for row in raw["train"]))
    train_dataset, eval_dataset, collator = build_datasets(raw, tokenizer, data_args, training_args)
    model = build_model(model_args, tokenizer)
    configure_generation(model, tokenizer)

    patience = getattr(training_args, "weight_averaging_patience", None)
    if patience is not None:
        callbacks = [*(callbacks or []), NonMonotonicAveraging(patience)]
    trainer = LSTMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    output_dir = Path(training_args.output_dir)
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    if do_train:
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(train_output.metrics)
        # `_internal_call` keeps `save_model` from pushing now, before the card is written; the push comes last.
        trainer.save_model(str(output_dir), _internal_call=True)
    if do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = eval_metrics["eval_perplexity"]  # the key run_clm.py writes
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        if do_train:
            trainer.save_metrics("train", train_output.metrics)
            trainer.save_state()
        if do_eval:
            trainer.save_metrics("eval", eval_metrics)
        trainer.save_metrics("all", metrics)
        if do_train and do_eval:
            run = summarize_run(trainer, data_args, card_args or CardArguments(), metrics, time.time() - start)
            write_model_card(output_dir, trainer.model, tokenizer, run)
    if do_train and training_args.push_to_hub:
        trainer.push_to_hub()
    sample = sample_text(trainer.model, tokenizer)
    return TrainingResult(
        output_dir=output_dir, metrics=metrics, sample=sample, is_main_process=trainer.is_world_process_zero()
    )
