"""Named recipes: values that override `LSTMConfig`'s and `TrainingArguments`' defaults, like nanoGPT's config files.

`TINY_SHAKESPEARE` is what `lm-lstm train` does when given no options: a character-level 2-layer LSTM trained with
stateful truncated BPTT over 16 streams of 128 characters with AdamW for a time budget of 10 minutes, the learning
rate on a cosine over that time. Its hidden size is chosen for the budget and the machine (`lm_lstm.sizing`); the
512 here is the size without a budget (`--max_steps 2500` is the recipe measured before sizing: about 10 minutes on
2 CPU cores with fast bf16). Chosen from measurements on the bundled corpus: benchmarks/README.md,
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
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.02,  # a fraction of training: 50 of the 2,500 steps measured; short budgets warm up briefly
        weight_decay=0.01,
        max_grad_norm=0.5,
        eval_steps=250,
        save_steps=250,
        logging_steps=50,
    ),
    data=dict(block_size=128),
)

DEFAULT_PRESET = TINY_SHAKESPEARE
