"""The adaptive recipe (`lm_lstm.sizing`): the choice of size from measured speeds, when measuring stops, and
`lm-lstm train` sizing a model only when no size is given."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from transformers import TrainerState

import lm_lstm.sizing as sizing
from lm_lstm.arguments import DataArguments, ModelArguments
from lm_lstm.configuration_lstm import LSTMConfig
from lm_lstm.sizing import SCALING_FIT, Layout, LossFit, Measurement, choose_size, layer_parameters, size_model
import lm_lstm.training as training
from lm_lstm.training import TrainingTextCheck, size_new_model, train

from test_budget import StepClock, arguments, budget_callbacks

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "scaling.json"
FIT = LossFit(irreducible=1.0, a=100.0, alpha=0.5, b=100.0, beta=0.5, repetitions=4.0, repetitions_exponent=0.0)
TEXT = 1e6  # unique training characters
RECIPE = Layout(16, 128)


def speeds(tokens_per_second_at_128: float) -> list[Measurement]:
    """A machine whose speed falls as the layers' parameters grow: `tokens_per_second_at_128` at hidden size 128."""
    config = LSTMConfig(vocab_size=65, embedding_size=128, hidden_size=128, num_hidden_layers=2,
                        tie_word_embeddings=False)
    measurements = []
    for hidden_size in sizing.CANDIDATE_HIDDEN_SIZES:
        parameters = layer_parameters(sizing.with_hidden_size(config, hidden_size))
        speed = tokens_per_second_at_128 * layer_parameters(config) / parameters
        measurements.append(Measurement(hidden_size, parameters, speed, RECIPE))
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

    def fake_measure(config, hidden_size, layout, bf16, device):
        measured.append(hidden_size)
        return table[hidden_size]

    monkeypatch.setattr(sizing, "measure", fake_measure)
    config = LSTMConfig(vocab_size=65, embedding_size=128, hidden_size=128, num_hidden_layers=2)
    choice = size_model(config, 600, [RECIPE], bf16=False, unique_characters=TEXT, fit=FIT)
    best = choose_size(list(table.values()), 600, unique_characters=TEXT, fit=FIT).hidden_size
    assert choice.hidden_size == best
    sizes = sorted(table)
    assert measured == sizes[: sizes.index(best) + 2]
    assert choice.describe().startswith(f"Sized for a 10 min budget: hidden size {best} (")


def test_measuring_stops_before_a_measurement_that_would_end_past_its_share_of_the_budget(monkeypatch):
    """A measurement is expected to take as long as the last, times the ratio of their parameters x tokens per step;
    one that would end past `PROBE_SHARE` of the budget is not made (the first always is)."""
    now = [0.0]

    def measure_by_work(config, hidden_size, layout, bf16, device):  # 1 s per 100M parameters x tokens per step
        parameters = layer_parameters(sizing.with_hidden_size(config, hidden_size))
        now[0] += parameters * layout.streams * layout.block_size / 1e8
        return Measurement(hidden_size, parameters, 1e9 / hidden_size, layout)

    monkeypatch.setattr(sizing, "measure", measure_by_work)
    config = LSTMConfig(vocab_size=65, embedding_size=128)
    work = {size: layer_parameters(sizing.with_hidden_size(config, size)) * 2048 / 1e8 for size in (128, 192, 256)}
    budget = (work[128] + work[192] + work[256] / 2) / sizing.PROBE_SHARE  # room for 128 and 192, not for 256
    choice = size_model(config, budget, sizing.candidate_layouts(None, None), bf16=False, unique_characters=1e12,
                        fit=FIT, clock=lambda: now[0])
    assert [c.measurement.hidden_size for c in choice.candidates] == [128, 192]  # and no other layout
    assert choice.probe_seconds == pytest.approx(work[128] + work[192])
    assert choice.probe_seconds <= sizing.PROBE_SHARE * budget and choice.budget_seconds == budget
    assert choice.chosen.characters == pytest.approx(  # the budget left to train
        1e9 / choice.hidden_size * (budget - choice.probe_seconds) * sizing.TRAINING_SHARE)
    # A measurement longer than the whole share is made when it is the first.
    now[0] = 0.0
    choice = size_model(config, work[128] / 2 / sizing.PROBE_SHARE, sizing.candidate_layouts(None, None), bf16=False,
                        unique_characters=1e12, fit=FIT, clock=lambda: now[0])
    assert [c.measurement.hidden_size for c in choice.candidates] == [128]


