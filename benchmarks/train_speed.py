"""Training throughput: lm-lstm through `Trainer` and through an Accelerate loop, against a plain PyTorch loop.

The plain loop is what users write by hand: nn.Embedding -> nn.LSTM -> nn.Linear, cross-entropy, backward,
gradient clipping, a fused AdamW step, on pre-made batches. lm-lstm runs the same sizes, data, batch, optimiser,
clipping and precision (its dropouts off). The methods alternate within one process, round after round, so the
ratios are measured under the same machine load. Achieved FLOP/s are read against a matmul peak measured in the
same run.

    python benchmarks/train_speed.py            # configs A, B, C in fp32 and bf16 (several minutes)
    python benchmarks/train_speed.py --device cuda   # the same on a GPU (cuDNN's LSTM): results/train_speed-cuda.*
    python benchmarks/train_speed.py --quick    # tiny sizes: checks that it runs
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    argument_parser, lstm_lm_forward_flops, matmul_peak, result_name, synchronize, write_results,
)

from lm_lstm import LSTMConfig, LSTMForCausalLM  # noqa: E402
from lm_lstm.arguments import LSTMTrainingArguments, fast_bf16_available  # noqa: E402
from lm_lstm.data import collate_blocks  # noqa: E402
from lm_lstm.trainer import LSTMTrainer  # noqa: E402

CLIP = 1.0
LEARNING_RATE = 1e-3


@dataclass
class Setting:
    name: str
    vocab: int
    embedding: int
    hidden: int
    layers: int
    tied: bool
    batch: int
    length: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.length

    def lstm_config(self) -> LSTMConfig:
        return LSTMConfig(
            vocab_size=self.vocab, embedding_size=self.embedding, hidden_size=self.hidden,
            num_hidden_layers=self.layers, tie_word_embeddings=self.tied, embedding_dropout=0.0, input_dropout=0.0,
            hidden_dropout=0.0, output_dropout=0.0, weight_dropout=0.0,
        )


SETTINGS = [
    Setting("A: 10k vocab, 300/1024 x1", 10000, 300, 1024, 1, False, 20, 35),
    Setting("B: 33k vocab, 650/650 x2 tied", 33278, 650, 650, 2, True, 20, 35),
    Setting("C: char 65, 128/512 x2", 65, 128, 512, 2, False, 64, 128),
]
QUICK = [Setting("quick: 500 vocab, 32/64 x2", 500, 32, 64, 2, False, 4, 16)]


class PlainLM(nn.Module):
    """The hand-written baseline."""

    def __init__(self, s: Setting):
        super().__init__()
        self.embedding = nn.Embedding(s.vocab, s.embedding)
        top = s.embedding if s.tied else s.hidden
        self.lstm = nn.LSTM(s.embedding, s.hidden, num_layers=s.layers, batch_first=True)
        self.top = None if top == s.hidden else nn.LSTM(s.hidden, top, batch_first=True)
        self.output = nn.Linear(top, s.vocab)
        if s.tied:
            self.output.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(ids[:, :-1]))
        if self.top is not None:
            hidden, _ = self.top(hidden)
        logits = self.output(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def plain_setting(s: Setting) -> Setting:
    """The plain model's stack: with tying, AWD-LSTM's embedding-sized last layer is a separate nn.LSTM."""
    if s.tied and s.hidden != s.embedding:
        return Setting(s.name, s.vocab, s.embedding, s.hidden, s.layers - 1, s.tied, s.batch, s.length)
    return s


def batches(s: Setting, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, s.vocab, (s.batch, s.length), generator=generator) for _ in range(count)]


def time_plain(s: Setting, data: list[torch.Tensor], bf16: bool, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = PlainLM(plain_setting(s)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    times = []
    for ids in [ids.to(device) for ids in data]:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class StepClock(TrainerCallback):
    """Time between the ends of consecutive optimisation steps: data, forward, backward, clipping, step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())


