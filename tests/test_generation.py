"""`generate()` and `pipeline("text-generation")` in every mode the model serves; where generation starts."""

import copy
import random
import threading
from types import SimpleNamespace

import evaluate
import pytest
import torch
from torch import nn
from conftest import random_ids, step_weights, tiny_model, transposed_copies_ranked_first
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, TextIteratorStreamer, TextStreamer, pipeline
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

import lm_lstm
from lm_lstm import LSTMForCausalLM, modeling_lstm
from lm_lstm.cli import main
from lm_lstm.arguments import ModelArguments
from lm_lstm.data import tokenize_documents
from lm_lstm.streams import StreamBlocks
from lm_lstm.tokenization import document_start_id, train_char_tokenizer
from lm_lstm.training import configure_generation

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=10),
    "beam": dict(num_beams=3, do_sample=False),
    "beam_sample": dict(num_beams=3, do_sample=True),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=2),
    "beam_num_return_sequences": dict(num_beams=3, num_return_sequences=2),
    "no_cache": dict(do_sample=False, use_cache=False),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
}
PROMPT = torch.tensor([[5, 6, 7], [8, 9, 10]])


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_respects_max_new_tokens(mode):
    model = tiny_model(eos_token_id=None)
    options = MODES[mode]
    out = model.generate(PROMPT, max_new_tokens=6, **options)
    copies = options.get("num_return_sequences", 1)
    assert out.shape == (2 * copies, 3 + 6)
    assert torch.equal(out[:, :3], PROMPT.repeat_interleave(copies, dim=0))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_stops_at_eos(mode):
    model = tiny_model(eos_token_id=2)
    with torch.no_grad():
        model.lm_head.bias[2] = 100.0  # EOS is by far the likeliest next token
    out = model.generate(PROMPT, max_new_tokens=6, **MODES[mode])
    assert out.shape[1] < 3 + 6
    for row in out[:, 3:].tolist():
        end = row.index(2)  # every sequence ends at EOS; only padding (or EOS) follows
        assert all(token in (0, 2) for token in row[end + 1 :])
    if "num_return_sequences" not in MODES[mode]:
        assert out.shape[1] == 3 + 1


def test_greedy_with_and_without_cache_and_with_static_cache_agree():
    model = tiny_model(eos_token_id=None)
    outputs = [model.generate(PROMPT, max_new_tokens=10, **MODES[m]) for m in ("greedy", "no_cache", "static_cache")]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def first_step_logits(model, ids, **kwargs) -> torch.Tensor:
    out = model.generate(ids, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kwargs)
    return out.logits[0]


def never_stopping(model):
    """`model` whose generation never ends at EOS; its config keeps EOS, the token documents start after."""
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prompt_is_read_after_the_document_start_token_as_training_reads_text(use_cache):
    model = never_stopping(tiny_model())
    start = torch.full((2, 1), model.config.eos_token_id)
    with torch.no_grad():
        after_start = model(torch.cat([start, PROMPT], dim=1)).logits[:, -1]
        from_zeros = model(PROMPT).logits[:, -1]
    torch.testing.assert_close(first_step_logits(model, PROMPT, use_cache=use_cache), after_start)
    assert not torch.allclose(after_start, from_zeros, atol=1e-3)
    # A prompt that begins with the start token is read from zeros, as the start token is in training.
    started = torch.cat([start, PROMPT], dim=1)
    torch.testing.assert_close(first_step_logits(model, started, use_cache=use_cache), after_start)