def layouts(candidates: list[Layout]) -> list[tuple[int, int]]:
    return [(layout.streams, layout.block_size) for layout in candidates]


def test_the_layouts_to_choose_from_start_with_the_recipes_and_keep_what_is_given():
    """Streams x BPTT lengths within the measured tokens per update (1,024 to 8,192, over all processes), the nearest
    to the recipe's 16 x 128 first; a given value replaces its candidates; out of range, the nearest is kept."""
    assert layouts(sizing.candidate_layouts(None, None)) == [(16, 128), (32, 64), (16, 64), (8, 128), (32, 128)]
    assert layouts(sizing.candidate_layouts(None, None, processes=2)) == [
        (16, 128), (32, 64), (16, 64), (8, 128), (32, 128), (8, 64)]
    assert layouts(sizing.candidate_layouts(None, 64)) == [(32, 64), (16, 64)]
    assert layouts(sizing.candidate_layouts(4, None)) == [(4, 128)]  # 512 tokens: below the range
    assert layouts(sizing.candidate_layouts(4, 32)) == [(4, 32)]
    assert sizing.candidate_layouts(8, None, processes=2, accumulation=2)[0].tokens_per_update == 4096


def test_ties_keep_the_layout_measured_first_and_worth_is_not_extrapolated():
    """Sizes all at the untrained loss's cap keep the smallest size in the recipe's layout; a given layout outside
    the measured tokens per update is worth what the nearest end of the range is."""
    capped = [Measurement(128, 1, 1.0, layout) for layout in sizing.candidate_layouts(None, None)]
    choice = choose_size(capped, 60, TEXT, untrained_loss=math.log(65))
    assert choice.layout == RECIPE and len({c.loss for c in choice.candidates}) == 1
    small = sizing.expected_candidate(Measurement(512, 3e6, 1e4, Layout(4, 128)), 600, TEXT)
    assert small.worth == sizing.BATCH_WORTH.worth(1024)
    with pytest.raises(ValueError, match="per_device_train_batch_size must be at least 1, got 0"):
        arguments(Path("unused"), per_device_train_batch_size=0)


def test_a_layout_set_after_the_arguments_were_made_is_kept():
    training_args, data_args = arguments(Path("unused"), per_device_train_batch_size=None), DataArguments()
    assert training_args.train_batch_size_from_recipe() and data_args.block_size_from_recipe()
    training_args.per_device_train_batch_size, data_args.block_size = 4, 32
    assert not training_args.train_batch_size_from_recipe() and not data_args.block_size_from_recipe()


def test_a_character_in_a_batch_of_fewer_tokens_is_worth_more():
    worth = sizing.BATCH_WORTH
    assert worth.worth(2048) == 1 and worth.worth(4096) < 1
    assert worth.worth(1024) == pytest.approx((1 + 2048 / 1880) / (1 + 1024 / 1880))  # 1.35
    reference = speeds(10_000)[3]
    smaller = dataclasses.replace(reference, layout=Layout(8, 128))
    small, large = (sizing.expected_candidate(m, 600, TEXT, fit=FIT) for m in (smaller, reference))
    assert small.characters == large.characters and small.loss < large.loss
    assert small.loss == pytest.approx(FIT.loss(reference.parameters, small.characters * worth.worth(1024), TEXT))


def test_sizes_are_measured_in_the_first_layout_then_the_best_size_in_the_others(monkeypatch):
    """Batches of half the tokens run at 0.81 of the speed here (2**-0.3) and their characters are worth 1.35: the
    best size is measured in every layout, and 16 x 64 (1,024 tokens, measured before 8 x 128) is chosen."""
    table = {m.hidden_size: m for m in speeds(20_000)}
    measurements = []

    def fake_measure(config, hidden_size, layout, bf16, device):
        speed = table[hidden_size].tokens_per_second * (layout.tokens_per_update / 2048) ** 0.3
        measurements.append(Measurement(hidden_size, table[hidden_size].parameters, speed, layout))
        return measurements[-1]

    monkeypatch.setattr(sizing, "measure", fake_measure)
    candidates = sizing.candidate_layouts(None, None)
    choice = size_model(LSTMConfig(vocab_size=65), 600, candidates, bf16=False, unique_characters=TEXT, fit=FIT,
                        clock=lambda: 0.0)
    best = choose_size(list(table.values()), 600, unique_characters=TEXT, fit=FIT).hidden_size
    sizes = sorted(table)
    assert [(m.hidden_size, m.layout) for m in measurements] == [
        *((size, candidates[0]) for size in sizes[: sizes.index(best) + 2]), *((best, layout) for layout in candidates[1:])]
    assert choice.chosen == choose_size(measurements, 600, TEXT, fit=FIT).chosen
    assert (choice.hidden_size, choice.layout) == (best, Layout(16, 64))
    line = choice.describe()
    assert f"hidden size {best} (" in line and "in batches of 16 x 64 tokens trains at" in line
    assert "(each worth 1.35 of one in batches of 2,048 tokens)" in line
    assert " measured in 0 s; training takes 600 s, evaluations included." in line
    assert f"; by streams x tokens at hidden size {best}: 32 x 64: " in line
    assert f"{best}: " in line.split("Expected nats/char of the others, by hidden size in batches of 16 x 128")[1]


