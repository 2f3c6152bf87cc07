"""CPU inference options: fp32, bf16 weights, and int8 through the ecosystem's quantisers: torch.ao's dynamic
quantisation of the LSTM and output layers, and transformers' `TorchAoConfig` (int8 weights; int8 weights and
activations) and `QuantoConfig` (int8 weights), which quantise `nn.Linear` layers, here the output layer.

For each: greedy generation speed (batch 1, the median of rounds that time the variants in turn) and the validation
perplexity on Tiny Shakespeare (last 10% by position, every character scored with its full left context), so the
speed-up is read beside what it costs. The `int8 layers` column says what each variant quantised (a tied output
layer is loaded as the embeddings, which `TorchAoConfig` and `QuantoConfig` leave alone).

    python benchmarks/inference.py --model lm-lstm-model    # a model trained by `lm-lstm train`
    python benchmarks/inference.py                          # trains a small one first (about a minute)
    python benchmarks/inference.py --quick
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from transformers import AutoModelForCausalLM, QuantoConfig, TorchAoConfig

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, load_average, write_results  # noqa: E402

from lm_lstm.arguments import (  # noqa: E402
    DataArguments, LSTMTrainingArguments, ModelArguments, fast_bf16_available,
)
from lm_lstm import modeling_lstm  # noqa: E402
from lm_lstm.data import DEFAULT_CORPUS  # noqa: E402
from lm_lstm.evaluation import evaluate_file, load_model_and_tokenizer  # noqa: E402
from lm_lstm.training import train  # noqa: E402


def train_small_model(output_dir: str, quick: bool) -> str:
    train(
        ModelArguments(tokenizer_type="char", embedding_size=32 if quick else 128, hidden_size=64 if quick else 512),
        DataArguments(block_size=64 if quick else 128, max_train_samples=64 if quick else None),
        LSTMTrainingArguments(output_dir=output_dir, max_steps=4 if quick else 200, eval_strategy="no",
                              save_strategy="no", load_best_model_at_end=False, eval_on_start=False,
                              report_to="none", disable_tqdm=True),
    )
    return output_dir


def variants(model, folder: str) -> dict[str, nn.Module]:
    models = {"fp32": model}
    if fast_bf16_available():  # elsewhere bf16 arithmetic is emulated: nothing to measure
        models["bf16 weights"] = copy.deepcopy(model).to(torch.bfloat16)
    models["torch.ao dynamic int8"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {nn.LSTM, nn.Linear}, dtype=torch.qint8
    )
    quantisers = {
        "TorchAoConfig int8 weights": TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[]),
        "TorchAoConfig int8 dynamic": TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=[]),
        "QuantoConfig int8 weights": QuantoConfig(weights="int8", modules_to_not_convert=[]),
    }
    for name, config in quantisers.items():  # `modules_to_not_convert=[]`: the output layer too
        models[name] = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()
    return models


def int8_layers(model: nn.Module) -> str:
    """Which layers hold int8 weights: those a quantiser replaced, or whose weight it made a tensor subclass."""
    head = model.lm_head
    layers = {
        "LSTM": type(model.model.layers[0].rnn) is not nn.LSTM,
        "output": type(head) is not nn.Linear or type(head.weight) is not nn.Parameter,
    }
    return " + ".join(name for name, int8 in layers.items() if int8) or "none"


def generation_speed(model, tokenizer, new_tokens: int) -> float:
    inputs = tokenizer("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", help="A trained lm-lstm folder (default: train a small one).")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of timing all variants in turn (median).")
    parser.add_argument("--note", help="Conditions of the run, written with the results (other work on the machine).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or train_small_model(str(Path(scratch) / "model"), args.quick)
        model, tokenizer = load_model_and_tokenizer(folder)
        text = DEFAULT_CORPUS.read_text(encoding="utf-8")
        validation = Path(scratch) / "validation.txt"
        validation.write_text(text[int(len(text) * 0.9) :][: 2000 if args.quick else None], encoding="utf-8")
        models = variants(model, folder)
        load_before = load_average()
        speeds = {name: [] for name in models}
        for _ in range(1 if args.quick else args.rounds):  # alternating, so that each variant sees the same load
            for name, variant in models.items():
                speeds[name].append(generation_speed(variant, tokenizer, 32 if args.quick else 512))
        load_after = load_average()
        rows = []
        for name, variant in models.items():
            score = evaluate_file(variant, tokenizer, validation, block_size=512)
            rows.append({"variant": name, "int8 layers": int8_layers(variant),
                         "tokens/s (batch 1)": statistics.median(speeds[name]),
                         "validation loss (nats/char)": score.loss, "perplexity": score.perplexity})
            print(rows[-1], flush=True)
    for row in rows:
        row["speed vs fp32"] = row["tokens/s (batch 1)"] / rows[0]["tokens/s (batch 1)"]
        row["perplexity change"] = f"{100 * (row['perplexity'] / rows[0]['perplexity'] - 1):+.2f}%"
    columns = ["variant", "int8 layers", "tokens/s (batch 1)", "speed vs fp32", "validation loss (nats/char)",
               "perplexity", "perplexity change"]
    write_results(args, "inference", rows, columns, extra={
        "model": args.model or "small model trained here",
        **({"note": args.note} if args.note else {}),
        "load average (1 min) before and after timing": (load_before, load_after),
        # fp32 steps take the kernel this process measured the fastest (`modeling_lstm.step_kernel`)
        "one-token step kernel chosen, by rows x weight shape": {
            " x ".join(map(str, shape)): ranking[0] for shape, ranking in modeling_lstm._step_kernel_ranking.items()
        },
    })


if __name__ == "__main__":
    main()
