"""Named recipes: values that override `LSTMConfig`'s and `TrainingArguments`' defaults, like nanoGPT's config files.

`TINY_SHAKESPEARE` is what `lm-lstm train` does when given no options: a character-level 2-layer LSTM trained with
stateful truncated BPTT over streams of characters with AdamW for a time budget of 10 minutes, the learning rate on a
cosine over that time. Its hidden size, number of streams and BPTT length are chosen for the budget and the machine
(`lm_lstm.sizing`); the 512, 16 and 128 here are those without a budget (`--max_steps 2500 --warmup_steps 50` is the
recipe measured before sizing: about 10 minutes on 2 CPU cores with fast bf16). Its learning rate falls with the
hidden size above 512 (`recipe_learning_rate`). Chosen from measurements on the bundled corpus: benchmarks/README.md,
benchmarks/results/recipe/ and benchmarks/results/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A recipe: `model` overrides `LSTMConfig`'s defaults, `training` overrides `TrainingArguments`' defaults and
    `data` those of `DataArguments`."""

    name: str
    model: dict[str, object] = field(default_factory=dict)
    training: dict[str, object] = field(default_factory=dict)
    data: dict[str, object] = field(default_factory=dict)


TINY_SHAKESPEARE = Preset(
    name="tiny-shakespeare-char",
    model=dict(
        embedding_size=128,
        hidden_size=512,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        embedding_dropout=0.0,
        input_dropout=0.1,
        hidden_dropout=0.1,
        output_dropout=0.2,
        weight_dropout=0.1,
    ),
    training=dict(
        max_time="10m",  # training time, evaluations included: the steps are as many as the machine makes
        per_device_train_batch_size=16,  # streams: the number of updates matters most on 2 cores
        per_device_eval_batch_size=16,
        learning_rate=3e-3,  # at LEARNING_RATE_WIDTH hidden units or fewer: see recipe_learning_rate
        lr_scheduler_type="cosine",
        # A fraction of training. At 0.02 the full rate came before the model left the character-frequency plateau,
        # and the step it did varied by seed: a tenth of a 5-minute run lost (benchmarks/results/warmup.md).
        warmup_steps=0.1,
        # 0.01 ended 30 minutes of 2 x 512 at 1.403-1.411 nats/char in three runs, 0.1 at 1.383 (7 passes over the
        # text, where the recipe's light dropouts leave it to overfit: benchmarks/README.md, "weight decay").
        weight_decay=0.1,
        max_grad_norm=0.5,
        eval_steps=250,
        save_steps=250,
        logging_steps=50,
    ),
    data=dict(block_size=128),
)

DEFAULT_PRESET = TINY_SHAKESPEARE

LEARNING_RATE_WIDTH = 512
"""The hidden size at which the recipe's learning rate was chosen (benchmarks/results/recipe/)."""


def recipe_learning_rate(hidden_size: int, preset: Preset = DEFAULT_PRESET) -> float:
    """The recipe's peak AdamW learning rate for a model of `hidden_size` units: `preset`'s up to
    `LEARNING_RATE_WIDTH` units, times `LEARNING_RATE_WIDTH / hidden_size` above.

    Adam moves every weight by about the learning rate, so a step changes a unit's input by about the rate times its
    fan-in: the stable rate falls as 1 / width (Yang et al., 2022, "Tensor Programs V", muP). 3e-3, chosen at 2 x 512,
    made 2 x 1,024 collapse to a loss of 3.4 (benchmarks/results/quality_30min_hidden_size=1024_max_steps=400_fp32.md);
    smaller models keep the measured rate.
    """
    return preset.training["learning_rate"] * min(1.0, LEARNING_RATE_WIDTH / hidden_size)