def test_measurement_counts_tokens_per_second_of_real_training_steps():
    config = LSTMConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2)
    measurement = sizing.measure(config, 24, Layout(streams=2, block_size=8, processes=3), bf16=False)
    assert measurement.hidden_size == 24
    assert measurement.parameters == layer_parameters(LSTMConfig(**{**config.to_dict(), "hidden_size": 24}))
    assert 0 < measurement.tokens_per_second < 1e9


def test_the_shipped_fits_are_the_ones_the_benchmarks_wrote():
    worth = json.loads((RESULTS.parent / "batch_worth.json").read_text())
    assert sizing.BATCH_WORTH.__dict__ == {name: worth[name] for name in sizing.BATCH_WORTH.__dict__}
    fit = json.loads(RESULTS.read_text())["fit"]
    shipped = SCALING_FIT.__dict__
    assert shipped == pytest.approx({name: fit[name] for name in shipped}, rel=1e-3)
    rows = json.loads(RESULTS.read_text())["rows"]
    assert sizing.FIT_MIN_CHARACTERS == min(row["tokens seen"] for row in rows)
    fitted_sizes = [row["hidden size"] for row in rows]  # candidates within them: beyond, the fit was optimistic
    candidates = sizing.CANDIDATE_HIDDEN_SIZES
    assert (min(candidates), max(candidates)) == (min(fitted_sizes), max(fitted_sizes))


def test_a_budget_below_the_fits_range_says_its_expectations_are_rough():
    short, long = (choose_size(speeds(1_000), seconds, TEXT) for seconds in (60, 3_600))
    assert short.chosen.characters < sizing.FIT_MIN_CHARACTERS < long.chosen.characters
    assert short.describe().endswith("these expected losses are rough extrapolations.")
    assert "rough" not in long.describe() and long.describe().endswith(tuple(f"{d}." for d in "0123456789"))


def test_a_budget_that_measuring_took_whole_trains_the_smallest_size(monkeypatch):
    """Measuring longer than the budget leaves no time to train: every size is expected at the untrained model's
    loss and the smallest is chosen (a negative training time made complex expected losses)."""
    for seconds in (0.0, -5.0):
        choice = choose_size(speeds(10_000), seconds, TEXT, untrained_loss=math.log(65))
        assert [c.loss for c in choice.candidates] == [math.log(65)] * len(choice.candidates)
        assert choice.chosen.characters == 0 and choice.hidden_size == min(sizing.CANDIDATE_HIDDEN_SIZES)
    ticks = iter(range(0, 1000, 10))  # each measurement takes 10 s of a 1 s budget
    monkeypatch.setattr(sizing, "measure", lambda config, hidden_size, *args: speeds(10_000)[0])
    choice = size_model(LSTMConfig(vocab_size=65), 1, [RECIPE], bf16=False, unique_characters=TEXT,
                        clock=lambda: next(ticks))
    assert choice.hidden_size == 128 and choice.probe_seconds > choice.budget_seconds
    assert "; training takes 1 s, evaluations included." in choice.describe()  # as train() keeps 1 s
    choice.budget_seconds, choice.probe_seconds = 601, 2.46  # rounded alike, the two add up to the budget
    assert " measured in 2.5 s; training takes 598.5 s, evaluations included." in choice.describe()


