"""NT-ASGD-style weight averaging: the running mean, its trigger, and the trainer evaluating and saving it."""

from types import SimpleNamespace

import pytest
import torch

from lm_lstm.averaging import NonMonotonicAveraging, WeightAverage
from lm_lstm.data import collate_blocks
from lm_lstm.arguments import LSTMTrainingArguments
from lm_lstm.trainer import LSTMTrainer

from conftest import tiny_model


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_running_mean_of_the_weights_and_temporary_application():
    model = tiny_model()
    snapshots = [parameters(model)]
    average = WeightAverage(model)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append(parameters(model))
        average.update()
    trained = parameters(model)
    with average.applied():
        for p, *versions in zip(model.parameters(), *snapshots):
            torch.testing.assert_close(p, torch.stack(versions).mean(0))
    for p, q in zip(model.parameters(), trained):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_averaging_starts_when_the_loss_is_worse_than_the_best_before_the_patience_window():
    callback = NonMonotonicAveraging(patience=2)
    model, state = tiny_model(), SimpleNamespace(global_step=0)
    for step, loss in enumerate([5.0, 4.0, 3.0, 3.5, 2.9, 3.1, 3.0], start=1):
        state.global_step = step * 10
        callback.on_evaluate(None, state, None, metrics={"eval_loss": loss}, model=model)
        if callback.average is not None:
            break
    assert callback.start_step == 60  # 3.1 is worse than 3.0, seen more than two evaluations before (3.5 was not)
    with pytest.raises(ValueError, match="weight_averaging_patience"):
        NonMonotonicAveraging(patience=0)


def test_trainer_evaluates_the_average_and_the_model_keeps_it_after_training(tmp_path):
    model = tiny_model().train()
    ids = torch.randint(3, 40, (8, 12), generator=torch.Generator().manual_seed(0))
    blocks = [{"input_ids": row.tolist()} for row in ids]
    callback = NonMonotonicAveraging(patience=1)
    args = LSTMTrainingArguments(output_dir=str(tmp_path), bf16=False, report_to="none", disable_tqdm=True,
                                 eval_strategy="no", eval_on_start=False, load_best_model_at_end=False)
    trainer = LSTMTrainer(model=model, args=args, eval_dataset=blocks, data_collator=collate_blocks,
                          callbacks=[callback])
    callback.average = WeightAverage(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    callback.average.update()  # the mean of the weights and three times them: twice the original weights
    trained = parameters(model)
    reference = tiny_model()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    expected = reference(ids, labels=ids).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    for p, q in zip(model.parameters(), trained):
        torch.testing.assert_close(p, q, atol=0, rtol=0)  # the trained weights are back
    callback.on_train_end(args, trainer.state, None)
    assert callback.average is None
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)  # the model keeps the average
