"""Model cards: the Hub README of a trained model, with every number taken from the run that produced it."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure

from .budget import format_duration, plain_number
from .evaluation import bits_per_byte
from .tokenization import tokenizer_kind

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
CONVERSION_TEMPLATE = Path(__file__).with_name("templates") / "converted_model_card.md"
CURVE_FILE = "training_curve.png"
TAGS = ["lstm", "rnn", "awd-lstm", "lm-lstm", "text-generation", "causal-lm"]
PERPLEXITY_NOTES = {
    "token": "Perplexity here is per token of this model's own tokenizer; compare models with different tokenizers "
    "by bits per byte.",
    "character": "Perplexity here is per character: this model's tokens are characters, except that a character "
    "its tokenizer never saw is read as one token per UTF-8 byte (and counts once per byte); compare models with "
    "other tokenizers by bits per byte, which equals bits per character on ASCII text.",
    "word": "Perplexity here is per word of this model's vocabulary (the PTB convention: every line end, `<eos>`, "
    "counts as a word, and a word outside the vocabulary is predicted as `<unk>`), comparable only between models "
    "of the same vocabulary; compare other models by bits per byte.",
}


@dataclass
class RunSummary:
    """What the card reports about a training run."""

    model_name: str
    repo_id: str
    metrics: dict[str, float]
    log_history: list[dict]
    hyperparameters: dict[str, object]
    train_blocks: int
    eval_blocks: int
    block_size: int
    train_tokens: int
    eval_tokens: int
    scored_tokens: int  # validation tokens the loss averages over
    validation_bytes: int  # bytes of text those tokens stand for
    evaluation_method: str
    wall_time_seconds: float
    data_description: str
    dataset_ids: list[str] = field(default_factory=list)
    language: str | None = None
    license: str = "apache-2.0"
    example_prompt: str = "The"
    time_budget_seconds: float | None = None  # `--max_time`
    training_limit: str = "steps"  # what ended training: 'time', 'steps' or 'epochs' (`LSTMTrainer.training_limit`)
    training_stop: str = ""  # why the time budget ended training where it did (`LSTMTrainer.describe_training_stop`)
    model_size: str = "set by the training options"  # how the size was chosen (`SizeChoice.describe`)
    unit: str = "token"  # what loss and perplexity are per (`perplexity_unit`): "word" or "character" by tokenizer
    evaluations: int = 0  # validation passes, during training and after it
    evaluation_seconds: float = 0.0  # their time in all

    def describe_evaluation_time(self) -> str:
        """'3 evaluations, 41.2 s in all (13.7 s each)', or 'none'."""
        if not self.evaluations:
            return "none"
        each = self.evaluation_seconds / self.evaluations
        plural = "s" if self.evaluations > 1 else ""
        return f"{self.evaluations} evaluation{plural}, {self.evaluation_seconds:.1f} s in all ({each:.1f} s each)"

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.metrics["eval_loss"] * self.scored_tokens, self.validation_bytes)


def hardware_description() -> str:
    """The accelerator, or the CPU model and core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def plot_training_curve(log_history: list[dict], path: Path, unit: str = "token") -> None:
    """Training and validation loss (nats per `unit`) against steps, as a PNG."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    # The object API draws without pyplot, so no process-wide backend is chosen or switched.
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    for points, label, style in ((train, "training loss", "-"), (evals, "validation loss", "o-")):
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss (nats per {unit})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _format(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def describe_warmup(warmup_steps: float) -> str:
    """`--warmup_steps` in words: a number of steps, or below 1 a fraction of training (of its time, under a
    budget)."""
    if warmup_steps <= 0:
        return "no warm-up"
    if warmup_steps < 1:
        percent = warmup_steps * 100
        if percent < 1e-6:
            return "warm-up over less than the first 0.000001% of training"
        return f"warm-up over the first {plain_number(percent)}% of training"
    steps = f"{warmup_steps:,.0f}" if float(warmup_steps).is_integer() else f"{warmup_steps:g}"
    return f"{steps} warm-up step{'s' if warmup_steps != 1 else ''}"


def describe_saved_step(hyperparameters: dict) -> str:
    """Which step's weights the folder holds, where it is not the last (`--load_best_model_at_end`)."""
    saved, last = hyperparameters.get("saved_step", hyperparameters["steps"]), hyperparameters["steps"]
    if saved == last:
        return ""
    return f"; the saved weights are step {saved:,}'s, the best validation loss (`--load_best_model_at_end`)"