def test_expected_losses_are_capped_at_the_untrained_models(monkeypatch):
    """On a slow machine with a short budget the fit's power law exceeds ln(vocabulary size), the loss of an
    untrained model: every size is expected at that cap, the smallest is chosen, and measuring stops at the second."""
    untrained = math.log(65)
    assert SCALING_FIT.loss(speeds(100)[0].parameters, 100 * 60 * sizing.TRAINING_SHARE, TEXT) > untrained
    table = {m.hidden_size: m for m in speeds(100)}
    monkeypatch.setattr(sizing, "measure", lambda config, hidden_size, *args: table[hidden_size])
    choice = size_model(LSTMConfig(vocab_size=65), 60, [RECIPE], bf16=False, unique_characters=TEXT)
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
    choice = size_model(LSTMConfig(vocab_size=65), 600, [RECIPE], bf16=False, unique_characters=TEXT,
                        sizes=[128])
    assert choice.other_work_share == pytest.approx(5 / 8)
    # Right after the choice, before the others' expectations: a new user reads it first.
    assert ("evaluations included. Other work kept 62% of this process's CPUs busy while measuring: the speeds, and "
            "so the size, may be low (--hidden_size sets it). Expected nats/char of the others, " in choice.describe())
    quiet = sizing.CpuReading(wall=14.0, own=8.0, busy=108.5, cpus=2)  # others: 1.5 of 8 s
    assert sizing.other_work_share(sizing.CpuReading(10.0, 1.0, 100.0, 2), quiet) == pytest.approx(1.5 / 8)
    assert "Other work" not in choose_size(speeds(10_000), 600, TEXT).describe()
    assert sizing.other_work_share(None, quiet) == 0.0  # no /proc/stat: nothing to say


def run_train(corpus, output, fake_speed: float | None, monkeypatch, **model_options):
    measured = []

    def fake_measure(config, hidden_size, layout, bf16, device):
        measured.append((hidden_size, layout.streams, layout.block_size))
        parameters = layer_parameters(sizing.with_hidden_size(config, hidden_size))
        return Measurement(hidden_size, parameters, fake_speed * 1e6 / parameters, layout)

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


def test_train_lays_its_batches_out_as_chosen_when_the_layout_is_left_open(corpus, tmp_path, monkeypatch, capsys):
    """Without --per_device_train_batch_size and --block_size, the run trains in the layout chosen with the size (here
    the one of the fewest tokens per update), on its data laid out again, and its card says so."""
    for name, value in [("CANDIDATE_HIDDEN_SIZES", (8, 16)), ("CANDIDATE_STREAMS", (2, 4)),
                        ("CANDIDATE_BLOCK_SIZES", (16, 32)), ("TOKENS_PER_UPDATE_RANGE", (32, 128)),
                        ("RECIPE_LAYOUT", (4, 32))]:
        monkeypatch.setattr(sizing, name, value)
    measured = []

    def fake_measure(config, hidden_size, layout, bf16, device):
        measured.append((hidden_size, layout.streams, layout.block_size))
        assert device == training_args.device  # the one training uses
        return Measurement(hidden_size, hidden_size, 1_000.0, layout)

    monkeypatch.setattr(sizing, "measure", fake_measure)
    # On this tiny text every size is expected at the untrained model's loss; here the fewer tokens, the better.
    monkeypatch.setattr(sizing, "expected_candidate", lambda measurement, *args: sizing.Candidate(
        measurement, 1e6, measurement.layout.tokens_per_update / 1e3))
    training_args = arguments(tmp_path / "laid-out", per_device_train_batch_size=None, max_time=20)
    result = train(ModelArguments(tokenizer_type="char", embedding_size=16), DataArguments(train_file=[str(corpus)]),
                   training_args, callbacks=budget_callbacks(StepClock()))
    assert measured == [(8, 4, 32), (16, 4, 32), (8, 4, 16), (8, 2, 32), (8, 2, 16)]
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2
    kept = state["stateful_callbacks"]["TrainingTextCheck"]["args"]["training_data"]
    assert kept["block_size"] == 16  # the data's
    assert kept["sizing_seconds"] > 0 and training_args.max_time == pytest.approx(20 - kept["sizing_seconds"])
    assert "| time budget | 20 s of training, evaluations included |" in (result.output_dir / "README.md").read_text()
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Sized for"))
    assert "hidden size 8 (" in printed and "in batches of 2 x 16 tokens" in printed
    assert printed in (result.output_dir / "README.md").read_text()