@pytest.mark.parametrize("options", [dict(use_cache=True), dict(use_cache=False), dict(prefill_chunk_size=1)])
def test_left_padded_rows_with_and_without_the_start_token_read_as_alone(options):
    model = never_stopping(tiny_model())
    start = model.config.eos_token_id
    rows = [torch.tensor([[start, 5, 6]]), torch.tensor([[7, 8, 9, 10]]), torch.tensor([[11]])]
    ids = torch.tensor([[0, start, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    mask = (ids != 0).long()
    batched = first_step_logits(model, ids, attention_mask=mask, **options)
    alone = torch.cat([first_step_logits(model, row) for row in rows])
    torch.testing.assert_close(batched, alone)


def test_no_start_is_added_without_an_eos_token_or_when_continuing_a_cache():
    model = tiny_model(eos_token_id=None)
    with torch.no_grad():
        from_zeros = model(PROMPT).logits[:, -1]
    torch.testing.assert_close(first_step_logits(model, PROMPT), from_zeros)
    model = never_stopping(tiny_model())
    cache = DynamicCache()
    with torch.no_grad():
        model(PROMPT[:, :2], cache=cache, use_cache=True)
        whole = model(PROMPT).logits[:, -1]
    torch.testing.assert_close(first_step_logits(model, PROMPT, cache=cache), whole)  # the cache's state, as it is
    cache.reset()  # a cache that has read nothing again starts as a new one
    torch.testing.assert_close(first_step_logits(model, PROMPT, cache=cache), first_step_logits(model, PROMPT))


@pytest.mark.parametrize("use_cache", [True, False])
def test_an_empty_prompt_is_refused_in_one_line(use_cache):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"^The prompt is empty \(`input_ids` of shape \(batch, 0\)\): call `generate"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), attention_mask=torch.zeros(1, 0, dtype=torch.long),
                       max_new_tokens=2, use_cache=use_cache)
    assert model.generate(max_new_tokens=2, do_sample=False)[0, 0] == model.config.bos_token_id  # without inputs


def test_greedy_stops_after_the_eos_it_would_emit():
    model = tiny_model(eos_token_id=None)
    free = model.generate(PROMPT[:1], max_new_tokens=8, do_sample=False)[0, 3:]
    stop = int(free[4])
    first = int((free == stop).nonzero()[0])
    out = model.generate(PROMPT[:1], max_new_tokens=8, do_sample=False, eos_token_id=stop)
    assert out[0, 3:].tolist() == free[: first + 1].tolist()


def never_pads(model):
    """`model` with the pad token never generated, so that `generate` infers no padding inside its own output."""
    with torch.no_grad():
        model.lm_head.bias[model.config.pad_token_id] = -1e4
    return model


LEFT_PADDED = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("batch", ["one", "left_padded"])
def test_continuing_from_a_returned_cache_equals_one_call(mode, batch):
    model = never_pads(tiny_model(eos_token_id=None))
    prompt, mask = (PROMPT[:1], torch.ones(1, 3, dtype=torch.long)) if batch == "one" else LEFT_PADDED
    mask_kwargs = lambda mask: {} if batch == "one" else {"attention_mask": mask}  # noqa: E731
    torch.manual_seed(3)
    whole = model.generate(prompt, max_new_tokens=8, **mask_kwargs(mask), **MODES[mode])
    torch.manual_seed(3)
    first = model.generate(prompt, max_new_tokens=4, return_dict_in_generate=True, **mask_kwargs(mask), **MODES[mode])
    assert first.cache.get_seq_length() == prompt.shape[1] + 3  # the last generated token is not fed yet
    longer_mask = torch.cat([mask, torch.ones(len(mask), 4, dtype=mask.dtype)], dim=1)
    more = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, **mask_kwargs(longer_mask),
                          **MODES[mode])
    assert torch.equal(more, whole)
    assert not torch.equal(whole[:, -4:], first.sequences[:, -4:])  # the continuation is not a repeat


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_decoding_steps_pass_their_inputs_on_as_transformers_preparation_would(mode, monkeypatch):
    """After the prompt, `prepare_inputs_for_generation` gives each step its token and cache itself; what it gives
    matches what transformers' preparation would, for every output `generate` can return."""
    model = never_pads(tiny_model(eos_token_id=None))
    prepared = []
    transformers_preparation = GenerationMixin.prepare_inputs_for_generation
    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation",
                        lambda *args, **kwargs: prepared.append(1) or transformers_preparation(*args, **kwargs))
    ids, mask = LEFT_PADDED
    options = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                   output_logits=True, output_hidden_states=True, **MODES[mode])

    def generate():
        torch.manual_seed(0)
        prepared.clear()
        return model.generate(ids, **options)

    lean = generate()
    assert len(prepared) == 1  # the prompt's
    monkeypatch.setattr(modeling_lstm, "DECODING_STEP_OPTIONS", frozenset())  # every step by transformers'
    full = generate()
    assert len(prepared) == 6
    assert torch.equal(lean.sequences, full.sequences)
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(lean, name), getattr(full, name), strict=True))
    for lean_step, full_step in zip(lean.hidden_states, full.hidden_states, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(lean_step, full_step, strict=True))
    assert len(lean.hidden_states[-1]) == 3  # the embeddings and both layers' outputs, at every step


