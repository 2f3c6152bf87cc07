"""Each benchmark runs end to end in its tiny --quick mode and writes its table (the numbers are not tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def limits_suffix() -> str:
    """benchmarks/common.py's `limits_suffix` (step_kernels names its results after ONEDNN_MAX_CPU_ISA and the like),
    loaded by path: benchmarks/ on sys.path would shadow the `onnx` package with benchmarks/onnx.py."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.limits_suffix()


# Quick runs of more than about 12 s on a 2-core AMD EPYC (13 to 20 s) are `slow`, but for that of quality.py, the main
# benchmark, to keep the default suite within its 10 minutes on the slowest CI machine; `python -m pytest -m slow` runs
# them.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name, stem, ratio", [
    ("train_speed", "train_speed", "Trainer / plain"),
    pytest.param("generation", "generation", "lm-lstm / this", marks=SLOW),
    ("step_kernels", "step_kernels", "speed-up, transposed_matmul"),  # and the two generate tables, below
    ("inference", "inference", "speed vs fp32"),
    ("bf16_quality", "bf16_quality", "loss vs fp32"),
    ("quality", "quality_0.05min", "vs gpt"),
    pytest.param("weight_averaging", "weight_averaging_0.05min", "vs as trained", marks=SLOW),
    ("scaling", "scaling", "fitted nats/char"),
    ("batch_worth", "batch_worth", "fitted worth"),
    pytest.param("onnx", "onnx", "vs generate()", marks=SLOW),
    pytest.param("scale", "scale", "tokenize MB/s", marks=SLOW),
    pytest.param("warmup", "warmup", "loss at 50", marks=SLOW),
])
def test_benchmark_runs_in_quick_mode(name, stem, ratio, tmp_path):
    result = subprocess.run([sys.executable, BENCHMARKS / f"{name}.py", "--quick", "--results_dir", tmp_path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    suffix = limits_suffix() if name == "step_kernels" else ""
    stem += suffix
    results = json.loads((tmp_path / f"{stem}-quick.json").read_text())
    assert results["rows"] and all(row[ratio] > 0 for row in results["rows"])
    assert (tmp_path / f"{stem}-quick.md").read_text().count("|") > 10
    if name == "step_kernels":
        generate = json.loads((tmp_path / f"step_kernels_generate{suffix}-quick.json").read_text())
        assert all(row["generate() / lstm_cell loop, oneDNN off"] > 0 for row in generate["rows"])
        short = json.loads((tmp_path / f"step_kernels_short_generate{suffix}-quick.json").read_text())
        assert [row["new tokens"] for row in short["rows"]] == [2] and short["rows"][0]["speed-up"] > 0
