"""Weight averaging triggered by validation loss, as in AWD-LSTM's NT-ASGD (Merity et al., 2017).

Once the validation loss stops improving (it is worse than the best of the evaluations more than `patience`
evaluations ago), the running mean of the weights after every optimisation step is kept from then on; it is what
`LSTMTrainer` evaluates and saves. With `--optim sgd` this is NT-ASGD; with the default AdamW it is the same
averaging on top of AdamW's iterates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import TrainerCallback


class WeightAverage:
    """The running mean of a model's parameters over the steps it has been updated at."""

    def __init__(self, model: nn.Module):
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.mean = [p.detach().clone() for p in self.parameters]
        self.count = 1

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for mean, parameter in zip(self.mean, self.parameters):
            mean.add_(parameter.detach() - mean, alpha=1 / self.count)

    def apply(self) -> None:
        """Puts the averaged weights in the model for good."""
        _copy(self.mean, self.parameters)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Puts the averaged weights in the model for the duration of the block, then restores the trained ones."""
        trained = [p.detach().clone() for p in self.parameters]
        self.apply()
        try:
            yield
        finally:
            _copy(trained, self.parameters)


@torch.no_grad()
def _copy(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    for source, target in zip(sources, targets):
        target.copy_(source)


class NonMonotonicAveraging(TrainerCallback):
    """Starts a `WeightAverage` when the validation loss is worse than the best of the evaluations more than
    `patience` evaluations ago, and updates it after every step from then on."""

    def __init__(self, patience: int = 5):
        if patience < 1:
            raise ValueError(f"--weight_averaging_patience must be at least 1, got {patience}.")
        self.patience = patience
        self.losses: list[float] = []
        self.average: WeightAverage | None = None
        self.start_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if self.average is not None or loss is None:
            return
        self.losses.append(loss)
        if len(self.losses) > self.patience and loss > min(self.losses[: -self.patience]):
            self.average = WeightAverage(model)
            self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.average is not None:
            self.average.update()

    def on_train_end(self, args, state, control, **kwargs):
        """The model keeps the average, unless the best checkpoint (saved with the average in it) was loaded."""
        if self.average is not None and not (args.load_best_model_at_end and state.best_model_checkpoint):
            self.average.apply()
        self.average = None