def describe_limit(run: RunSummary) -> str:
    """What ended training, in words."""
    h = run.hyperparameters
    if run.training_limit == "time":
        stop = f", {run.training_stop}" if run.training_stop else ""
        return f"the time budget ({format_duration(run.time_budget_seconds)}){stop}"
    if run.training_limit == "steps":
        return f"the step limit ({h['steps']:,} steps)"
    return f"the epoch limit ({_format(h['epochs'], 2)} epochs)"


def describe_generation(config) -> str:
    """What `generate()` does by default, from the model's `GenerationConfig` (saved as `generation_config.json`)."""
    beams = f" with {config.num_beams} beams" if (config.num_beams or 1) > 1 else ""  # unset options are None
    if not config.do_sample:
        return f"uses beam search{beams} by default" if beams else "decodes greedily by default"
    settings = [f"temperature {config.temperature if config.temperature is not None else 1.0:g}"]
    settings += [f"top-k {config.top_k}"] if config.top_k else []
    settings += [f"top-p {config.top_p:g}"] if config.top_p is not None and config.top_p < 1 else []
    return (f"samples{beams} by default ({', '.join(settings)}; `generation_config.json`): pass `do_sample=False` "
            f"to `generate()` or the pipeline, or `--no-do_sample` to `lm-lstm generate`, "
            f"{'for beam search without sampling' if beams else 'to decode greedily'}")


def describe_lstm_layers(count: int) -> str:
    """"1 LSTM layer", "2 LSTM layers"."""
    return f"{count} LSTM layer{'s' if count != 1 else ''}"


def architecture_fields(model, tokenizer) -> dict[str, object]:
    """The template fields that describe the model and its tokenizer (the cards' "Model" table) and how it generates."""
    config = model.config
    return dict(
        generation=describe_generation(model.generation_config),
        num_layers=config.num_hidden_layers,
        lstm_layers=describe_lstm_layers(config.num_hidden_layers),
        vocab_size=config.vocab_size,
        tokenizer_kind=tokenizer_kind(tokenizer),
        parameters=f"{model.num_parameters():,}",
        embedding_size=config.embedding_size,
        layer_sizes=", ".join(str(size) for _, size in config.layer_sizes),
        tied="yes" if config.tie_word_embeddings else "no",
        dropouts=" / ".join(
            str(getattr(config, name))
            for name in ("embedding_dropout", "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout")
        ),
    )