def time_trainer(s: Setting, data: list[torch.Tensor], bf16: bool, device: torch.device, output_dir: str) -> list[float]:
    torch.manual_seed(0)
    model = LSTMForCausalLM(s.lstm_config())
    dataset = Dataset.from_dict({"input_ids": torch.cat(data).tolist()})
    clock = StepClock(device)
    args = LSTMTrainingArguments(
        output_dir=output_dir, max_steps=len(data), per_device_train_batch_size=s.batch, learning_rate=LEARNING_RATE,
        weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=CLIP, bf16=bf16,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        eval_on_start=False, load_best_model_at_end=False, optim="adamw_torch_fused", seed=0,
        use_cpu=device.type == "cpu",
    )
    trainer = LSTMTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_blocks, callbacks=[clock])
    trainer.train()
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def time_accelerate(s: Setting, data: list[torch.Tensor], bf16: bool, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
    model = LSTMForCausalLM(s.lstm_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    times = []
    for ids in [ids.to(accelerator.device) for ids in data]:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(accelerator.device)
        times.append(time.perf_counter() - start)
    accelerator.free_memory()
    return times


def main() -> None:
    parser = argument_parser(__doc__, device=True)
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per method and round (after 2 warm-up).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of plain / Trainer / Accelerate (the order "
                        "rotates from round to round).")
    args = parser.parse_args()
    settings = QUICK if args.quick else SETTINGS
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    warmup = 1 if args.quick else 2
    sizes = (256,) if args.quick else (1024, 2048, 4096)
    device = args.device
    # bf16 only where it has hardware arithmetic: elsewhere it is emulated, and timing it would mean nothing.
    precisions = (False, True) if fast_bf16_available() else (False,)
    peaks = {bf16: matmul_peak(torch.bfloat16 if bf16 else torch.float32, sizes, device=device) for bf16 in precisions}
    rows = []
    for s in settings:
        flops_per_token = 3 * lstm_lm_forward_flops(s.vocab, s.embedding, s.hidden, s.layers, s.tied)
        for bf16 in precisions:
            data = batches(s, warmup + steps)
            methods = {
                "plain": lambda: time_plain(s, data, bf16, device),
                "Trainer": lambda: time_trainer(s, data, bf16, device, tempfile.gettempdir()),
                "Accelerate": lambda: time_accelerate(s, data, bf16, device),
            }
            measured: dict[str, list[float]] = {name: [] for name in methods}
            order = list(methods)
            for _ in range(rounds):
                for name in order:
                    measured[name].append(statistics.median(methods[name]()[warmup:]))
                order = order[1:] + order[:1]
            speed = {k: s.tokens_per_step / statistics.median(v) for k, v in measured.items()}
            row = {
                "config": s.name, "precision": "bf16" if bf16 else "fp32",
                "plain tok/s": round(speed["plain"]), "Trainer tok/s": round(speed["Trainer"]),
                "Accelerate tok/s": round(speed["Accelerate"]),
                "Trainer / plain": speed["Trainer"] / speed["plain"],
                "Accelerate / plain": speed["Accelerate"] / speed["plain"],
                "Trainer GFLOP/s": speed["Trainer"] * flops_per_token / 1e9,
                "% of matmul peak": 100 * speed["Trainer"] * flops_per_token / peaks[bf16],
            }
            rows.append(row)
            print(row, flush=True)
    fp32_speed = {r["config"]: r["plain tok/s"] for r in rows if r["precision"] == "fp32"}
    for row in rows:
        row["Trainer / plain fp32"] = row["Trainer tok/s"] / fp32_speed[row["config"]]
    columns = ["config", "precision", "plain tok/s", "Trainer tok/s", "Accelerate tok/s", "Trainer / plain",
               "Accelerate / plain", "Trainer / plain fp32", "Trainer GFLOP/s", "% of matmul peak"]
    write_results(args, result_name("train_speed", device), rows, columns,
                  extra={"matmul peak fp32 GFLOP/s": round(peaks[False] / 1e9),
                         "matmul peak bf16 GFLOP/s": round(peaks[True] / 1e9) if True in peaks else "not run: no bf16 "
                         "arithmetic on this CPU",
                         "timed steps": steps, "rounds": rounds, "FLOPs per token": "3 x forward matmul FLOPs"})


if __name__ == "__main__":
    main()
