"""One-token decoding kernels: `F.linear`, `step_matmul` (`weight @ rows.T`) and `transposed_matmul` (`rows @ W_T`,
a row-major copy of the weight's transpose that a cache keeps), alone and in the decode step; lm-lstm's `step_kernel`
chooses among them.

1. The output layer of config B (33,278 x 650, fp32) on 1 to 1024 rows, by each kernel.
2. The whole decode step `model(token, cache=cache)` of lm-lstm at config B, each kernel forced for every product
   (`F.linear` is `torch.lstm_cell` for the gates, the plain path), at batch 1, 2, 8 and 32.
3. Greedy decoding at batch 1, in tokens/s, at issue #15's sizes (10,000-token vocabulary, 650 x 2, tied) and at
   those of the main job's model (`lm-lstm train`: 259 characters, embeddings of 128, 512 x 2, untied):
   `generate()` with the kernel choice it makes on this machine (`step_kernel`), against the plain stepping
   loops a user would write over the same weights: `nn.LSTM` called a token at a time, and `torch.lstm_cell` with
   `F.linear` and oneDNN off (`step_kernels_generate.*`).
4. Short generations at the same sizes (4, 16 and 64 new tokens): `generate()` as it chooses, passing over the
   transposed copies where the steps a call may take do not pay for making them (`TransposedWeights.pays`), against
   `generate()` making them whenever the copy ranks first, as before that rule (`step_kernels_short_generate.*`).

The methods alternate round after round in this one process; the tables hold medians. Run it natively and kept to
AVX2 as on an AVX2-only CPU (`ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2`: oneDNN,
MKL and PyTorch's own kernels; the results name gets `_onednn-avx2_mkl-avx2_aten-avx2`).

    python benchmarks/step_kernels.py           # about two minutes
    python benchmarks/step_kernels.py --quick
"""

from __future__ import annotations

import functools
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, limits_suffix, load_average, median_seconds, write_results  # noqa: E402

from lm_lstm import LSTMConfig, LSTMForCausalLM  # noqa: E402
from lm_lstm import modeling_lstm  # noqa: E402

FULL = {"vocab": 33278, "width": 650, "layers": 2, "kernel rows": [1, 2, 4, 8, 64, 1024], "step batches": [1, 2, 8, 32],
        "repeats": 20, "rounds": 3}
QUICK = {"vocab": 500, "width": 32, "layers": 2, "kernel rows": [1, 2], "step batches": [1], "repeats": 2, "rounds": 1}
GENERATE = [  # issue #15's sizes, then the main job's model
    {"vocab": 10_000, "embedding": 650, "width": 650, "layers": 2, "tied": True, "new tokens": 128, "rounds": 9},
    {"vocab": 259, "embedding": 128, "width": 512, "layers": 2, "tied": False, "new tokens": 128, "rounds": 9},
]
GENERATE_QUICK = [{"vocab": 500, "embedding": 32, "width": 32, "layers": 2, "tied": True, "new tokens": 8, "rounds": 1}]
SHORT_NEW_TOKENS, SHORT_NEW_TOKENS_QUICK = (4, 16, 64), (2,)


def alternate(methods: dict[str, Callable[[], object]], repeats: int, rounds: int) -> dict[str, float]:
    """Median milliseconds of each method, timed in turn for `rounds` rounds of `repeats` calls."""
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            times[name].append(1e3 * median_seconds(method, repeats, warmup=2))
    return {name: statistics.median(values) for name, values in times.items()}


KERNELS = {"before ms (F.linear, lstm_cell)": "linear", "step_matmul ms": "step_matmul",
           "transposed_matmul ms": "transposed_matmul"}  # column: `modeling_lstm.STEP_KERNELS` name