def write_model_card(output_dir: str | Path, model, tokenizer, run: RunSummary) -> Path:
    """Writes `README.md` and the training-curve PNG into `output_dir`; returns the card's path."""
    output_dir = Path(output_dir)
    plot_training_curve(run.log_history, output_dir / CURVE_FILE, run.unit)
    perplexity = run.metrics["eval_perplexity"]
    dataset_name = run.dataset_ids[0] if run.dataset_ids else "validation text"
    card_data = ModelCardData(
        model_name=run.model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        license=run.license,
        language=run.language,
        datasets=run.dataset_ids or None,
        eval_results=[
            EvalResult(
                task_type="text-generation", dataset_type=run.dataset_ids[0] if run.dataset_ids else "text",
                dataset_name=dataset_name, dataset_split="validation", metric_type=metric, metric_name=name,
                metric_value=round(value, 6),
            )
            for metric, name, value in (
                ("perplexity", f"Validation perplexity per {run.unit}", perplexity),
                ("bits_per_byte", "Validation bits per byte", run.bits_per_byte),
                ("loss", f"Validation loss (nats per {run.unit})", run.metrics["eval_loss"]),
            )
        ],
    )
    h = run.hyperparameters
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=run.model_name,
        repo_id=run.repo_id,
        example_prompt=repr(run.example_prompt),
        **architecture_fields(model, tokenizer),
        data_description=run.data_description,
        block_size=run.block_size,
        train_blocks=f"{run.train_blocks:,}",
        eval_blocks=f"{run.eval_blocks:,}",
        train_tokens=f"{run.train_tokens:,}",
        eval_tokens=f"{run.eval_tokens:,}",
        evaluation_method=run.evaluation_method,
        bptt=h["bptt"],
        steps=f"{h['steps']:,}",
        epochs=_format(h["epochs"], 2),
        batch_size=h["batch_size"],
        optimizer=h["optimizer"],
        learning_rate=h["learning_rate"],
        weight_decay=h["weight_decay"],
        scheduler=h["scheduler"],
        warmup=describe_warmup(h["warmup_steps"]),
        max_grad_norm=h["max_grad_norm"],
        precision=h["precision"],
        seed=h["seed"],
        hardware=hardware_description(),
        time_budget=(
            f"{format_duration(run.time_budget_seconds)} of training, evaluations included"
            if run.time_budget_seconds else "none"
        ),
        training_limit=describe_limit(run) + describe_saved_step(h),
        model_size=run.model_size,
        wall_time=f"{run.wall_time_seconds / 60:.1f} minutes",
        evaluation_time=run.describe_evaluation_time(),
        curve_file=CURVE_FILE,
        eval_loss=_format(run.metrics["eval_loss"]),
        perplexity=_format(perplexity, 3),
        bits_per_byte=_format(run.bits_per_byte),
        data_caveat="" if run.dataset_ids else " The training text is described above; judge its contents before use.",
        unit=run.unit,
        perplexity_note=PERPLEXITY_NOTES.get(run.unit, PERPLEXITY_NOTES["token"]),
    )
    path = output_dir / "README.md"
    card.save(path)
    return path


@dataclass
class ConversionSummary:
    """What the card of a converted checkpoint (`lm_lstm.convert`) reports about its source."""

    model_name: str
    repo_id: str
    source_name: str  # the codebase, in words
    source_url: str
    checkpoint_file: str
    checkpoint_sha256: str
    checkpoint_kind: str  # how the checkpoint was saved, in words
    vocabulary_source: str
    dropouts_recorded: bool  # whether the config's dropouts come from the checkpoint (else they are 0)
    max_logit_difference: float
    checked_tokens: int
    notes: list[str] = field(default_factory=list)
    awd_lstm: bool = False  # cite AWD-LSTM (else the PyTorch example's reference, Zaremba et al.)


def write_conversion_card(output_dir: str | Path, model, tokenizer, conversion: ConversionSummary) -> Path:
    """Writes the `README.md` of a converted checkpoint into `output_dir`; returns its path."""
    card_data = ModelCardData(
        model_name=conversion.model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[tag for tag in TAGS if conversion.awd_lstm or tag != "awd-lstm"] + ["converted"],
    )
    dropouts = (
        "the source model's, read from the checkpoint" if conversion.dropouts_recorded
        else "0: a state_dict does not record them; set them before fine-tuning"
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(CONVERSION_TEMPLATE),
        model_name=conversion.model_name,
        repo_id=conversion.repo_id,
        source_name=conversion.source_name,
        source_url=conversion.source_url,
        checkpoint_file=conversion.checkpoint_file,
        checkpoint_sha256=conversion.checkpoint_sha256,
        checkpoint_kind=conversion.checkpoint_kind,
        vocabulary_source=conversion.vocabulary_source,
        dropout_origin=dropouts,
        max_logit_difference=f"{conversion.max_logit_difference:.2g}",
        checked_tokens=conversion.checked_tokens,
        notes="".join(f"- {note}\n" for note in conversion.notes),
        awd_lstm=conversion.awd_lstm,
        **architecture_fields(model, tokenizer),
    )
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path