def test_an_explicit_size_always_wins(corpus, tmp_path, monkeypatch):
    result, measured = run_train(corpus, tmp_path / "given", 1.0, monkeypatch, hidden_size=24)
    assert measured == []
    assert json.loads((result.output_dir / "config.json").read_text())["hidden_size"] == 24
    assert "| model size | set by the training options |" in (result.output_dir / "README.md").read_text()
    overridden = ModelArguments(tokenizer_type="char", config_overrides="num_hidden_layers=1,hidden_size=24")
    assert not overridden.size_left_open() and ModelArguments().size_left_open()


def test_a_resumed_run_takes_its_checkpoints_size_and_layout(tmp_path, monkeypatch):
    """What was left open comes from the checkpoint (its config, `training_args.json` and the `TrainingTextCheck`
    state), and the data is laid out again in it; given options stay, and a checkpoint without a layout keeps the
    recipe's."""
    monkeypatch.setattr(sizing, "measure", lambda *args: pytest.fail("a resumed run measured sizes"))
    monkeypatch.setattr(training, "build_training_data",
                        lambda raw, tokenizer, data_args, args: (args.per_device_train_batch_size, data_args.block_size))
    checkpoint = tmp_path / "checkpoint-3"
    LSTMConfig(vocab_size=40, embedding_size=16, hidden_size=24).save_pretrained(checkpoint)
    saved = TrainingTextCheck({"block_size": 64, "sizing_seconds": 5.0})  # measuring took 5 s of its 20 s budget
    TrainerState(global_step=3, train_batch_size=8, stateful_callbacks=[saved]).save_to_json(
        str(checkpoint / "trainer_state.json"))
    (checkpoint / "training_args.json").write_text(json.dumps({"per_device_train_batch_size": 8}))
    (checkpoint / "optimizer.pt").touch()  # with the state, what makes a folder a checkpoint to resume from
    for resume in (True, str(checkpoint)):
        model_args = ModelArguments(tokenizer_type="char", embedding_size=16)
        training_args = arguments(tmp_path, max_time=20, resume_from_checkpoint=resume, per_device_train_batch_size=None)
        assert size_new_model(model_args, DataArguments(), training_args, None, None, "data") == (None, (8, 64))
        assert model_args.hidden_size == 24
        assert (training_args.max_time, training_args.sizing_seconds) == (15.0, 5.0)  # as the uninterrupted run
        assert training_args.time_budget_seconds == 20.0  # the budget the run summary and the card name
    given = arguments(tmp_path, max_time=20, resume_from_checkpoint=True, per_device_train_batch_size=8)
    assert size_new_model(ModelArguments(), DataArguments(block_size=64), given, None, None, "data") == (None, "data")
    (checkpoint / "training_args.json").unlink()
    TrainerState(global_step=3, train_batch_size=8).save_to_json(str(checkpoint / "trainer_state.json"))
    recipe = arguments(tmp_path, max_time=20, resume_from_checkpoint=True, per_device_train_batch_size=None)
    assert size_new_model(ModelArguments(), DataArguments(), recipe, None, None, "data") == (None, "data")
    assert (recipe.per_device_train_batch_size, DataArguments().block_size) == (16, 128)
    assert recipe.max_time == 20.0
    with pytest.raises(ValueError, match="no checkpoint in"):
        size_new_model(ModelArguments(), DataArguments(),
                       arguments(tmp_path / "empty", max_time=20, resume_from_checkpoint=True), None, None, None)


def test_repetitions_of_a_small_text_are_worth_less_than_new_text():
    assert FIT.effective_characters(5e5, TEXT, 1e6) == 5e5  # the first pass counts in full
    assert FIT.effective_characters(2e6, TEXT, 1e6) == pytest.approx(TEXT * (1 + 4 * (1 - math.exp(-1 / 4))))
    assert FIT.effective_characters(1e9, TEXT, 1e6) == pytest.approx(5 * TEXT)  # levels off at (1 + R*) passes
    # a smaller model learns from more repetitions: R* = 4 (N / 1e6)**-0.5 is 8 passes at N = 250,000
    smaller_learns_longer = LossFit(**{**FIT.__dict__, "repetitions_exponent": 0.5})
    assert smaller_learns_longer.effective_characters(1e9, TEXT, 2.5e5) == pytest.approx(9 * TEXT)
    # on a small text, a long budget is better spent on a larger model than on more repetitions
    assert chosen(5_000, 1_000, unique_characters=1e5) > chosen(5_000, 1_000, unique_characters=1e9)