def kernel_rows(sizes: dict) -> list[dict]:
    """The output layer's product alone, the weight read again at each call (so from the caches, where it fits)."""
    weight = torch.randn(sizes["vocab"], sizes["width"])
    rows = []
    for count in sizes["kernel rows"]:
        inputs = torch.randn(count, sizes["width"])
        transposed = modeling_lstm.TransposedWeights()
        with torch.no_grad():
            ms = alternate({column: functools.partial(modeling_lstm.step_kernel_named(name, transposed), inputs, weight)
                            for column, name in KERNELS.items()}, sizes["repeats"], sizes["rounds"])
        rows.append({"measure": f"output layer {sizes['vocab']} x {sizes['width']}", "rows": count, **ms})
        print(rows[-1], flush=True)
    return rows


def decode_step_rows(sizes: dict) -> list[dict]:
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=sizes["vocab"], embedding_size=sizes["width"], hidden_size=sizes["width"],
                        num_hidden_layers=sizes["layers"], tie_word_embeddings=True)
    model = LSTMForCausalLM(config).eval()
    rows = []
    for batch in sizes["step batches"]:
        prompt = torch.randint(0, sizes["vocab"], (batch, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            cache = model(prompt, use_cache=True).cache

        @torch.no_grad()
        def step(kernel: str) -> None:
            with mock.patch.object(modeling_lstm, "STEP_KERNEL", kernel):  # forced, not measured per machine
                model(prompt[:, -1:], cache=cache, use_cache=True)

        ms = alternate({column: functools.partial(step, name) for column, name in KERNELS.items()},
                       sizes["repeats"], sizes["rounds"])
        rows.append({"measure": "decode step, config B sizes", "rows": batch, **ms})
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def nn_lstm_loop(model: LSTMForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens by the model's own `nn.LSTM` modules called one token at a time, then its output layer."""
    states = [None] * len(model.model.layers)
    token, tokens = prompt, []
    for _ in range(new_tokens):
        hidden = model.get_input_embeddings()(token)
        for index, layer in enumerate(model.model.layers):
            hidden, states[index] = layer.rnn(hidden, states[index])
        token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, 1)


@torch.no_grad()
def lstm_cell_loop(model: LSTMForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens by `torch.lstm_cell` over the model's weights and `F.linear`, oneDNN off, the prompt fed a token
    at a time."""
    rnns = [layer.rnn for layer in model.model.layers]
    states = [(prompt.new_zeros(prompt.shape[0], rnn.hidden_size, dtype=torch.float32),) * 2 for rnn in rnns]
    tokens = []
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
        warnings.filterwarnings("ignore", message="TF32 acceleration")  # the flags' restore of a GPU-only setting
        for position in range(prompt.shape[1] + new_tokens - 1):
            token = prompt[:, position] if position < prompt.shape[1] else tokens[-1][:, 0]
            hidden = F.embedding(token, model.get_input_embeddings().weight)
            for index, rnn in enumerate(rnns):
                states[index] = torch.lstm_cell(hidden, states[index], rnn.weight_ih_l0, rnn.weight_hh_l0,
                                                rnn.bias_ih_l0, rnn.bias_hh_l0)
                hidden = states[index][0]
            if position >= prompt.shape[1] - 1:
                tokens.append(F.linear(hidden, model.lm_head.weight, model.lm_head.bias).argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


def generate_row(sizes: dict) -> dict:
    """Tokens/s of greedy decoding at batch 1 by `generate()` and by the two plain loops, which must agree."""
    model = lstm_model(sizes)
    prompt = torch.randint(0, sizes["vocab"], (1, 8), generator=torch.Generator().manual_seed(1))
    count = sizes["new tokens"]

    @torch.no_grad()
    def generate() -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                              min_new_tokens=count, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]

    methods = {"generate()": generate, "nn.LSTM loop": lambda: nn_lstm_loop(model, prompt, count),
               "lstm_cell loop, oneDNN off": lambda: lstm_cell_loop(model, prompt, count)}
    first = {name: method() for name, method in methods.items()}  # warm-up; `generate()` measures its kernels here
    assert all(torch.equal(tokens, first["generate()"]) for tokens in first.values()), "the loops disagree"
    ms = alternate(methods, repeats=1, rounds=sizes["rounds"])
    tying = "tied" if sizes["tied"] else f"embeddings of {sizes['embedding']}, untied"
    row = {"measure": f"greedy decoding, batch 1, {sizes['vocab']} x {sizes['width']} x {sizes['layers']}, {tying}",
           "new tokens": count, **{f"{name} tokens/s": 1e3 * count / value for name, value in ms.items()},
           "kernels chosen (gates, output)": [modeling_lstm._step_kernel_ranking.get(shape, ("not measured",))[0]
                                              for shape in ((1, 4 * sizes["width"], sizes["width"]),
                                                            (1, sizes["vocab"], sizes["width"]))]}
    for name in list(methods)[1:]:
        row[f"generate() / {name}"] = ms[name] / ms["generate()"]  # speed ratio: above 1, generate() is faster
    print(row, flush=True)
    return row


def lstm_model(sizes: dict) -> LSTMForCausalLM:
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=sizes["vocab"], embedding_size=sizes["embedding"], hidden_size=sizes["width"],
                        num_hidden_layers=sizes["layers"], tie_word_embeddings=sizes["tied"])
    return LSTMForCausalLM(config).eval()


def short_generation_rows(sizes: dict, new_tokens: tuple[int, ...]) -> list[dict]:
    """Milliseconds a greedy `generate()` call takes at batch 1 for each count of `new_tokens`, with the transposed
    copies made only where they pay, and whenever they rank first; after the kernels are ranked in this process."""
    model = lstm_model(sizes)
    prompt = torch.randint(0, sizes["vocab"], (1, 8), generator=torch.Generator().manual_seed(1))
    rules = {"copies where they pay ms": modeling_lstm.TransposedWeights.pays,
              "copies whenever ranked first ms": lambda *args: True}

    @torch.no_grad()
    def generate(count: int, pays: Callable[..., bool]) -> None:
        with mock.patch.object(modeling_lstm.TransposedWeights, "pays", pays):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                           min_new_tokens=count, do_sample=False, pad_token_id=0)

    generate(64, rules["copies where they pay ms"])  # the kernels ranked, the copies' cost measured
    rows = []
    for count in new_tokens:
        ms = alternate({column: functools.partial(generate, count, pays) for column, pays in rules.items()},
                       repeats=1, rounds=sizes["rounds"])
        rows.append({"measure": f"greedy generate(), batch 1, {sizes['vocab']} x {sizes['width']} x {sizes['layers']}",
                     "new tokens": count, **ms,
                     "speed-up": ms["copies whenever ranked first ms"] / ms["copies where they pay ms"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    sizes = QUICK if args.quick else FULL
    suffix = limits_suffix()
    conditions = {"load average before": load_average()}
    rows = kernel_rows(sizes) + decode_step_rows(sizes)
    for row in rows:
        row["speed-up, step_matmul"] = row["before ms (F.linear, lstm_cell)"] / row["step_matmul ms"]
        row["speed-up, transposed_matmul"] = row["before ms (F.linear, lstm_cell)"] / row["transposed_matmul ms"]
    columns = ["measure", "rows", *KERNELS, "speed-up, step_matmul", "speed-up, transposed_matmul"]
    write_results(args, "step_kernels" + suffix, rows, columns,
                  extra={"rounds": sizes["rounds"], "calls per round": sizes["repeats"], **conditions})
    generate_sizes = GENERATE_QUICK if args.quick else GENERATE
    rows = [generate_row(sizes) for sizes in generate_sizes]
    write_results(args, "step_kernels_generate" + suffix, rows, list(rows[0]),
                  extra={"rounds": generate_sizes[0]["rounds"], **conditions, "load average after": load_average()})
    new_tokens = SHORT_NEW_TOKENS_QUICK if args.quick else SHORT_NEW_TOKENS
    rows = [row for sizes in generate_sizes for row in short_generation_rows(sizes, new_tokens)]
    write_results(args, "step_kernels_short_generate" + suffix, rows, list(rows[0]),
                  extra={"rounds": generate_sizes[0]["rounds"], "load average after": load_average()})


if __name__ == "__main__":
    main()
