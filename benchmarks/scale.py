"""Corpus size: what `lm-lstm train` costs, up to its first training step and for one evaluation, as the text grows.

For each size a synthetic corpus is written to a temporary folder (Tiny Shakespeare's paragraphs, shuffled and
repeated up to the size, as a user with more data of one kind would have; never committed), and one fresh process
per size runs the training job as `lm-lstm train --train_file big.txt` does (byte-level BPE, the default recipe's
model at its 512 hidden units, the 10-minute budget, an empty `datasets` cache), stopping after its first training
step. It reports, for that size:

- the time to read the text (`load`), train the tokenizer on its sample (`tokenizer`), tokenise it and lay it out
  (`tokenize`, and the MB/s of that), and from the start to the first training step;
- the peak resident memory of the process (`ru_maxrss`: file-backed pages of the memory-mapped tokens count too)
  and its peak anonymous memory (`RssAnon`, sampled every 0.1 s: what the process itself holds; the two tokenising
  workers are forked from it and hold a bounded batch each);
- the validation tokens of one evaluation, and its time (the final evaluation of the stopped run);
- the fast tokenizer's own speed here (`encode_batch_fast` on 4 MB of the text, one process, no offsets): the limit
  the tokenisation is read against.

    python benchmarks/scale.py                  # 10 MB and 100 MB (about 10 minutes on 2 cores)
    python benchmarks/scale.py --sizes 10 100 1000   # and 1 GB (add about 15 minutes)
    python benchmarks/scale.py --quick          # 0.1 MB and 0.2 MB, a tiny model: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, write_results  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "lm_lstm" / "corpus" / "tiny_shakespeare.txt"
MB = 1_000_000
COLUMNS = ["corpus MB", "load s", "tokenizer s", "tokenize s", "tokenize MB/s", "fast tokenizer MB/s",
           "first step s", "peak RSS MB", "peak anon MB", "eval tokens", "eval s"]


def write_corpus(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes (about) of Tiny Shakespeare's paragraphs, shuffled again for every pass over them."""
    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    rng = random.Random(seed)
    written = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size:
            rng.shuffle(paragraphs)
            chunk = "\n\n".join(paragraphs) + "\n\n"
            chunk = chunk[: size - written] if written + len(chunk) > size else chunk
            out.write(chunk)
            written += len(chunk.encode("utf-8"))


class AnonymousPeak:
    """The largest `RssAnon` of this process, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.1):
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1000


def child(corpus: Path, quick: bool) -> dict:
    """Runs the training job on `corpus` to its first step and one evaluation; returns the measurements."""
    start = time.perf_counter()
    anonymous = AnonymousPeak()
    from transformers import HfArgumentParser, TrainerCallback

    import lm_lstm.training as training
    from lm_lstm.arguments import CardArguments, DataArguments, LSTMTrainingArguments, ModelArguments

    phases: dict[str, float] = {}

    def timed(name, function):
        def run(*args, **kwargs):
            began = time.perf_counter()
            result = function(*args, **kwargs)
            phases[name] = time.perf_counter() - began
            return result
        return run

    training.load_text_datasets = timed("load s", training.load_text_datasets)
    training.build_tokenizer = timed("tokenizer s", training.build_tokenizer)
    training.build_training_data = timed("tokenize s", training.build_training_data)

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phases.setdefault("first step s", time.perf_counter() - start)

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    model = ["--hidden_size", "32", "--embedding_size", "16", "--max_time", "20", "--eval_on_start", "False",
             "--tokenizer_vocab_size", "300"] if quick else ["--hidden_size", "512"]
    with tempfile.TemporaryDirectory() as output:
        argv = ["--train_file", str(corpus), "--output_dir", output, "--report_to", "none", "--disable_tqdm", "True",
                "--preprocessing_num_workers", "2", "--save_strategy", "no", "--load_best_model_at_end", "False",
                *model]
        parsed = HfArgumentParser((ModelArguments, DataArguments, LSTMTrainingArguments, CardArguments))
        model_args, data_args, training_args, card_args = parsed.parse_args_into_dataclasses(args=argv)
        result = training.train(model_args, data_args, training_args, card_args, callbacks=[FirstStep()])
        tokenizer = training.load_tokenizer(output)
    peak_anonymous = anonymous.stop()
    corpus_mb = corpus.stat().st_size / MB
    return {
        "corpus MB": round(corpus_mb, 1),
        **{name: round(seconds, 1) for name, seconds in phases.items()},
        "tokenize MB/s": round(corpus_mb / phases["tokenize s"], 2),
        "fast tokenizer MB/s": round(fast_tokenizer_speed(tokenizer, corpus), 2),
        "peak RSS MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000),
        "peak anon MB": round(peak_anonymous),
        "eval tokens": result.run.eval_tokens,
        "eval s": round(result.run.evaluation_seconds / max(1, result.run.evaluations), 1),
        "evaluations": result.run.evaluations,
        "eval on start": training_args.eval_on_start,
    }


def fast_tokenizer_speed(tokenizer, corpus: Path, size: int = 4 * MB) -> float:
    """MB/s of the fast tokenizer alone on the first `size` bytes of `corpus`, in pieces of 64k characters."""
    text = corpus.read_bytes()[:size].decode("utf-8", errors="ignore")
    pieces = [text[start : start + 65536] for start in range(0, len(text), 65536)]
    began = time.perf_counter()
    for start in range(0, len(pieces), 32):
        tokenizer.backend_tokenizer.encode_batch_fast(pieces[start : start + 32], add_special_tokens=False)
    return len(text.encode("utf-8")) / MB / (time.perf_counter() - began)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 100], help="Corpus sizes in MB.")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the measuring process, given its corpus
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.child), args.quick)), flush=True)
        return
    sizes = [0.1, 0.2] if args.quick else args.sizes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            corpus = Path(folder) / f"corpus-{size:g}MB.txt"
            write_corpus(corpus, int(size * MB))
            # A fresh process and an empty `datasets` cache per size: nothing measured for one size carries over.
            env = {**os.environ, "HF_DATASETS_CACHE": str(Path(folder) / f"cache-{size:g}")}
            command = [sys.executable, __file__, "--child", str(corpus), *(["--quick"] if args.quick else [])]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{size:g} MB failed:\n{done.stderr[-4000:]}")
            line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
            rows.append(json.loads(line.removeprefix("RESULT ")))
            corpus.unlink()
            print(rows[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    write_results(args, "scale", rows, COLUMNS, extra={
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "load average at the end": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "job": "lm-lstm train --train_file CORPUS (byte-level BPE 8192, hidden 512, 10-minute budget) "
               "--preprocessing_num_workers 2, stopped after its first step; a fresh process and cache per size",
    })


if __name__ == "__main__":
    main()
