"""The adaptive recipe (`lm_lstm.sizing`): the choice of size from measured speeds, when measuring stops, and
`lm-lstm train` sizing a model only when no size is given."""

import json
import math
from pathlib import Path

import pytest
from transformers import TrainerState

import lm_lstm.sizing as sizing
from lm_lstm.arguments import DataArguments, ModelArguments
from lm_lstm.configuration_lstm import LSTMConfig
from lm_lstm.sizing import SCALING_FIT, LossFit, Measurement, choose_size, layer_parameters, size_model
from lm_lstm.training import size_new_model, train

from test_budget import StepClock, arguments, budget_callbacks

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "scaling.json"
FIT = LossFit(irreducible=1.0, a=100.0, alpha=0.5, b=100.0, beta=0.5, repetitions=4.0, repetitions_exponent=0.0)
TEXT = 1e6  # unique training characters


def speeds(tokens_per_second_at_128: float) -> list[Measurement]:
    """A machine whose speed falls as the layers' parameters grow: `tokens_per_second_at_128` at hidden size 128."""
    config = LSTMConfig(vocab_size=65, embedding_size=128, hidden_size=128, num_hidden_layers=2,
                        tie_word_embeddings=False)
    measurements = []
    for hidden_size in sizing.CANDIDATE_HIDDEN_SIZES:
        parameters = layer_parameters(LSTMConfig(**{**config.to_dict(), "hidden_size": hidden_size}))
        speed = tokens_per_second_at_128 * layer_parameters(config) / parameters
        measurements.append(Measurement(hidden_size, parameters, speed))
    return measurements


def test_layer_parameters_count_the_lstm_weights_and_biases():
    config = LSTMConfig(vocab_size=65, embedding_size=8, hidden_size=16, num_hidden_layers=2, tie_word_embeddings=True)
    model = sizing.LSTMForCausalLM(config)
    assert layer_parameters(config) == sum(p.numel() for p in model.model.layers.parameters())


def test_the_expected_loss_is_the_fit_at_the_tokens_the_budget_gives():
    measurements = speeds(10_000)
    choice = choose_size(measurements, budget_seconds=600, unique_characters=TEXT, fit=FIT)
    for candidate in choice.candidates:
        characters = candidate.measurement.tokens_per_second * 600 * sizing.TRAINING_SHARE
        assert candidate.characters == pytest.approx(characters)
        repeated = characters / TEXT - 1  # beyond the first pass, repetitions count less and less
        seen = characters if repeated <= 0 else TEXT * (1 + 4 * (1 - math.exp(-repeated / 4)))
        assert candidate.loss == pytest.approx(1 + 100 / candidate.measurement.parameters**0.5 + 100 / seen**0.5)
    assert choice.chosen.loss == min(c.loss for c in choice.candidates)


def chosen(speed: float, budget_seconds: float, unique_characters: float = TEXT, reverse: bool = False) -> int:
    measurements = speeds(speed)[::-1] if reverse else speeds(speed)
    return choose_size(measurements, budget_seconds, unique_characters, fit=FIT).hidden_size


def test_faster_machines_and_longer_budgets_choose_larger_models_deterministically():
    slow, fast, longer = chosen(5_000, 300), chosen(500_000, 300), chosen(5_000, 30_000)
    assert slow < fast and slow < longer
    assert chosen(5_000, 300) == chosen(5_000, 300, reverse=True) == slow  # the same speeds, the same size
    with pytest.raises(ValueError, match="No candidate size"):
        choose_size([], budget_seconds=300, unique_characters=TEXT)


def test_measuring_stops_once_a_larger_size_is_expected_to_do_worse(monkeypatch):
    """The expected loss at 600 s falls up to the best size, then rises: the first larger size is measured, no more,
    and the choice equals the one made from every measurement."""
    table = {m.hidden_size: m for m in speeds(20_000)}
    measured = []

    def fake_measure(config, hidden_size, batch_size, block_size, bf16, world_size):
        measured.append(hidden_size)
        return table[hidden_size]

    monkeypatch.setattr(sizing, "measure", fake_measure)
    config = LSTMConfig(vocab_size=65, embedding_size=128, hidden_size=128, num_hidden_layers=2)
    choice = size_model(config, 600, 16, 128, bf16=False, unique_characters=TEXT, fit=FIT)
    best = choose_size(list(table.values()), 600, unique_characters=TEXT, fit=FIT).hidden_size
    assert choice.hidden_size == best
    sizes = sorted(table)
    assert measured == sizes[: sizes.index(best) + 2]
    assert choice.describe().startswith(f"Sized for a 10 min budget: hidden size {best} (")


