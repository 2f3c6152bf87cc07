"""The training job: text files in; model, tokenizer, results and card out.

`train()` runs the whole job from the option dataclasses of `lm_lstm.arguments`, as `lm-lstm train` and
`examples/run_clm.py` parse them; the builders here are shared with `examples/run_clm_no_trainer.py` and the
benchmarks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.trainer_callback import ExportableState

from .arguments import SIZED_OPTION, CardArguments, DataArguments, LSTMTrainingArguments, ModelArguments
from .averaging import NonMonotonicAveraging
from .card import RunSummary, write_model_card
from .budget import EVALUATION_SHARE, checkpoint_state, evaluation_speed
from .data import TrainingData, build_block_data, load_text_datasets, tokenizer_training_texts
from .configuration_lstm import LSTMConfig
from .evaluation import perplexity_unit
from .modeling_lstm import LSTMForCausalLM
from .sizing import SizeChoice, candidate_layouts, seconds_left_to_train, size_model
from .streams import build_stream_data
from .tokenization import (
    document_start_id, encode_prompt, eos_ends_lines, load_tokenizer, text_decoding, train_tokenizer,
)
from .trainer import LSTMTrainer, check_resume, saved_training_args

T = TypeVar("T")


@dataclass
class TrainingResult:
    """What a finished run produced."""

    output_dir: Path
    metrics: dict[str, float]
    sample: str
    is_main_process: bool = True
    run: RunSummary | None = None  # what the card reports (main process, training and evaluation)
    unit: str = "token"  # what loss and perplexity are per: "word" or "character" by tokenizer (`perplexity_unit`)


def build_tokenizer(model_args: ModelArguments, data_args: DataArguments, train_pieces) -> PreTrainedTokenizerBase:
    """The named tokenizer, the fine-tuned model's, or a new one trained on the training text (`train_pieces`, as
    `load_text_datasets` gives them), or on a sample of it beyond `--tokenizer_train_bytes`."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return load_tokenizer(name)
    kind = model_args.tokenizer_type
    if kind == "auto":
        kind = "char" if data_args.uses_default_corpus else "bpe"
    texts = tokenizer_training_texts(train_pieces, model_args.tokenizer_train_bytes)
    return train_tokenizer(texts, kind=kind, vocab_size=model_args.tokenizer_vocab_size,
                           min_frequency=model_args.min_frequency)