@pytest.mark.parametrize("kernel", ["step_matmul", "linear", "transposed_matmul"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_decoding_steps_by_the_plan_give_what_the_general_path_gives(kernel, mode, monkeypatch):
    """After the prompt, every step runs `_decoding_step` with the cache's `DecodingPlan`; scores, logits, sequences
    and the final state are those of `forward`'s general path, bit for bit, whichever kernels the steps take."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", kernel)
    model = never_pads(tiny_model(eos_token_id=None))
    planned_steps = []
    decoding_step = LSTMForCausalLM._decoding_step
    monkeypatch.setattr(LSTMForCausalLM, "_decoding_step",
                        lambda *args: planned_steps.append(1) or decoding_step(*args))
    ids, mask = LEFT_PADDED
    options = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                   output_logits=True, **MODES[mode])

    def generate():
        torch.manual_seed(0)
        planned_steps.clear()
        return model.generate(ids, **options)

    planned = generate()
    assert len(planned_steps) == 5  # every token after the prompt's first
    assert (planned.cache.decoding_plan.layers[0] is None) == (kernel == "step_matmul")
    monkeypatch.setattr(LSTMForCausalLM, "_decoding_plan", lambda *args: None)
    general = generate()
    assert planned_steps == []
    assert torch.equal(planned.sequences, general.sequences)
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(planned, name), getattr(general, name), strict=True))
    for a, b in zip(planned.cache.layers, general.cache.layers, strict=True):
        assert a.seen_tokens == b.seen_tokens
        assert all(torch.equal(a.recurrent_states[slot], b.recurrent_states[slot]) for slot in (0, 1))


def test_the_decoding_plan_follows_weight_changes_hooks_and_the_model_it_serves(monkeypatch):
    """A plan made at one step serves the next only while nothing it resolved has changed: an in-place write to a
    weight, a hook added to a layer, another model given the cache. Each step equals the general path's."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "transposed_matmul")
    ids = random_ids(2, 9)
    hook_calls = []

    @torch.no_grad()
    def steps(model: LSTMForCausalLM, other: LSTMForCausalLM) -> tuple[list[torch.Tensor], list[object]]:
        cache, logits, plans = DynamicCache(), [], []
        model(ids[:, :3], cache=cache, use_cache=True)
        for t in range(3, ids.shape[1]):
            if t == 5:
                model.lm_head.weight.mul_(1.5)
                model.model.layers[0].rnn.weight_hh_l0.add_(0.1)
            if t == 6:
                model.model.layers[1].register_forward_hook(lambda *args: hook_calls.append(t))
            logits.append((other if t == 8 else model)(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            plans.append(getattr(cache, "decoding_plan", None))
        return logits, plans

    planned, plans = steps(tiny_model(), tiny_model(seed=1))
    assert plans[0] is plans[1] is not plans[2] and plans[2] is not None  # made again after the weights changed
    assert plans[3] is plans[4] is None and plans[5] is not None  # hooked layers: the general path; the other model's
    assert hook_calls == [6, 7]
    hook_calls.clear()
    monkeypatch.setattr(LSTMForCausalLM, "_decoding_plan", lambda *args: None)
    general, _ = steps(tiny_model(), tiny_model(seed=1))
    assert hook_calls == [6, 7]
    assert all(map(torch.equal, planned, general))


def lora_on_the_output_layer(model: LSTMForCausalLM) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(target_modules=["lm_head"], init_lora_weights=False, r=2))


def overwriting_to_float64(model: LSTMForCausalLM) -> None:
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # new parameter objects
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


MODEL_CHANGES = {  # made to a model between two decoding steps on one cache, after the first has made its plan
    "dropout modules in training (Monte Carlo dropout)": lambda model: [
        module.train() for module in model.modules() if isinstance(module, modeling_lstm.LockedDropout)],
    "layers in training (weight dropout)": lambda model: [layer.train() for layer in model.model.layers],
    "a new output weight": lambda model: setattr(model.lm_head, "weight", nn.Parameter(torch.randn(40, 10))),
    "load_state_dict(assign=True)": lambda model: model.load_state_dict(
        {name: torch.randn_like(value) for name, value in model.state_dict().items()}, assign=True),
    "a new output layer": lambda model: model.set_output_embeddings(nn.Linear(10, 40)),
    "a new LSTM": lambda model: setattr(model.model.layers[0], "rnn", nn.LSTM(6, 10, batch_first=True)),
    "weight norm on the output layer": lambda model: (
        nn.utils.parametrizations.weight_norm(model.lm_head),
        model.lm_head.parametrizations.weight.original0.data.mul_(3)),
    "resize_token_embeddings": lambda model: model.resize_token_embeddings(60, mean_resizing=False),
    "LoRA on the output layer": lora_on_the_output_layer,
    "dynamic int8 quantization in place": lambda model: torch.ao.quantization.quantize_dynamic(
        model, {nn.LSTM, nn.Linear}, dtype=torch.qint8, inplace=True),
    "to(float64) with new parameter objects": overwriting_to_float64,
    "a cache reordered to another batch": lambda model: None,
}


@pytest.mark.parametrize("kernel", ["linear", "step_matmul"])
@pytest.mark.parametrize("change", MODEL_CHANGES)
def test_a_step_after_the_model_changed_gives_what_the_general_path_gives(change, kernel, monkeypatch):
    """Replaced parameters or modules, submodules put in training, wrappers: the next step sees them, as the general
    path does, or raises the general path's error."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", kernel)
    dropouts = dict(input_dropout=0.3, hidden_dropout=0.3, output_dropout=0.3, weight_dropout=0.3)
    ids = random_ids(2, 6)

    @torch.no_grad()
    def next_step(general: bool) -> torch.Tensor | str:
        model, cache = tiny_model(**dropouts), DynamicCache()
        if general:
            monkeypatch.setattr(model, "_decoding_plan", lambda *args: None)
        model(ids[:, :3], cache=cache, use_cache=True)
        model(ids[:, 3:4], cache=cache, use_cache=True)
        assert (getattr(cache, "decoding_plan", None) is None) == general
        torch.manual_seed(1)
        MODEL_CHANGES[change](model)
        if change == "a cache reordered to another batch":
            cache.reorder_cache(torch.tensor([0, 0, 1]))
        torch.manual_seed(2)
        try:
            return model(ids[:, 4:5], cache=cache, use_cache=True).logits
        except ValueError as error:
            return str(error)

    planned, general = next_step(general=False), next_step(general=True)
    if change == "a cache reordered to another batch":
        assert planned == general and "holds states for a batch of 3" in general
    else:
        assert torch.equal(planned, general)


def test_a_short_generation_makes_no_transposed_copy_that_would_not_pay(monkeypatch):
    """Each step of a generation of 3 tokens saves 3 x 1e-4 s in all with a copy that took 5e-3 to make: `F.linear`
    computes them, with the same tokens as when forced, after a prompt of 60; 60 tokens make the copies."""
    model, ids = tiny_model(), random_ids(1, 60)
    weights = step_weights(model)
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "linear")
    forced = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    transposed_copies_ranked_first(monkeypatch, weights, saving=1e-4, cost=5e-3)

    def generate(new_tokens: int) -> tuple[torch.Tensor, int]:
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                return_dict_in_generate=True)
        return output.sequences, len(output.cache.transposed_weights)

    sequences, copies = generate(3)
    assert torch.equal(sequences, forced) and copies == 0
    assert generate(60)[1] == len(weights) == 5
    transposed_copies_ranked_first(monkeypatch, weights, saving=1e-4, cost=5e-3)  # not this tiny model's copies' cost
    short = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                           return_dict_in_generate=True)
    assert len(short.cache.transposed_weights) == 0
    model.generate(short.sequences, cache=short.cache, max_new_tokens=60, do_sample=False, pad_token_id=0,
                   eos_token_id=None)  # the same cache, continued for longer: the copies now pay
    assert len(short.cache.transposed_weights) == 5


def test_a_decoding_step_output_is_the_output_class_as_its_constructor_makes_it():
    logits, cache = torch.randn(2, 1, 5), DynamicCache()
    made = modeling_lstm.decoding_step_output(logits, cache)
    expected = CausalLMOutputWithPast(logits=logits, cache=cache)
    assert type(made) is CausalLMOutputWithPast and vars(made) == vars(expected)
    assert list(made.items()) == list(expected.items()) and made.to_tuple() == expected.to_tuple()
    assert made[0] is made["logits"] is made.logits is logits and made[1] is made["cache"] is cache


@pytest.mark.parametrize("token, embedding_rows", [(-1, 40), (40, 40), (10**6, 40), (45, 50)])
def test_a_step_by_the_plan_refuses_ids_out_of_range_as_the_general_path_does_and_keeps_the_state(
    token, embedding_rows
):
    """Out of the vocabulary of the config, even where the embedding has more rows (then `F.embedding` would look
    the id up)."""
    model, ids = tiny_model(), random_ids(2, 6)
    model.set_input_embeddings(nn.Embedding(embedding_rows, 6))
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).cache
        model(ids[:, 3:4], cache=cache, use_cache=True)
        plan, state = cache.decoding_plan, [t.clone() for t in cache.layers[-1].recurrent_states.values()]
        bad = ids[:, 4:5].clone()
        bad[1] = token
        with pytest.raises(ValueError, match=r"`input_ids` must be in \[0, 40\) \(the vocabulary size\)") as error:
            model(bad, cache=cache, use_cache=True)
        assert f" {token}" in str(error.value)
        assert cache.decoding_plan is plan and all(map(torch.equal, cache.layers[-1].recurrent_states.values(), state))
        torch.testing.assert_close(model(ids[:, 4:5], cache=cache, use_cache=True).logits,
                                   model(ids[:, :5]).logits[:, -1:], atol=1e-5, rtol=0)


def test_a_negative_logits_to_keep_keeps_no_position_of_a_step():
    model, ids = tiny_model(), random_ids(2, 4)
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).cache
        model(ids[:, 3:], cache=cache, use_cache=True)
        assert model(ids[:, 3:], cache=cache, use_cache=True, logits_to_keep=-1).logits.shape == (2, 0, 40)


@pytest.mark.parametrize("case", ["training", "autograd", "hidden_states", "mask", "tuple", "copied_cache"])
def test_steps_that_the_plan_does_not_serve_take_the_general_path(case, monkeypatch):
    model = tiny_model()
    ids = random_ids(2, 4)
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).cache
        model(ids[:, 3:], cache=cache, use_cache=True)  # the plan is made
    assert cache.decoding_plan is not None
    monkeypatch.setattr(LSTMForCausalLM, "_decoding_step", lambda *args: pytest.fail("took the plan"))
    options = {"hidden_states": {"output_hidden_states": True}, "tuple": {"return_dict": False},
               "mask": {"attention_mask": torch.ones(2, 1, dtype=torch.long)}}.get(case, {})
    model.train(case == "training")
    if case == "copied_cache":
        cache = copy.deepcopy(cache)
        assert cache.decoding_plan is None
        monkeypatch.setattr(LSTMForCausalLM, "_make_decoding_plan", lambda *args: None)
    with torch.set_grad_enabled(case in ("training", "autograd")):
        model(ids[:, 3:], cache=cache, use_cache=True, **options)


def test_continuing_with_only_the_new_tokens_needs_the_whole_mask():
    model = never_pads(tiny_model(eos_token_id=None))
    whole = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    first = model.generate(PROMPT, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    more = model.generate(first.sequences[:, -1:], attention_mask=torch.ones(2, 7, dtype=torch.long),
                          cache=first.cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(more[:, 1:], whole[:, 7:])
    with pytest.raises(ValueError, match="`cache` has consumed 10 positions, but the inputs hold 1"):
        model.generate(more[:, -1:], cache=first.cache, max_new_tokens=4)  # the state has read `more` up to there
    with pytest.raises(ValueError, match="`cache` has consumed 10 positions, but the inputs hold 10"):
        model.generate(whole[:, :10], cache=first.cache, max_new_tokens=4)  # what it has read: nothing new


def test_prefill_in_chunks_equals_prefill_at_once():
    model = tiny_model(eos_token_id=None)
    ids, mask = LEFT_PADDED
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, prefill_chunk_size=1),
                       expected)


@pytest.mark.parametrize("with_ids", [False, True])
def test_generating_from_embeddings_equals_generating_from_their_ids(with_ids):
    model = tiny_model(eos_token_id=None)
    ids, mask = LEFT_PADDED
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(ids).detach()
    if with_ids:  # decoder-only models take both: the embeddings feed the first step, the ids are the sequence
        out = model.generate(ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, expected)
    else:
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, expected[:, ids.shape[1] :])
    torch.manual_seed(0)
    assert not torch.equal(model.generate(inputs_embeds=torch.randn_like(embeds), attention_mask=mask,
                                          max_new_tokens=6, do_sample=False), expected[:, ids.shape[1] :])


@pytest.mark.parametrize(
    "options",
    [
        dict(penalty_alpha=0.6, top_k=4), dict(penalty_alpha=0.6, top_k=4, do_sample=False), dict(low_memory=True),
        dict(dola_layers="high"), dict(dola_layers="low", num_beams=2), dict(num_beam_groups=2, num_beams=4),
        dict(diversity_penalty=1.0, num_beams=2), dict(constraints=[]), dict(force_words_ids=[[5]], num_beams=2),
        dict(prompt_lookup_num_tokens=2), dict(prompt_lookup_num_tokens=2, num_beams=2), dict(assistant_early_exit=1),
        dict(use_mtp=True), dict(assistant_model="tiny"), dict(assistant_model="tiny", num_beams=2),
    ],
    ids=lambda options: "-".join(options),
)
def test_options_the_model_cannot_honour_are_refused_by_name(options):
    model = tiny_model()
    model.generation_config.do_sample = True  # as saved models have it: sampling would ignore some options
    option = next(iter(options))
    if options.get("assistant_model") == "tiny":
        options = {**options, "assistant_model": tiny_model()}
    with pytest.raises(ValueError, match=f"^`{option}` asks for .* only supports greedy search, sampling and beam"):
        model.generate(PROMPT, max_new_tokens=2, **options)


@pytest.fixture
def char_model(char_tokenizer):
    model = tiny_model(
        vocab_size=len(char_tokenizer), eos_token_id=char_tokenizer.eos_token_id,
        pad_token_id=char_tokenizer.pad_token_id, bos_token_id=char_tokenizer.bos_token_id,
    )
    model.generation_config.pad_token_id = char_tokenizer.pad_token_id
    return model


def test_text_streamer_prints_the_generated_text(char_model, char_tokenizer, capsys):
    inputs = char_tokenizer("ROMEO:", return_tensors="pt")
    streamer = TextStreamer(char_tokenizer, skip_prompt=True)
    out = char_model.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() == char_tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()


def test_text_iterator_streamer_yields_the_generated_text(char_model, char_tokenizer):
    inputs = char_tokenizer("ROMEO:", return_tensors="pt")
    streamer = TextIteratorStreamer(char_tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("ids", char_model.generate(**inputs, max_new_tokens=12, streamer=streamer))
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = char_tokenizer.decode(result["ids"][0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert streamed == expected


def test_text_generation_pipeline_with_batched_prompts(char_model, char_tokenizer):
    generator = pipeline("text-generation", model=char_model, tokenizer=char_tokenizer, device="cpu")
    prompts = ["ROMEO:", "First Citizen:\nWe are"]
    batched = generator(prompts, max_new_tokens=10, do_sample=False, batch_size=2)
    for prompt, result in zip(prompts, batched):
        text = result[0]["generated_text"]
        assert text.startswith(prompt) and len(text) > len(prompt)
        assert text == generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]


@pytest.fixture(scope="module")
def z_run(tmp_path_factory):
    """A tiny char model trained on 120 one-line documents that all begin with "Z: ", laid out as `lm-lstm train`
    lays them out (`StreamBlocks`: each document one block, from a zero state), and saved as training saves it."""
    rng = random.Random(0)
    words = ["apple", "bird", "cold", "dusk", "even", "fig", "gold", "hill", "ink", "jay"]
    texts = ["Z: " + " ".join(rng.choices(words, k=3)) for _ in range(120)]
    tokenizer = train_char_tokenizer(texts)
    layout = StreamBlocks.from_pieces(
        tokenize_documents(Dataset.from_dict({"text": texts}), tokenizer), tokenizer, block_size=32, num_streams=1
    )
    assert layout.resets.all()  # one block per document: the whole layout is one batch of independent rows
    inputs, targets = torch.from_numpy(layout.inputs[0]), torch.from_numpy(layout.targets[0])
    arguments = ModelArguments(embedding_size=16, hidden_size=32, num_hidden_layers=1, input_dropout=0.0,
                               hidden_dropout=0.0, output_dropout=0.0, weight_dropout=0.0)
    torch.manual_seed(0)
    model = lm_lstm.LSTMForCausalLM(arguments.new_config(tokenizer))
    configure_generation(model, tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    try:
        for _ in range(150):
            loss = torch.nn.functional.cross_entropy(model(inputs).logits.transpose(1, 2), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("z") / "model"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return SimpleNamespace(folder=folder, training_starts=set(inputs[:, 0].tolist()))


def test_every_path_starts_documents_from_the_token_training_starts_them_from(z_run):
    tokenizer = AutoTokenizer.from_pretrained(z_run.folder)  # what pipelines and lm-evaluation-harness read
    model = AutoModelForCausalLM.from_pretrained(z_run.folder)
    start = document_start_id(tokenizer)
    assert z_run.training_starts == {start}
    assert tokenizer.bos_token_id == model.config.bos_token_id == model.generation_config.bos_token_id == start
    assert model.generate(max_new_tokens=1, do_sample=False)[0, 0] == start


def test_the_metric_scores_the_first_character_from_the_document_start(z_run):
    metric = evaluate.load(lm_lstm.PERPLEXITY_METRIC)
    perplexity = metric.compute(model_id=str(z_run.folder), predictions=["Z"])["perplexities"][0]
    assert 1 / perplexity > 0.95  # the perplexity of "Z" alone is 1 / P("Z" | start token)
    model = AutoModelForCausalLM.from_pretrained(z_run.folder)
    tokenizer = AutoTokenizer.from_pretrained(z_run.folder)
    with torch.no_grad():  # the start token matters: from padding, a token never trained on, "Z" is less likely
        from_padding = model(torch.tensor([[tokenizer.pad_token_id]])).logits[0, -1].softmax(-1)
    assert from_padding[tokenizer.convert_tokens_to_ids("Z")] < 0.9


def test_a_prompt_continues_as_at_the_start_of_a_document(z_run, capsys):
    # Every document begins "Z: ": read from zeros, as it never is in training, "Z" is followed by junk.
    generator = pipeline("text-generation", model=str(z_run.folder), device="cpu")
    assert generator("Z", max_new_tokens=2, do_sample=False)[0]["generated_text"] == "Z: "
    command = ["generate", "--model", str(z_run.folder), "--prompt", "Z:", "--no-do_sample", "--max_new_tokens", "1"]
    assert main(command) == 0
    assert capsys.readouterr().out == "Z: \n"


def test_generate_command_with_an_empty_prompt_starts_a_document(z_run, capsys):
    status = main(["generate", "--model", str(z_run.folder), "--prompt", "", "--no-do_sample", "--max_new_tokens", "3"])
    assert status == 0
    assert capsys.readouterr().out == "Z: \n"


def test_text_generation_pipeline_with_an_empty_prompt_starts_a_document(z_run):
    generator = pipeline("text-generation", model=str(z_run.folder), device="cpu")
    assert generator("", max_new_tokens=3, do_sample=False)[0]["generated_text"] == "Z: "
    ids = generator("", max_new_tokens=3, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert ids[0] == document_start_id(generator.tokenizer)


def test_a_cache_with_use_cache_false_is_refused_and_past_key_values_is_an_alias_of_cache():
    model = tiny_model()
    ids = torch.randint(3, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="use_cache=False` with a `cache`"):
        model.generate(ids, cache=DynamicCache(), use_cache=False, max_new_tokens=3, do_sample=False)
    cache = DynamicCache()
    model(ids[:, :4], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(model(ids[:, 4:], past_key_values=cache, use_cache=True).logits, model(ids).logits[:, 4:])


def test_attention_weights_are_refused_rather_than_returned_empty():
    model = tiny_model()
    ids = torch.randint(3, 40, (1, 4), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="no attention weights"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="no attention weights"):
        model.generate(ids, output_attentions=True, return_dict_in_generate=True, max_new_tokens=2, do_sample=False)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 6)
