"""Shared pieces of the benchmarks: timing, the machine's matmul peak, FLOP counts, and writing results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")


def median_seconds(step: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `step()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timer read next measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5,
                device: torch.device = torch.device("cpu")) -> float:
    """The best FLOP/s of square matmuls in `dtype` on the device, now (the ceiling the other numbers are read
    against)."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        seconds = median_seconds(lambda: (a @ b, synchronize(device)), repeats, warmup=2)
        best = max(best, 2 * size**3 / seconds)
    return best


def lstm_lm_forward_flops(vocab: int, embedding: int, hidden: int, layers: int, tied: bool) -> float:
    """Matmul FLOPs of one token's forward pass through embedding -> LSTM layers -> output layer."""
    sizes = [hidden] * layers
    if tied:
        sizes[-1] = embedding
    inputs = [embedding] + sizes[:-1]
    recurrent = sum(2 * 4 * h * (i + h) for i, h in zip(inputs, sizes))
    return recurrent + 2 * vocab * sizes[-1]


def cpu_model() -> str:
    """The CPU's model name, family and model numbers from /proc/cpuinfo (`platform` gives only the architecture)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last processor's, all alike
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name", platform.machine())
    return f"{name} (family {fields.get('cpu family')}, model {fields.get('model')})"


def load_average() -> float:
    """The 1-minute load average: other processes running beside a benchmark show in it."""
    return os.getloadavg()[0]


INSTRUCTION_SET_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
"""Environment variables that keep oneDNN, MKL and PyTorch's own kernels to an older instruction set (`avx2`, for
instance): together, a stand-in for an older CPU on a newer one."""


def instruction_set_limits() -> dict[str, str]:
    """The `INSTRUCTION_SET_LIMITS` set in this process's environment."""
    return {name: os.environ[name] for name in INSTRUCTION_SET_LIMITS if os.environ.get(name)}


def limits_suffix() -> str:
    """A results-name suffix for the instruction-set limits in force, such as `_onednn-avx2_mkl-avx2` ('' if none)."""
    return "".join(f"_{name.split('_')[0].lower()}-{value.lower()}" for name, value in instruction_set_limits().items())


def machine() -> dict[str, object]:
    """The CPU, threads, torch, GPU, and the instruction-set limits in force (`INSTRUCTION_SET_LIMITS`)."""
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **instruction_set_limits(),
    }


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(args: argparse.Namespace, name: str, rows: list[dict[str, object]], columns: list[str],
                  extra: dict | None = None, appendix: str = "") -> str:
    """Prints the table and writes `NAME.json` and `NAME.md` (`NAME-quick.*` in quick mode) to --results_dir; the
    Markdown ends with `appendix`."""
    table = markdown_table(rows, columns)
    print(table)
    stem = f"{name}-quick" if args.quick else name
    folder = Path(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    header = f"# {name}\n\nMachine: {machine()}\n\n"
    notes = "".join(f"- {k}: {v}\n" for k, v in (extra or {}).items())
    (folder / f"{stem}.md").write_text(header + (notes + "\n" if notes else "") + table + "\n" + appendix)
    return table


def argument_parser(description: str, device: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark takes; with `device`, also `--device` (parsed to a `torch.device`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and few repeats: checks that it runs.")
    parser.add_argument("--results_dir", default=str(RESULTS), help="Where the JSON and Markdown results go.")
    if device:
        parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                            help="Where to run: cpu, or cuda on a GPU machine (results then go to NAME-cuda.*).")
    return parser


def result_name(name: str, device: torch.device) -> str:
    """The results' file stem: `NAME` on CPU, `NAME-cuda` on a GPU, so that both sets sit side by side."""
    return name if device.type == "cpu" else f"{name}-{device.type}"