def test_measuring_stops_when_its_share_of_the_budget_is_spent(monkeypatch):
    now = [0.0]

    def slow_measure(config, hidden_size, *args):
        now[0] += 4.0  # each measurement takes 4 s of a 100 s budget, whose 5% is 5 s
        return Measurement(hidden_size, hidden_size, 1e9)

    monkeypatch.setattr(sizing, "measure", slow_measure)
    choice = size_model(LSTMConfig(vocab_size=65), 100, 16, 128, bf16=False, unique_characters=1e12, fit=FIT,
                        clock=lambda: now[0])
    assert [c.measurement.hidden_size for c in choice.candidates] == [128, 192]
    assert choice.probe_seconds == 8.0 and choice.budget_seconds == 100
    assert choice.chosen.characters == pytest.approx(1e9 * 92 * sizing.TRAINING_SHARE)  # the budget left to train


def test_measurement_counts_tokens_per_second_of_real_training_steps():
    config = LSTMConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2)
    measurement = sizing.measure(config, 24, batch_size=2, block_size=8, bf16=False, world_size=3)
    assert measurement.hidden_size == 24
    assert measurement.parameters == layer_parameters(LSTMConfig(**{**config.to_dict(), "hidden_size": 24}))
    assert 0 < measurement.tokens_per_second < 1e9


def test_the_shipped_fit_is_the_one_benchmarks_scaling_wrote():
    fit = json.loads(RESULTS.read_text())["fit"]
    shipped = SCALING_FIT.__dict__
    assert shipped == pytest.approx({name: fit[name] for name in shipped}, rel=1e-3)
    assert sizing.FIT_MIN_CHARACTERS == min(row["tokens seen"] for row in json.loads(RESULTS.read_text())["rows"])


def test_a_budget_below_the_fits_range_says_its_expectations_are_rough():
    short, long = (choose_size(speeds(1_000), seconds, TEXT) for seconds in (60, 3_600))
    assert short.chosen.characters < sizing.FIT_MIN_CHARACTERS < long.chosen.characters
    assert short.describe().endswith("these expected losses are rough extrapolations.")
    assert long.describe().endswith(").")


def test_expected_losses_are_capped_at_the_untrained_models(monkeypatch):
    """On a slow machine with a short budget the fit's power law exceeds ln(vocabulary size), the loss of an
    untrained model: every size is expected at that cap, the smallest is chosen, and measuring stops at the second."""
    untrained = math.log(65)
    assert SCALING_FIT.loss(speeds(100)[0].parameters, 100 * 60 * sizing.TRAINING_SHARE, TEXT) > untrained
    table = {m.hidden_size: m for m in speeds(100)}
    monkeypatch.setattr(sizing, "measure", lambda config, hidden_size, *args: table[hidden_size])
    choice = size_model(LSTMConfig(vocab_size=65), 60, 16, 128, bf16=False, unique_characters=TEXT)
    assert [c.loss for c in choice.candidates] == [untrained, untrained]
    assert choice.hidden_size == min(sizing.CANDIDATE_HIDDEN_SIZES)
    assert f"capped at {untrained:.3f}, an untrained model's loss" in choice.describe()
    assert "capped" not in choose_size(speeds(100_000), 600, TEXT, untrained_loss=untrained).describe()


def test_other_work_on_the_cpus_while_measuring_is_reported(monkeypatch):
    """Other processes' CPU time between the readings around the measurement (busy time less this process's own),
    as a share of the CPUs' time, warns in the sizing line above `BUSY_SHARE`."""
    reading = sizing.read_cpus()  # this machine's, if Linux
    assert reading is None or (reading.busy > 0 and reading.cpus >= 1)
    readings = iter([sizing.CpuReading(wall=10.0, own=1.0, busy=100.0, cpus=2),
                     sizing.CpuReading(wall=14.0, own=8.0, busy=112.0, cpus=2)])  # others: 12 - 7 = 5 of 8 s
    monkeypatch.setattr(sizing, "read_cpus", lambda: next(readings))
    monkeypatch.setattr(sizing, "measure", lambda config, hidden_size, *args: speeds(10_000)[0])
    choice = size_model(LSTMConfig(vocab_size=65), 600, 16, 128, bf16=False, unique_characters=TEXT,
                        sizes=[128])
    assert choice.other_work_share == pytest.approx(5 / 8)
    assert choice.describe().endswith("Other work kept 62% of this process's CPUs busy while measuring: the speeds, "
                                      "and so the size, may be low (--hidden_size sets it).")
    quiet = sizing.CpuReading(wall=14.0, own=8.0, busy=108.5, cpus=2)  # others: 1.5 of 8 s
    assert sizing.other_work_share(sizing.CpuReading(10.0, 1.0, 100.0, 2), quiet) == pytest.approx(1.5 / 8)
    assert "Other work" not in choose_size(speeds(10_000), 600, TEXT).describe()
    assert sizing.other_work_share(None, quiet) == 0.0  # no /proc/stat: nothing to say


