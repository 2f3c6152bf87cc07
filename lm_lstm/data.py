"""Text data for training and evaluation."""

from pathlib import Path

DEFAULT_CORPUS = Path(__file__).with_name("corpus") / "tiny_shakespeare.txt"
