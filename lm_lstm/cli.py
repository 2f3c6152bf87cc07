"""The `lm-lstm` command: train, generate, evaluate, surprisal, push, convert, export.

Every failure the user can fix (a bad file, a bad option value, a missing model) ends with a one-line message on
stderr and a non-zero exit status; set LM_LSTM_DEBUG=1 to see the traceback instead. Each command imports what it
needs when it runs, so `lm-lstm --help` and `lm-lstm generate` do not load the training stack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from .messages import first_line

COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}


class UsageError(ValueError):
    """A bad command line; the message says what to change."""


def command(name: str, summary: str):
    def register(function: Callable[[list[str]], int]):
        COMMANDS[name] = (summary, function)
        return function

    return register


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`HfArgumentParser`'s "(default: ...)" after each option's help, except where the help says its default in
    words ("Default: chosen ..."): the `None` that stands for "chosen" would contradict it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "Default:" in (action.help or "") else super()._get_help_string(action)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Makes the parser report bad arguments as one line (no usage block) by raising `UsageError`."""

    def error(message: str):
        raise UsageError(f"{parser.prog}: {message} (see --help)")

    parser.error = error
    return parser


@command("train", "train a model on text files (default: the bundled Tiny Shakespeare corpus)")
def train_command(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from .arguments import CardArguments, DataArguments, LSTMTrainingArguments, ModelArguments
    from .card import describe_limit, describe_saved_step
    from .evaluation import describe_unit
    from .training import train

    parser = one_line_errors(
        HfArgumentParser(
            (ModelArguments, DataArguments, LSTMTrainingArguments, CardArguments),
            prog="lm-lstm train",
            description="Train an LSTM language model; option names follow TrainingArguments and run_clm.py.",
            formatter_class=DefaultsHelpFormatter,
        )
    )
    model_args, data_args, training_args, card_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.do_predict:
        raise UsageError("lm-lstm train: --do_predict is not supported (there is no prediction step); drop it.")
    # The command always trains and evaluates: TrainingArguments turns --do_eval on by itself whenever evaluations
    # are scheduled, so --do_train / --do_eval cannot say what was asked (examples/run_clm.py takes them).
    result = train(model_args, data_args, training_args, card_args)
    if not result.is_main_process:
        return 0
    if result.run is not None:
        run = result.run
        print(f"\nTraining ended by {describe_limit(run)}: {run.hyperparameters['steps']:,} steps, "
              f"{run.wall_time_seconds / 60:.1f} minutes; evaluation: {run.describe_evaluation_time()}"
              f"{describe_saved_step(run.hyperparameters)}.")
    print(f"\nValidation perplexity: {result.metrics['eval_perplexity']:.3f} per {describe_unit(result.unit)}; "
          f"loss {result.metrics['eval_loss']:.4f} nats per {result.unit}")
    print(f"Model, tokenizer and card written to {result.output_dir}\n\nSample:\n{result.sample}")
    return 0


def _generation_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-lstm generate", description="Generate text from a trained model.")
    parser.add_argument("--model", required=True, help="Model folder (or Hub name).")
    parser.add_argument("--prompt", default="\n", help="Text to continue (default: a new line); '' starts a document.")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="Tokens to generate.")
    parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None,
                        help="Sample (default: as in the model's generation_config.json); --no-do_sample is greedy.")
    parser.add_argument("--temperature", type=float, help="Sampling temperature.")
    parser.add_argument("--top_k", type=int, help="Sample among the k likeliest tokens.")
    parser.add_argument("--top_p", type=float, help="Nucleus sampling probability mass.")
    parser.add_argument("--num_beams", type=int, help="Beam search width.")
    parser.add_argument("--repetition_penalty", type=float, help="Penalty for repeated tokens (> 1 discourages).")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="Independent continuations.")
    parser.add_argument("--seed", type=int, default=None, help="Random seed for sampling.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's code.")
    return one_line_errors(parser)