def run_train(corpus, output, fake_speed: float | None, monkeypatch, **model_options):
    measured = []

    def fake_measure(config, hidden_size, batch_size, block_size, bf16, world_size):
        measured.append((hidden_size, batch_size, block_size))
        parameters = layer_parameters(LSTMConfig(**{**config.to_dict(), "hidden_size": hidden_size}))
        return Measurement(hidden_size, parameters, fake_speed * 1e6 / parameters)

    monkeypatch.setattr(sizing, "measure", fake_measure)
    monkeypatch.setattr(sizing, "CANDIDATE_HIDDEN_SIZES", (8, 16, 32, 64))
    model_args = ModelArguments(tokenizer_type="char", embedding_size=16, **model_options)
    training_args = arguments(output, per_device_train_batch_size=4, max_time=20)
    result = train(model_args, DataArguments(train_file=[str(corpus)], block_size=32), training_args,
                   callbacks=budget_callbacks(StepClock()))
    return result, measured


def test_train_sizes_a_new_model_when_no_size_is_given_and_the_card_says_why(corpus, tmp_path, monkeypatch, capsys):
    result, measured = run_train(corpus, tmp_path / "sized", 1.0, monkeypatch)
    assert [m[1:] for m in measured] == [(4, 32)] * len(measured)  # the run's streams and BPTT length
    config = json.loads((result.output_dir / "config.json").read_text())
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Sized for a 20 s budget")]
    assert len(printed) == 1 and f"hidden size {config['hidden_size']} (" in printed[0]
    assert config["hidden_size"] in [m[0] for m in measured]
    card = (result.output_dir / "README.md").read_text()
    assert f"| model size | {printed[0]} |" in card
    assert "| time budget | 20 s of training" in card


def test_an_explicit_size_always_wins(corpus, tmp_path, monkeypatch):
    result, measured = run_train(corpus, tmp_path / "given", 1.0, monkeypatch, hidden_size=24)
    assert measured == []
    assert json.loads((result.output_dir / "config.json").read_text())["hidden_size"] == 24
    assert "| model size | set by the training options |" in (result.output_dir / "README.md").read_text()
    overridden = ModelArguments(tokenizer_type="char", config_overrides="num_hidden_layers=1,hidden_size=24")
    assert not overridden.size_left_open() and ModelArguments().size_left_open()


def test_a_resumed_run_takes_its_checkpoints_size(tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "measure", lambda *args: pytest.fail("a resumed run measured sizes"))
    checkpoint = tmp_path / "checkpoint-3"
    LSTMConfig(vocab_size=40, embedding_size=16, hidden_size=24).save_pretrained(checkpoint)
    TrainerState(global_step=3).save_to_json(str(checkpoint / "trainer_state.json"))
    (checkpoint / "optimizer.pt").touch()  # with the state, what makes a folder a checkpoint to resume from
    for resume in (True, str(tmp_path / "checkpoint-3")):
        model_args = ModelArguments(tokenizer_type="char", embedding_size=16)
        training_args = arguments(tmp_path, max_time=20, resume_from_checkpoint=resume)
        assert size_new_model(model_args, training_args, tokenizer=None, data=None) is None
        assert model_args.hidden_size == 24
    with pytest.raises(ValueError, match="no checkpoint in"):
        size_new_model(ModelArguments(), arguments(tmp_path / "empty", max_time=20, resume_from_checkpoint=True),
                       tokenizer=None, data=None)


def test_repetitions_of_a_small_text_are_worth_less_than_new_text():
    assert FIT.effective_characters(5e5, TEXT, 1e6) == 5e5  # the first pass counts in full
    assert FIT.effective_characters(2e6, TEXT, 1e6) == pytest.approx(TEXT * (1 + 4 * (1 - math.exp(-1 / 4))))
    assert FIT.effective_characters(1e9, TEXT, 1e6) == pytest.approx(5 * TEXT)  # levels off at (1 + R*) passes
    # a smaller model learns from more repetitions: R* = 4 (N / 1e6)**-0.5 is 8 passes at N = 250,000
    smaller_learns_longer = LossFit(**{**FIT.__dict__, "repetitions_exponent": 0.5})
    assert smaller_learns_longer.effective_characters(1e9, TEXT, 2.5e5) == pytest.approx(9 * TEXT)
    # on a small text, a long budget is better spent on a larger model than on more repetitions
    assert chosen(50_000, 3_000, unique_characters=1e5) > chosen(50_000, 3_000, unique_characters=1e9)