def on_main_process(compute: Callable[[], T], training_args: LSTMTrainingArguments) -> T:
    """`compute()` run by the main process only, its result shared with the others of a distributed run (so that
    every process makes the same choice from one measurement)."""
    values = [compute() if training_args.process_index == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(values, src=0)
    return values[0]


def checkpoint_sizing(checkpoint: str) -> tuple[int | None, int | None, float]:
    """The streams (per device) and BPTT length a checkpoint's run trained with, and the seconds its sizing took out
    of its budget, as its `training_args.json` and `TrainingTextCheck` state record them (None, or 0 seconds, for
    what a checkpoint from before they were kept lacks)."""
    streams = saved_training_args(checkpoint).get("per_device_train_batch_size")
    saved = TrainingTextCheck.saved(checkpoint_state(checkpoint).stateful_callbacks)
    return streams, saved.get("block_size"), saved.get("sizing_seconds", 0.0)


def size_new_model(model_args: ModelArguments, data_args: DataArguments, training_args: LSTMTrainingArguments,
                   raw, tokenizer: PreTrainedTokenizerBase, data: TrainingData) -> tuple[SizeChoice | None, TrainingData]:
    """Sets what the user left open of a new model's hidden size (`ModelArguments.size_left_open`) and its batches'
    layout (`--per_device_train_batch_size`, `--block_size`), and returns the choice (None when nothing was chosen)
    and `data`, laid out again from `raw` if the layout changed:

    - a resumed run takes its checkpoint's, and the time its sizing took is taken out of `max_time` again (the
      checkpoint's budget state counts training time only);
    - a run with a time budget and the size open gets the size, streams and BPTT length that `lm_lstm.sizing`
      chooses for the budget and this machine (measured by the main process, the same for all), and the time spent
      measuring is taken out of `max_time`; the choice is printed;
    - otherwise the recipe's.
    """
    streams_open, block_size_open = training_args.train_batch_size_from_recipe(), data_args.block_size_from_recipe()
    layout = (training_args.per_device_train_batch_size, data_args.block_size)
    choice = None
    if training_args.resume_from_checkpoint:
        checkpoint = check_resume(training_args, training_args.resume_from_checkpoint)
        if model_args.size_left_open():
            setattr(model_args, SIZED_OPTION, getattr(LSTMConfig.from_pretrained(checkpoint), SIZED_OPTION))
        streams, block_size, training_args.sizing_seconds = checkpoint_sizing(checkpoint)
        if streams_open and streams:
            training_args.per_device_train_batch_size = streams
        if block_size_open and block_size:
            data_args.block_size = block_size
    elif model_args.size_left_open() and training_args.max_time is not None:

        def choose() -> SizeChoice:
            summary = data.summary(tokenizer)
            bytes_per_token = summary["validation_bytes"] / summary["scored_tokens"]  # characters, for ASCII text
            layouts = candidate_layouts(
                None if streams_open else training_args.per_device_train_batch_size,
                None if block_size_open else data_args.block_size,
                training_args.world_size, training_args.gradient_accumulation_steps,
            )
            choice = size_model(model_args.new_config(tokenizer), training_args.max_time, layouts,
                                bool(training_args.bf16), summary["train_tokens"] * bytes_per_token, bytes_per_token,
                                device=training_args.device)
            print(choice.describe(), flush=True)
            return choice

        choice = on_main_process(choose, training_args)
        setattr(model_args, SIZED_OPTION, choice.hidden_size)
        training_args.per_device_train_batch_size, data_args.block_size = choice.layout.streams, choice.layout.block_size
        training_args.sizing_seconds = choice.probe_seconds
    if training_args.max_time is not None and training_args.sizing_seconds:
        training_args.time_budget_seconds = training_args.max_time
        training_args.max_time = seconds_left_to_train(training_args.max_time, training_args.sizing_seconds)
    if layout != (training_args.per_device_train_batch_size, data_args.block_size):
        data = build_training_data(raw, tokenizer, data_args, training_args)
    return choice, data


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


def build_training_data(
    raw, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, training_args: LSTMTrainingArguments
) -> TrainingData:
    """The training and validation data: streams for stateful BPTT (`--stateful`, the default), else independent
    blocks. The one place where the layout is chosen."""
    if training_args.stateful:
        return build_stream_data(
            raw, tokenizer, data_args.block_size,
            train_streams=training_args.per_device_train_batch_size,
            eval_streams=training_args.per_device_eval_batch_size,
            world_size=training_args.world_size,
            max_train_blocks=data_args.max_train_samples,
            max_eval_blocks=data_args.max_eval_samples,
            num_proc=data_args.preprocessing_num_workers,
        )
    return build_block_data(
        raw, tokenizer, data_args.block_size, data_args.max_train_samples, data_args.max_eval_samples,
        num_proc=data_args.preprocessing_num_workers,
    )


def plan_evaluation(model, data: TrainingData, data_args: DataArguments,
                    training_args: LSTMTrainingArguments) -> TrainingData:
    """Fits evaluation to the time budget (`--max_time`), and returns the data with its validation cut as decided:

    - to `--max_eval_tokens` when it is given (0: no cut);
    - by default, validation text carved from the training files to the tokens one evaluation scores in
      `EVALUATION_SHARE` of the budget, at the speed measured here (by the main process, the same for all);
    - without `--eval_on_start`, the evaluation before training is made only when one evaluation is expected to
      take at most that share.

    The main process prints what it decided when it measured or cut. Without a time budget nothing is measured and
    nothing is cut by default.
    """
    budget, cap = training_args.max_time, data_args.max_eval_tokens
    available = data.validation_tokens()
    if cap:
        data = data.with_validation_tokens(cap)
    cut_to_budget = cap is None and budget is not None and data_args.carves_validation
    measure = budget is not None and (cut_to_budget or training_args.eval_on_start is None)
    if measure:
        rows = [data.validation[row]
                for row in range(min(len(data.validation), training_args.per_device_eval_batch_size))]
        speed = on_main_process(lambda: evaluation_speed(model, data.collator(rows), bool(training_args.bf16)),
                                training_args)
        allowed = EVALUATION_SHARE * budget
        if cut_to_budget and data.validation_tokens() > speed * allowed:
            data = data.with_validation_tokens(int(speed * allowed))
        seconds = data.validation_tokens() / speed
        if training_args.eval_on_start is None:
            training_args.eval_on_start = seconds <= allowed
    tokens = data.validation_tokens()
    if training_args.process_index == 0 and (measure or tokens < available):
        cut = "" if tokens >= available else f" (the first of {available:,}" + (
            ": --max_eval_tokens)" if cap else
            f", to fit {EVALUATION_SHARE:.0%} of the time budget; --max_eval_tokens sets it)")
        timing = "" if not measure else f", about {seconds:.0f} s each at {speed:,.0f} tokens/s (measured); " + (
            "an evaluation before training" if training_args.eval_on_start else
            f"no evaluation before training (more than {EVALUATION_SHARE:.0%} of the time budget; --eval_on_start "
            "makes one)")
        print(f"Evaluation: {tokens:,} validation tokens{cut}{timing}.", flush=True)
    return data


def configure_generation(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Sampling defaults for `generate()`, saved as `generation_config.json`; generation without a prompt (and the
    model config's `bos_token_id`) starts from the document-start token, as training does."""
    config = model.generation_config
    # A word-level model's EOS ends every line: it generates across lines, to `max_new_tokens`, as PyTorch's
    # word_language_model example does, rather than stop after one; and since its EOS pads too, a padding id would make
    # `generate()` without an attention mask read every line end in a prompt as padding.
    word_level = eos_ends_lines(tokenizer)
    config.pad_token_id = None if word_level else tokenizer.pad_token_id
    config.eos_token_id = None if word_level else tokenizer.eos_token_id
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
    return tokenizer.decode(output[0], **text_decoding(tokenizer))


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


def summarize_run(
    trainer: LSTMTrainer, data: TrainingData, data_args: DataArguments, card_args: CardArguments, metrics, wall_time,
    size_choice: SizeChoice | None = None,
) -> RunSummary:
    """What the model card reports about a finished run (`size_choice`: how `size_new_model` chose its size)."""
    args, state = trainer.args, trainer.state
    data_summary = data.summary(trainer.processing_class)
    evaluations = [entry["eval_runtime"] for entry in state.log_history if "eval_runtime" in entry]
    description, dataset_ids, language = describe_data(data_args)
    output_dir = Path(args.output_dir)
    return RunSummary(
        model_name=args.hub_model_id.split("/")[-1] if args.hub_model_id else output_dir.name,
        repo_id=args.hub_model_id or str(output_dir),
        metrics=metrics,
        log_history=state.log_history,
        hyperparameters={
            "steps": state.global_step,
            "saved_step": saved_weights_step(trainer),
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
            "bptt": data_summary.pop("bptt"),
        },
        **data_summary,
        wall_time_seconds=wall_time,
        evaluations=len(evaluations),
        evaluation_seconds=sum(evaluations),
        time_budget_seconds=args.time_budget_seconds or args.max_time,  # measuring included
        training_limit=trainer.training_limit(),
        training_stop=trainer.describe_training_stop(),
        **({"model_size": size_choice.describe()} if size_choice else {}),
        data_description=description,
        dataset_ids=dataset_ids,
        language=card_args.language or language,
        license=card_args.license,
        example_prompt="ROMEO:" if data_args.uses_default_corpus else "The",
        unit=perplexity_unit(trainer.processing_class),
    )


def saved_weights_step(trainer: LSTMTrainer) -> int:
    """The step whose weights the run saves: its best checkpoint's with `--load_best_model_at_end` (which `Trainer`
    loads back at the end), else its last."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return int(Path(best).name.rsplit("-", 1)[-1])  # Trainer names them checkpoint-<step>
    return trainer.state.global_step


def final_evaluation(trainer: LSTMTrainer, trained: bool) -> dict[str, float]:
    """The validation metrics of the final weights. When training ended with an evaluation of these very weights (its
    last step, and no earlier best checkpoint loaded back), its metrics are reused rather than a second pass made over
    the validation text, which can cost more than a short time budget's training."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    same_weights = saved_weights_step(trainer) == state.global_step
    if trained and last is not None and last.get("step") == state.global_step and same_weights:
        return {key: value for key, value in last.items() if key.startswith("eval_") or key == "epoch"}
    return trainer.evaluate()


logger = logging.getLogger(__name__)


class TrainingTextCheck(TrainerCallback, ExportableState):
    """Keeps the size, digest and BPTT length of the training data (`TrainingData.train_tokens`, its blocks,
    `TrainingData.train_digest` and `block_size`) in every checkpoint (`trainer_state.json`), and warns when a run
    resumes on other data: the steps done, and under stateful BPTT the streams' positions, refer to the text the
    checkpoint was trained on. A resumed run left to choose its BPTT length takes the one kept, and takes the
    seconds its sizing spent out of its budget again (`checkpoint_sizing`)."""

    def __init__(self, training_data: dict[str, int | str]):
        self.training_data = training_data

    def state(self) -> dict:
        return {"args": {"training_data": self.training_data}, "attributes": {}}

    @classmethod
    def saved(cls, stateful_callbacks: dict) -> dict:
        """What a checkpoint's `TrainerState.stateful_callbacks` keep of the training data (empty if nothing)."""
        return stateful_callbacks.get(cls.__name__, {}).get("args", {}).get("training_data") or {}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = self.saved(state.stateful_callbacks)
        now = self.training_data
        if not state.is_world_process_zero or all(saved[key] == now[key] for key in saved.keys() & now.keys()):
            return  # a checkpoint from before the digest was kept compares the sizes only
        sizes = [f"{data['train_tokens']:,} tokens in {data['train_blocks']:,} blocks" for data in (saved, now)]
        change = f"{sizes[0]} then, {sizes[1]} now" if sizes[0] != sizes[1] else f"{sizes[1]}, but other tokens"
        logger.warning(f"Resuming on other training data, or other blocks of it, than the checkpoint's ({change}): "
                       "its steps and stream positions refer to the old blocks. To train a finished model further on "
                       "new text, start a new run from it (--model_name_or_path).")


REPORTED_METRICS = ("eval_loss", "eval_perplexity")
"""What each evaluation of `train` reports that can choose the best model (besides its timings)."""


def check_best_model_metric(training_args: LSTMTrainingArguments) -> None:
    """Raises `ValueError` when `--metric_for_best_model` is needed (`--load_best_model_at_end` or `--save_strategy
    best`) and is none that `train` reports: Trainer would fail at the first evaluation, after training."""
    metric = training_args.metric_for_best_model
    if metric is None or not (training_args.load_best_model_at_end or training_args.save_strategy == "best"):
        return
    if (metric if metric.startswith("eval_") else f"eval_{metric}") not in REPORTED_METRICS:  # as Trainer reads it
        raise ValueError(f"--metric_for_best_model {metric}: the evaluations report {' and '.join(REPORTED_METRICS)}; "
                         "give one of them.")


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: LSTMTrainingArguments,
    card_args: CardArguments | None = None,
    callbacks: list | None = None,
    do_train: bool = True,
    do_eval: bool = True,
) -> TrainingResult:
    """Trains (or fine-tunes) a model and writes it, its tokenizer, results and card to `output_dir`.

    With `do_train=False` only the evaluation runs; the card (which reports the evaluation) needs both.
    """
    start = time.time()
    check_resume(training_args, training_args.resume_from_checkpoint)  # before any work, and any folder is made
    check_best_model_metric(training_args)
    set_seed(training_args.seed)
    # The main process of each machine reads and tokenises first; the others then find its work in the `datasets`
    # cache rather than tokenise the whole corpus again beside it.
    with training_args.main_process_first(desc="reading and tokenising the text"):
        raw = load_text_datasets(data_args.source())
        tokenizer = build_tokenizer(model_args, data_args, raw["train"])
        data = build_training_data(raw, tokenizer, data_args, training_args)
    size_choice, data = size_new_model(model_args, data_args, training_args, raw, tokenizer, data)
    model = build_model(model_args, tokenizer)
    data = plan_evaluation(model, data, data_args, training_args)
    configure_generation(model, tokenizer)

    callbacks = [*(callbacks or []),
                 TrainingTextCheck({"train_tokens": data.train_tokens(), "train_blocks": len(data.train),
                                    "train_digest": data.train_digest(), "block_size": data.block_size,
                                    "sizing_seconds": training_args.sizing_seconds})]
    if training_args.weight_averaging_patience is not None:
        callbacks.append(NonMonotonicAveraging(training_args.weight_averaging_patience))
    trainer = LSTMTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    output_dir = Path(training_args.output_dir)
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    if do_train:
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(train_output.metrics)
        configure_generation(trainer.model, tokenizer)  # Trainer.train made the tokenizer's EOS a stop token again
        # `_internal_call` keeps `save_model` from pushing now, before the card is written; the push comes last.
        trainer.save_model(str(output_dir), _internal_call=True)
    if do_eval:
        eval_metrics = final_evaluation(trainer, trained=do_train)
        eval_metrics["perplexity"] = eval_metrics["eval_perplexity"]  # the key run_clm.py writes
        metrics.update(eval_metrics)
    run = None
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        if do_train:
            trainer.save_metrics("train", train_output.metrics)
            trainer.save_state()
        if do_eval:
            trainer.save_metrics("eval", eval_metrics)
        trainer.save_metrics("all", metrics)
        if do_train and do_eval:
            run = summarize_run(
                trainer, data, data_args, card_args or CardArguments(), metrics, time.time() - start, size_choice
            )
            write_model_card(output_dir, trainer.model, tokenizer, run)
    if do_train and training_args.push_to_hub:
        trainer.push_to_hub()
    sample = sample_text(trainer.model, tokenizer)
    return TrainingResult(
        output_dir=output_dir, metrics=metrics, sample=sample, is_main_process=trainer.is_world_process_zero(), run=run,
        unit=perplexity_unit(tokenizer),
    )