@command("generate", "continue a prompt with a trained model (streamed)")
def generate_command(argv: list[str]) -> int:
    args = _generation_parser().parse_args(argv)
    for name in ("num_beams", "num_return_sequences", "max_new_tokens", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"lm-lstm generate: --{name} must be at least 1, got {getattr(args, name)}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"lm-lstm generate: --top_p must be in (0, 1], got {args.top_p}.")
    from transformers import TextStreamer, set_seed

    from .evaluation import load_model_and_tokenizer
    from .tokenization import encode_prompt, text_decoding

    if args.seed is not None:
        set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    options = {
        name: getattr(args, name)
        for name in ("do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")
        if getattr(args, name) is not None
    }
    inputs = encode_prompt(tokenizer, args.prompt)
    streams = options.get("num_beams", 1) == 1 and args.num_return_sequences == 1
    streamer = TextStreamer(tokenizer, **text_decoding(tokenizer)) if streams else None
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.num_return_sequences,
        streamer=streamer,
        **options,
    )
    if not streams:
        for sequence in output:
            print(tokenizer.decode(sequence, **text_decoding(tokenizer)), end="\n\n")
    return 0


@command("evaluate", "perplexity and bits per byte of a model on a text file")
def evaluate_command(argv: list[str]) -> int:
    from .evaluation import CONTEXT_POLICIES, describe_unit, evaluate_file, load_model_and_tokenizer, perplexity_unit
    from .evaluation import __doc__ as CONTEXT_POLICIES_HELP

    parser = argparse.ArgumentParser(
        prog="lm-lstm evaluate", description=CONTEXT_POLICIES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Model folder (or Hub name).")
    parser.add_argument("--file", required=True, help="Text file to score.")
    parser.add_argument("--block_size", type=int, default=512, help="Tokens per forward pass (carry) or per block.")
    parser.add_argument("--context", choices=CONTEXT_POLICIES, default="carry", help="Context policy (see above).")
    parser.add_argument("--batch_size", type=int, default=16, help="Blocks per forward pass (blocks policy).")
    parser.add_argument("--text_column", default="text", help="The column holding the text in tabular files.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's code.")
    args = one_line_errors(parser).parse_args(argv)
    if args.block_size < 2 or args.batch_size < 1:
        raise UsageError("lm-lstm evaluate: --block_size must be >= 2 and --batch_size >= 1.")
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    score = evaluate_file(model, tokenizer, args.file, args.block_size, args.context, args.batch_size,
                          args.text_column, progress=True)
    unit = perplexity_unit(tokenizer)
    block = f"{args.block_size} {unit}s"
    context = (f"the whole file as one stream, the state carried from one pass of {block} to the next"
               if args.context == "carry" else f"independent blocks of {block}, each from a zero state")
    rows = [
        ("file", args.file),
        ("context", f"{args.context}: {context}"),
        ("unit", describe_unit(unit)),
        (f"{unit}s scored", score.tokens),
    ]
    if score.left_out:
        rows.append((f"{unit}s left out", f"{score.left_out} ({unit}s that do not fill a block of {args.block_size}, "
                                          "left out as in training)"))
    rows += [(f"loss (nats/{unit})", f"{score.loss:.6f}"), ("perplexity", f"{score.perplexity:.4f}"),
             ("bits per byte", f"{score.bits_per_byte:.4f}")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


@command("surprisal", "per-token or per-word surprisal (bits) of each line or document of a text file")
def surprisal_command(argv: list[str]) -> int:
    from . import surprisal

    parser = argparse.ArgumentParser(
        prog="lm-lstm surprisal", description=surprisal.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Model folder (or Hub name).")
    parser.add_argument("--file", required=True, help="Text file (.txt, or .json/.jsonl/.csv/.parquet records).")
    parser.add_argument("--unit", choices=surprisal.UNITS, default="word", help="Report tokens or words (see above).")
    parser.add_argument("--format", choices=surprisal.FORMATS, default="tsv",
                        help="tsv: one row per token or word, with a header; jsonl: one object per line or document.")
    parser.add_argument("--by", choices=surprisal.ITEMS, default="line", help="Report each line or each document.")
    parser.add_argument("--carry_state", action="store_true",
                        help="Carry the state from line to line (connected text) instead of starting each afresh.")
    parser.add_argument("--output", help="Write here instead of to standard output.")
    parser.add_argument("--block_size", type=int, default=512, help="Tokens per forward pass (the result is the same).")
    parser.add_argument("--text_column", default="text", help="The column holding the text in tabular files.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's code.")
    args = one_line_errors(parser).parse_args(argv)
    if args.block_size < 1:
        raise UsageError(f"lm-lstm surprisal: --block_size must be at least 1, got {args.block_size}.")
    from .data import check_text_file
    from .evaluation import load_model_and_tokenizer

    check_text_file(args.file)  # before the model loads
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    items = surprisal.file_surprisals(model, tokenizer, args.file, by=args.by, carry_state=args.carry_state,
                                      block_size=args.block_size, text_column=args.text_column)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            surprisal.write_surprisals(items, out, unit=args.unit, format=args.format, by=args.by)
    else:
        surprisal.write_surprisals(items, sys.stdout, unit=args.unit, format=args.format, by=args.by)
    return 0


@command("push", "upload a trained model folder to the Hugging Face Hub")
def push_command(argv: list[str]) -> int:
    from .hub import files_to_upload, push_folder

    parser = argparse.ArgumentParser(prog="lm-lstm push", description="Upload a trained model folder to the Hub.")
    parser.add_argument("folder", help="The model folder written by `lm-lstm train`.")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="USER/NAME on the Hub.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", help="Branch to push to (created if needed; default: main).")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`).")
    parser.add_argument("--include_checkpoints", action="store_true", help="Upload checkpoint-* folders too.")
    parser.add_argument("--include_logs", action="store_true", help="Upload TensorBoard logs and trainer state too.")
    args = one_line_errors(parser).parse_args(argv)
    files = files_to_upload(args.folder, args.include_checkpoints, args.include_logs)
    url = push_folder(
        args.folder, args.repo_id, private=args.private, revision=args.revision, token=args.token,
        include_checkpoints=args.include_checkpoints, include_logs=args.include_logs,
    )
    print(f"Uploaded {len(files)} files to {args.repo_id}: {', '.join(files)}\n{url}")
    return 0


@command("convert", "convert a PyTorch-example or AWD-LSTM checkpoint into a model folder")
def convert_command(argv: list[str]) -> int:
    from .convert import SOURCES
    from .convert import __doc__ as CONVERT_HELP

    parser = argparse.ArgumentParser(
        prog="lm-lstm convert", description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="The checkpoint: a whole pickled model, a state_dict, or .safetensors.")
    vocabulary = parser.add_mutually_exclusive_group(required=True)
    vocabulary.add_argument("--vocab", help="Vocabulary: one word per line (line i is id i), or a saved data.Corpus.")
    vocabulary.add_argument("--train_file", nargs="+",
                            help="Build the vocabulary as data.Corpus does from these files, in this order "
                                 "(train.txt valid.txt test.txt).")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted model to.")
    parser.add_argument("--source", choices=SOURCES, help="The checkpoint's format (default: read from its keys).")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Write into a non-empty --output_dir.")
    args = one_line_errors(parser).parse_args(argv)
    from .card import describe_lstm_layers
    from .convert import SOURCE_NAMES, convert_checkpoint

    result = convert_checkpoint(args.checkpoint, args.output_dir, vocab_file=args.vocab, train_files=args.train_file,
                                source=args.source, overwrite=args.overwrite_output_dir)
    checkpoint, config = result.checkpoint, result.config
    sizes = ", ".join(str(size) for _, size in config.layer_sizes)
    print(f"Read {checkpoint.path} ({SOURCE_NAMES[checkpoint.source]}, {checkpoint.kind}) without running code from it.")
    print(f"Model: {describe_lstm_layers(config.num_hidden_layers)} ({sizes}), embedding {config.embedding_size}, "
          f"{'tied' if config.tie_word_embeddings else 'untied'}, vocabulary {config.vocab_size:,} words from "
          f"{result.vocabulary_source}.")
    print(f"Largest logit difference from the source on {result.checked_tokens} random tokens: "
          f"{result.max_logit_difference:.2g}")
    for note in checkpoint.notes:
        print(f"Note: {note}")
    print(f"Model, tokenizer and card written to {result.output_dir}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(result.output_dir)!r}, trust_remote_code=True).")
    return 0


@command("export", "export a model folder as ONNX graphs with explicit state, for onnxruntime")
def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lm-lstm export",
        description="Write a prefill and a one-token decode graph with the recurrent state as inputs and outputs, "
                    "their onnx_config.json and the tokenizer; lm_lstm.onnx_generation.OnnxLM runs them.",
    )
    parser.add_argument("model", help="Model folder (or Hub name).")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="Export format.")
    parser.add_argument("--output_dir", required=True, help="Folder to write the graphs to.")
    parser.add_argument("--opset", type=int, help="ONNX opset version, from 18 (default: 20).")
    parser.add_argument("--int8", action="store_true",
                        help="Quantise the weights to int8 (onnxruntime dynamic quantisation): faster, less exact.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Write into a non-empty --output_dir.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's code.")
    args = one_line_errors(parser).parse_args(argv)
    from .evaluation import load_model_and_tokenizer
    from .export import ONNX_OPSET, export_onnx, max_logit_difference

    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    output_dir = export_onnx(model, args.output_dir, tokenizer, opset=ONNX_OPSET if args.opset is None else args.opset, int8=args.int8,
                             overwrite=args.overwrite_output_dir)
    print(f"Prefill and decode graphs, onnx_config.json and the tokenizer written to {output_dir}")
    print(f"Largest logit difference from the model (onnxruntime, prefill and one decode step): "
          f"{max_logit_difference(model, output_dir):.2g}")
    return 0


def _usage() -> str:
    lines = ["usage: lm-lstm COMMAND [options]   (lm-lstm COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (summary, _) in COMMANDS.items()]
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_weight_file_progress() -> Iterator[None]:
    """Within the block, the progress bars of transformers' own loops, which go over a model's weight files ("Loading
    weights", "Writing model shards"), are off: they flash by for a model of this size, and each checkpoint's broke
    into the training bar. The Trainer's bars and the Hub's download bars are others, and stay. The hook set before
    is restored after."""
    from transformers.utils.logging import set_tqdm_hook

    previous = set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_tqdm_hook(previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lm-lstm: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        with quiet_weight_file_progress():
            return COMMANDS[name][1](rest)
    # UsageError and DataError are ValueErrors; RuntimeError and ImportError come from torch and from optional
    # integrations (out of memory, --report_to a tracker that is not installed).
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        if os.environ.get("LM_LSTM_DEBUG"):
            raise
        message = first_line(error)
        message = message.removeprefix(f"lm-lstm {name}: ")  # usage errors name the command already
        print(f"lm-lstm {name}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:
        # The `tokenizers` library raises plain Exceptions, such as a word-level vocabulary without `<unk>` (a
        # converted checkpoint's) meeting a word it lacks: one line as well. Anything else is a bug: its traceback.
        if type(error) is not Exception or os.environ.get("LM_LSTM_DEBUG"):
            raise
        reason = "a word of the text is not in the vocabulary, which has no <unk>" if "Missing [UNK]" in str(error) \
            else str(error).strip().splitlines()[0]
        print(f"lm-lstm {name}: error: the tokenizer failed: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lm-lstm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
