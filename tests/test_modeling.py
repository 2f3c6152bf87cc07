"""The model: cache equivalence, padding, save/load, loss and gradients, dropouts, bad inputs."""

import copy
import functools
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import (
    NO_DROPOUT,
    left_padded_prompts,
    measuring_step_kernels,
    random_ids,
    step_weights,
    tiny_config,
    tiny_model,
    transposed_copies_ranked_first,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from lm_lstm import LSTMConfig, LSTMForCausalLM, LSTMModel
from lm_lstm.arguments import LSTMTrainingArguments
from lm_lstm.trainer import LSTMTrainer
from lm_lstm import modeling_lstm
from lm_lstm.modeling_lstm import (
    PaddingLayout,
    TransposedWeights,
    real_position_mask,
    step_kernel,
    step_matmul,
    transposed_weights,
)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # step_matmul, torch.lstm_cell
@pytest.mark.parametrize("tied", [False, True])
def test_full_forward_equals_stepping_through_the_cache(tied, dtype, batch_size):
    model = tiny_model(tie_word_embeddings=tied, num_hidden_layers=3).to(dtype)
    torch.nn.init.normal_(model.lm_head.bias)  # initialised to zeros
    ids = random_ids(batch_size, 9)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_a_step_from_a_cache_of_mixed_precision_runs_in_the_inputs_precision():
    model = tiny_model()
    ids = random_ids(2, 5)
    cache = DynamicCache(config=model.config)
    model(ids[:, :4], cache=cache, use_cache=True)
    layer = cache.layers[0]
    layer.recurrent_states[1] = layer.recurrent_states[1].double()  # the cell state only
    step = model(ids[:, 4:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], model(ids).logits[:, -1], atol=1e-5, rtol=0)


def test_stepping_under_bf16_autocast_follows_the_full_forward():
    model = tiny_model(num_hidden_layers=3)
    ids = random_ids(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full.float(), atol=0.03, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("transposed_rows", [False, True])
def test_step_kernels_equal_linear(rows, transposed_rows):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 20, generator=generator)
    inputs = torch.randn(20, rows, generator=generator).t() if transposed_rows else torch.randn(rows, 20)
    assert step_kernel(inputs, weight) is step_matmul
    torch.testing.assert_close(step_matmul(inputs, weight), F.linear(inputs, weight), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(TransposedWeights().matmul(inputs, weight), F.linear(inputs, weight), atol=1e-5,
                                   rtol=1e-5)


def test_step_kernel_is_linear_where_no_other_applies(monkeypatch):
    weight, rows, transposed = nn.Parameter(torch.zeros(30, 4)), torch.zeros(2, 4), TransposedWeights()
    assert step_kernel(rows, weight) is step_matmul
    assert step_kernel(rows.double(), weight.double()) is F.linear
    assert step_kernel(rows.bfloat16(), weight.bfloat16()) is F.linear
    assert step_kernel(torch.zeros(1000, 4), weight) is F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_kernel(rows, weight) is F.linear
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "transposed_matmul")
    assert step_kernel(rows, weight, transposed) is F.linear  # under autograd: the copy is not the parameter
    with torch.no_grad():
        assert step_kernel(rows, weight, transposed) == transposed.matmul
        assert step_kernel(rows, weight) is F.linear  # no cache to keep the copies
        assert step_kernel(rows, weight.detach(), transposed) is F.linear  # not a parameter: made anew at each call?
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "step-matmul")
    for where_linear_applies in (False, True):
        with pytest.raises(ValueError, match="STEP_KERNEL is 'step-matmul'; use None or one of step_matmul, linear"):
            step_kernel(rows.double() if where_linear_applies else rows, weight.double() if where_linear_applies else weight)


@pytest.mark.parametrize("fastest", ["step_matmul", "linear", "transposed_matmul"])
def test_step_kernel_times_each_in_use_then_keeps_the_fastest(fastest, monkeypatch):
    def slow(kernel):
        # far above scheduling noise, even on a busy machine
        return lambda *args: (time.sleep(0.1), kernel(*args))[1]

    measuring_step_kernels(monkeypatch, trials=3)
    if fastest != "step_matmul":
        monkeypatch.setattr(modeling_lstm, "step_matmul", slow(step_matmul))
    if fastest != "transposed_matmul":
        monkeypatch.setattr(TransposedWeights, "matmul", slow(TransposedWeights.matmul))
    if fastest != "linear":
        monkeypatch.setattr(modeling_lstm, "F", SimpleNamespace(linear=slow(F.linear)))
    generator = torch.Generator().manual_seed(0)
    weight, other_weight = (nn.Parameter(torch.randn(size, 16, generator=generator)) for size in (64, 48))
    rows, transposed = torch.randn(1, 16, generator=generator), TransposedWeights()
    with torch.no_grad():
        for _ in range(3 * 3):  # the trials, in turn, each giving F.linear's results
            kernel = step_kernel(rows, weight, transposed)
            assert isinstance(kernel, functools.partial)
            torch.testing.assert_close(kernel(rows, weight), F.linear(rows, weight), atol=1e-5, rtol=1e-5)
        ranking = modeling_lstm._step_kernel_ranking
        assert list(ranking) == [(1, 64, 16)] and ranking[(1, 64, 16)][0] == fastest
        assert step_kernel(rows, weight, transposed) == modeling_lstm.step_kernel_named(fastest, transposed)
        assert isinstance(step_kernel(rows, other_weight, transposed), functools.partial)  # kept for that shape only
        assert len(transposed) == (fastest == "transposed_matmul")  # the copy stays only where chosen
        # What a call saves with the copy against the next kernel (slowed by 0.1 s), and what the copy took to make
        saving = modeling_lstm._step_kernel_saving
        assert list(saving) == ([(1, 64, 16)] if fastest == "transposed_matmul" else []) and all(
            0.09 < seconds < 1 for seconds in saving.values())
        assert list(modeling_lstm._transposed_copy_seconds) == [(64, 16)]  # its trials made one, whatever won
    with_autograd = step_kernel(rows.requires_grad_(), weight, transposed)
    assert with_autograd is modeling_lstm.step_kernel_named([n for n in ranking[(1, 64, 16)] if n != "transposed_matmul"][0])


@pytest.mark.parametrize(
    "seconds, first",
    [
        ({"linear": [1.0] * 3, "step_matmul": [0.8] * 3}, "step_matmul"),  # faster by more than the margin
        ({"linear": [1.0] * 3, "step_matmul": [0.95] * 3, "transposed_matmul": [0.93] * 3}, "linear"),  # within it
        ({"linear": [1.0] * 3, "transposed_matmul": [0.3, 1.2, 1.2]}, "linear"),  # fastest at best, not in median
        ({"linear": [1.0, 9.0, 9.0], "step_matmul": [2.0] * 3}, "step_matmul"),
        ({"linear": [0.0], "step_matmul": [0.0]}, "linear"),  # equal
    ],
)
def test_step_kernels_rank_by_median_and_linear_keeps_its_place_within_the_margin(seconds, first):
    ranking = modeling_lstm.rank_step_kernels(seconds)
    assert ranking[0] == first and sorted(ranking) == sorted(seconds)


def test_the_kernel_after_the_transposed_copy_is_chosen_by_the_same_margin():
    """Where the copy cannot serve (autograd), `step_kernel` takes the next: `F.linear` beside a kernel within 10%."""
    ranking = modeling_lstm.rank_step_kernels({"linear": [1.0], "step_matmul": [0.95], "transposed_matmul": [0.5]})
    assert ranking == ("transposed_matmul", "linear", "step_matmul")


def test_the_transposed_copy_is_used_only_where_the_steps_expected_pay_for_it(monkeypatch):
    weight, rows = nn.Parameter(torch.randn(30, 4)), torch.randn(1, 4)
    transposed_copies_ranked_first(monkeypatch, [weight], saving=1e-4, cost=5e-3)  # 50 steps pay for a copy
    with torch.no_grad():
        for steps, pays in ((None, True), (100, True), (10, False)):
            transposed = TransposedWeights(steps)
            # Not `step_matmul`, ranked second: the saving is against `F.linear`, which a decoding plan passes to
            # `torch.lstm_cell` (a `step_matmul` layer takes the general path's step)
            assert step_kernel(rows, weight, transposed) == (transposed.matmul if pays else F.linear)
            assert len(transposed) == 0  # made by the kernel's first call, not by the choice
        transposed = TransposedWeights(10)
        transposed.of(weight)
        assert step_kernel(rows, weight, transposed) == transposed.matmul  # made already: used


def test_transposed_copies_follow_the_weights_they_see_change_and_live_with_the_cache():
    weight, rows, transposed = torch.randn(30, 4), torch.randn(1, 4), TransposedWeights()
    with torch.no_grad():
        transposed.matmul(rows, weight)
        weight.mul_(-2)  # in place, as `load_state_dict`: the version counter moves
        torch.testing.assert_close(transposed.matmul(rows, weight), F.linear(rows, weight))
        assert len(transposed) == 1 and len(copy.deepcopy(transposed)) == 0
    del weight
    assert len(transposed) == 0  # gone with the weight's storage
    cache = DynamicCache()
    assert transposed_weights(cache) is transposed_weights(cache) and transposed_weights(None) is None
    assert transposed_weights(copy.deepcopy(cache)) is not transposed_weights(cache)


def step_after(model: LSTMForCausalLM, change: Callable[[DynamicCache], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of a one-token step after `change(cache)`, continuing a cache whose steps made transposed copies
    (`STEP_KERNEL` "transposed_matmul"), and those of the same step from a copy of that cache, which makes its own."""
    ids, cache = random_ids(1, 6), DynamicCache(config=model.config)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
        assert len(cache.transposed_weights) == 5  # two layers' two weights, and the output layer's
        change(cache)
        expected = model(ids[:, -1:], cache=copy.deepcopy(cache), use_cache=True).logits
        return model(ids[:, -1:], cache=cache, use_cache=True).logits, expected


def copied_storages(model: LSTMForCausalLM, cache: DynamicCache) -> bool:
    """Whether the transposed copies `cache` keeps are one for each of `model`'s LSTM and output weights, now."""
    storages = {id(weight.untyped_storage()) for weight in step_weights(model)}
    return len(cache.transposed_weights) == 5 and set(map(id, cache.transposed_weights.copies)) == storages


@pytest.mark.parametrize("replaced_by", ["half then float", "load_state_dict(assign=True)"])
def test_transposed_copies_go_with_the_storage_they_were_made_from(replaced_by, monkeypatch):
    """A weight's new storage gets a new copy, even at the old one's address (which `.half()` then `.float()` can
    give), and the copies of storages no longer used go: a cache keeps one per weight, however often replaced."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "transposed_matmul")
    model = tiny_model(vocab_size=50).eval()

    def replace_the_weights_five_times(cache: DynamicCache) -> None:
        for _ in range(5):
            if replaced_by == "half then float":
                model.half().float()
            else:
                model.load_state_dict({name: value * 1.01 for name, value in model.state_dict().items()}, assign=True)
            model(random_ids(1, 1), cache=cache, use_cache=True)
            assert copied_storages(model, cache)

    logits, expected = step_after(model, replace_the_weights_five_times)
    assert torch.equal(logits, expected)


def test_a_cache_with_transposed_copies_lets_modules_swap_their_parameters(monkeypatch):
    """`.to()` under `set_swap_module_params_on_conversion(True)` swaps each parameter's tensor
    (`torch.utils.swap_tensors`), which refuses a tensor with weak references."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "transposed_matmul")
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    model = tiny_model(vocab_size=50).eval()
    logits, expected = step_after(model, lambda cache: model.half().float())
    assert torch.equal(logits, expected)


def test_generation_after_unseen_weight_changes_uses_the_new_weights(monkeypatch):
    """A fused optimizer step and a write through `.data` (PEFT's merge) leave a weight's version counter as it was:
    the next `generate()` must still decode with the new weights (its cache makes its own transposed copies)."""
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "transposed_matmul")
    model = tiny_model(vocab_size=50).eval()
    prompt = random_ids(1, 4)

    def generated_logits() -> torch.Tensor:
        output = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(output.logits, 1)

    generated_logits()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(random_ids(2, 6), labels=random_ids(2, 6)).loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.lm_head.weight.data.mul_(1.5)
    logits = generated_logits()
    monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "linear")
    torch.testing.assert_close(logits, generated_logits(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_model_steps_with_the_measured_kernels(grad, monkeypatch):
    measuring_step_kernels(monkeypatch, trials=2)
    model = tiny_model(tie_word_embeddings=True, vocab_size=50)
    ids = random_ids(2, 3 * 2 + 2)  # the trials, then the kept kernels
    cache = DynamicCache(config=model.config)
    steps, plans = [], []
    with torch.set_grad_enabled(grad):
        for t in range(ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            plans.append(getattr(cache, "decoding_plan", None) is not None)
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids).logits, atol=1e-5, rtol=0)
    # The steps by a `DecodingPlan` start once every kernel is chosen, after the trials of the three; never under
    # autograd.
    assert plans == [False] * 6 + [True] * 2 if not grad else not any(plans)
    # At 2 rows: both layers' input and recurrent weights, and the output layer, each decided.
    ranking = modeling_lstm._step_kernel_ranking
    assert set(ranking) == {(2, 40, 6), (2, 40, 10), (2, 24, 10), (2, 24, 6), (2, 50, 6)}
    assert modeling_lstm._step_kernel_seconds == {}
    assert all(("transposed_matmul" in kernels) == (not grad) for kernels in ranking.values())
    if grad:  # the gradients of the step by the chosen kernels are F.linear's
        torch.cat(steps, dim=1).square().mean().backward()
        measured = {name: weight.grad.clone() for name, weight in model.named_parameters()}
        model.zero_grad()
        monkeypatch.setattr(modeling_lstm, "STEP_KERNEL", "linear")
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
        torch.cat(steps, dim=1).square().mean().backward()
        for name, weight in model.named_parameters():
            torch.testing.assert_close(measured[name], weight.grad, atol=1e-6, rtol=1e-5)


def test_lstm_leaves_autocast_where_this_cpu_cannot_run_it_in_bf16(monkeypatch):
    model = tiny_model(num_hidden_layers=3)
    ids = random_ids(2, 9)
    reference = model(ids, output_hidden_states=True)
    if modeling_lstm.cpu_autocast_runs_lstm(torch.bfloat16):  # the kernels run in bf16 here, unless told otherwise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.model(ids).last_hidden_state.dtype == torch.bfloat16
    monkeypatch.setattr(modeling_lstm, "cpu_autocast_runs_lstm", lambda dtype: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, output_hidden_states=True)
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    for layer_output, expected in zip(out.hidden_states, reference.hidden_states):
        assert layer_output.dtype == torch.float32
        torch.testing.assert_close(layer_output, expected, atol=1e-6, rtol=0)
    assert out.logits.dtype == torch.bfloat16  # the output layer stays under autocast
    torch.testing.assert_close(out.logits.float(), reference.logits, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), out.logits, atol=0, rtol=0)


def test_bf16_runs_on_a_cpu_without_bf16_lstm_kernels(tmp_path):
    """oneDNN limited to AVX2, as on a CPU without bf16 arithmetic, where a bf16 LSTM primitive cannot be created."""
    model = tiny_model(num_hidden_layers=3)
    model.save_pretrained(tmp_path)
    ids = random_ids(2, 9)
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import platform
        import torch
        from lm_lstm import LSTMForCausalLM, modeling_lstm
        from transformers import DynamicCache
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert not modeling_lstm.cpu_autocast_runs_lstm(torch.bfloat16)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        ids = expected["ids"]
        model = LSTMForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(ids).logits
            cache = DynamicCache(config=model.config)
            steps = torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(9)], 1)
        torch.testing.assert_close(steps.float(), full.float(), atol=0.03, rtol=0)
        torch.testing.assert_close(full.float(), expected["logits"], atol=0.03, rtol=0)
        bf16 = LSTMForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.bfloat16).eval()
        logits = bf16(ids).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), expected["logits"], atol=0.05, rtol=0.05)
        assert bf16.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 12)
        print("bf16 ok")
        """
    )
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 ok" in result.stdout


def test_one_token_step_gives_the_gradients_of_the_float64_cell():
    def step_gradients(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = tiny_model(num_hidden_layers=2).to(dtype).train()
        ids = random_ids(2, 4)
        with torch.no_grad():
            cache = model(ids[:, :3], use_cache=True).cache
        logits = model(ids[:, 3:], cache=cache, use_cache=True).logits
        (logits.double() ** 2).mean().backward()
        return {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}

    fast, reference = step_gradients(torch.float32), step_gradients(torch.float64)
    assert set(fast) == set(reference) and any(name.endswith("weight_hh_l0") for name in fast)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_forward_with_returned_cache_equals_full_forward():
    model = tiny_model()
    ids = random_ids(2, 10)
    first = model(ids[:, :4], use_cache=True)
    second = model(ids[:, 4:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits, atol=1e-5, rtol=0)


def test_cache_holds_h_and_c_of_every_layer():
    model = tiny_model(tie_word_embeddings=True, embedding_size=6, hidden_size=10)
    cache = model(random_ids(2, 5), use_cache=True).cache
    assert len(cache.layers) == 2
    assert cache.layers[0].recurrent_states[0].shape == (2, 10)  # h of layer 0
    assert cache.layers[1].recurrent_states[1].shape == (2, 6)  # c of the last, embedding-sized layer


def test_left_and_right_padding_equal_unpadded_rows():
    model = tiny_model()
    ids = random_ids(3, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    mask[2, :1] = 0
    mask[2, 7:] = 0  # both
    out = model(ids, attention_mask=mask, use_cache=True)
    for row in range(3):
        kept = mask[row].bool()
        alone = model(ids[row : row + 1, kept], use_cache=True)
        torch.testing.assert_close(out.logits[row, kept], alone.logits[0], atol=1e-5, rtol=0)
        for layer, layer_alone in zip(out.cache.layers, alone.cache.layers):
            for slot in (0, 1):
                torch.testing.assert_close(
                    layer.recurrent_states[slot][row], layer_alone.recurrent_states[slot][0], atol=1e-5, rtol=0
                )


def test_fully_padded_row_leaves_the_state_unchanged():
    model = tiny_model()
    ids = random_ids(2, 4)
    cache = model(ids, use_cache=True).cache
    before = cache.layers[0].recurrent_states[0].clone()
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    model(random_ids(2, 4, seed=5), attention_mask=mask, cache=cache, use_cache=True)
    torch.testing.assert_close(cache.layers[0].recurrent_states[0][1], before[1])
    assert not torch.allclose(cache.layers[0].recurrent_states[0][0], before[0])


def test_layer_runs_each_padded_row_on_its_real_tokens_alone():
    layer = tiny_model().model.layers[0]
    generator = torch.Generator().manual_seed(4)
    inputs, hidden, cell = (torch.randn(*shape, generator=generator) for shape in ((4, 6, 6), (4, 10), (4, 10)))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    outputs, final_hidden, final_cell = layer(inputs, hidden, cell, PaddingLayout(mask))
    for row in range(3):
        kept = mask[row].bool()
        alone, alone_hidden, alone_cell = layer(inputs[row : row + 1, kept], hidden[row : row + 1], cell[row : row + 1])
        torch.testing.assert_close(outputs[row, kept], alone[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(final_hidden[row], alone_hidden[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(final_cell[row], alone_cell[0], atol=1e-6, rtol=0)
    assert (outputs[~mask.bool()] == 0).all()
    assert torch.equal(final_hidden[3], hidden[3]) and torch.equal(final_cell[3], cell[3])  # no real token: kept


def test_real_positions_come_from_the_mask_else_the_targets():
    hidden_states = torch.zeros(2, 3, 5)
    mask, targets = torch.tensor([[1, 1, 0], [0, 1, 1]]), torch.tensor([[4, -100, 5], [-100, -100, 6]])
    assert real_position_mask(mask, targets, hidden_states).tolist() == mask.bool().tolist()
    assert real_position_mask(None, targets, hidden_states).tolist() == [[True, False, True], [False, False, True]]
    assert real_position_mask(None, None, hidden_states).all() and real_position_mask(None, None, hidden_states).shape == (2, 3)


def test_an_empty_cache_made_without_the_config_serves():
    model = tiny_model()
    ids = random_ids(2, 7)
    cache = DynamicCache()
    first = model(ids[:, :4], cache=cache, use_cache=True)
    assert first.cache is cache and cache.get_seq_length() == 4
    second = model(ids[:, 4:], cache=cache, use_cache=True)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits, atol=1e-5, rtol=0)
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    for made in (dict(cache=DynamicCache()), dict(past_key_values=DynamicCache()),
                 dict(cache=DynamicCache(config=model.config))):
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, **made), greedy), made


def attention_cache() -> DynamicCache:
    cache = DynamicCache()
    for layer_idx in range(2):
        cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), layer_idx=layer_idx)
    return cache


def one_state_cache() -> DynamicCache:
    cache = DynamicCache(config=tiny_config())
    for layer in cache.layers:
        layer.__init__(number_of_states=1)
        layer.update_recurrent_state(torch.zeros(2, 10))
    return cache


@pytest.mark.parametrize(
    "make_cache, message",
    [
        (attention_cache, "DynamicLayer at layer 0"),
        (lambda: DynamicCache(config=tiny_config(num_hidden_layers=3)), "has 3 layers, but the model has 2"),
        (lambda: tiny_model(hidden_size=12)(random_ids(2, 3), use_cache=True).cache, "another model"),
        (lambda: tiny_model()(random_ids(3, 3), use_cache=True).cache, "batch of 3"),
        (one_state_cache, "1 state slot"),
        (lambda: ((torch.zeros(2, 10), torch.zeros(2, 10)),) * 2, "must be a transformers `Cache`"),
    ],
)
def test_a_cache_that_cannot_serve_is_refused_naming_it(make_cache, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=f"`cache`.*{message}|{message}.*`cache`"):
        model(random_ids(2, 3), cache=make_cache(), use_cache=True)
    with pytest.raises(ValueError, match="`cache`"):
        model.generate(random_ids(2, 5), cache=make_cache(), max_new_tokens=2)


def test_right_padded_training_batch_gives_the_unpadded_loss():
    model = tiny_model()
    a, b = random_ids(1, 7, seed=2), random_ids(1, 4, seed=3)
    ids = torch.cat([a, F.pad(b, (0, 3), value=0)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    labels = ids.masked_fill(mask == 0, -100)
    padded_loss = model(ids, attention_mask=mask, labels=labels).loss
    token_losses = [model(x, labels=x).loss * (x.shape[1] - 1) for x in (a, b)]
    torch.testing.assert_close(padded_loss, sum(token_losses) / (6 + 3))


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model = tiny_model()
    prompts, ids, mask = left_padded_prompts()
    width = ids.shape[1]
    for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **options)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], max_new_tokens=8, min_new_tokens=8, **options)
            assert batched[row, width:].tolist() == alone[0, len(prompt) :].tolist(), options


def test_save_and_load_in_process_gives_identical_logits(tmp_path):
    model = tiny_model(tie_word_embeddings=True, embedding_size=10)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_lstm.py", "modeling_lstm.py"} <= files
    ids = random_ids(2, 6)
    for cls in (LSTMForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, LSTMForCausalLM)
        assert loaded.lm_head.weight is loaded.model.embeddings.weight
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LSTMConfig)


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
@pytest.mark.parametrize("max_shard_size", [None, "4KB"])
def test_saved_weights_get_the_permissions_of_a_plain_new_file(tmp_path, max_shard_size):
    """safetensors writes 0600 whatever the umask (safetensors/safetensors#782): others could not load the folder."""
    previous = os.umask(0o022)
    try:
        tiny_model().save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    finally:
        os.umask(previous)
    weights = sorted(tmp_path.glob("model*.safetensors"))
    assert len(weights) == 1 if max_shard_size is None else len(weights) > 1
    assert {stat.S_IMODE(path.stat().st_mode) for path in [tmp_path / "config.json", *weights]} == {0o644}


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_saving_changes_the_permissions_of_the_weight_files_it_writes_only(tmp_path):
    """A replaced weights file keeps its mode; other files of the name, links (and what they point to) are left
    alone, and a process that does not save changes nothing."""
    outside = tmp_path / "secret.txt"
    outside.write_text("mine")
    outside.chmod(0o600)
    folder = tmp_path / "model [1]"  # glob characters in the path
    tiny_model().save_pretrained(folder)
    (folder / "model.safetensors").chmod(0o640)
    (folder / "model-notes.safetensors").write_text("notes")
    (folder / "model-notes.safetensors").chmod(0o600)
    (folder / "model-link.safetensors").symlink_to(outside)
    (folder / "model-broken.safetensors").symlink_to(tmp_path / "missing")
    tiny_model(seed=1).save_pretrained(folder)
    mode = lambda name: stat.S_IMODE((folder / name).lstat().st_mode)  # noqa: E731
    assert mode("model.safetensors") == 0o640 and mode("model-notes.safetensors") == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600 and (folder / "model-broken.safetensors").is_symlink()
    (folder / "model.safetensors").chmod(0o600)
    tiny_model().save_pretrained(folder, is_main_process=False)
    assert mode("model.safetensors") == 0o600


def test_load_in_bfloat16(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    ids = random_ids(2, 6)
    logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, model.to(torch.bfloat16)(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(logits.float(), model.float()(ids).logits, atol=0.05, rtol=0.05)


def test_remote_code_loads_where_lm_lstm_cannot_be_imported(tmp_path):
    model = tiny_model(tie_word_embeddings=True, embedding_size=10)
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(2, 6)
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["lm_lstm"] = None  # any `import lm_lstm` now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=0, rtol=0)
        out = model.generate(expected["ids"], max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 9)
        print("remote ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_loss_equals_hand_computed_shifted_cross_entropy():
    model = tiny_model()
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 40)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = -logits[keep].log_softmax(-1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_loss_honours_num_items_in_batch():
    model = tiny_model()
    ids = random_ids(2, 6)
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(100)).loss
    mean = model(ids, labels=ids).loss
    torch.testing.assert_close(summed, mean * 10 / 100)


def test_shift_labels_give_the_unshifted_targets():
    model = tiny_model()
    ids, targets = random_ids(2, 6), random_ids(2, 6, seed=2)
    targets[1, 4] = -100
    out = model(ids, shift_labels=targets)
    keep = targets != -100
    expected = -out.logits[keep].log_softmax(-1).gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_activation_penalties_add_ar_and_tar_over_real_positions_in_training_only():
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    plain = tiny_model(seed=3).train()
    penalised = tiny_model(seed=3, activation_regularization=2.0, temporal_activation_regularization=0.5).train()
    out = penalised(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    base = plain(ids, attention_mask=mask, labels=ids).loss
    top = out.hidden_states[-1]  # no dropout: the dropped-out output is the raw one
    real, pairs = mask.bool(), (mask[:, 1:] & mask[:, :-1]).bool()
    ar = top.pow(2).mean(-1)[real]
    tar = (top[:, 1:] - top[:, :-1]).pow(2).mean(-1)[pairs]
    torch.testing.assert_close(out.loss, base + 2.0 * ar.mean() + 0.5 * tar.mean())
    # Normalised like the loss under gradient accumulation: sums over `num_items_in_batch`.
    items = torch.tensor(50)
    summed = penalised(ids, attention_mask=mask, labels=ids, num_items_in_batch=items).loss
    expected = plain(ids, attention_mask=mask, labels=ids, num_items_in_batch=items).loss
    torch.testing.assert_close(summed, expected + (2.0 * ar.sum() + 0.5 * tar.sum()) / 50)
    # Without a mask, the positions with a target (`shift_labels`) are the real ones.
    targets = ids.masked_fill(mask == 0, -100)
    unmasked = penalised(ids, shift_labels=targets, output_hidden_states=True)
    top = unmasked.hidden_states[-1]
    ar, tar = top.pow(2).mean(-1)[real].mean(), (top[:, 1:] - top[:, :-1]).pow(2).mean(-1)[pairs].mean()
    torch.testing.assert_close(unmasked.loss, plain(ids, shift_labels=targets).loss + 2.0 * ar + 0.5 * tar)
    torch.testing.assert_close(penalised.eval()(ids, labels=ids).loss, plain.eval()(ids, labels=ids).loss)


def test_every_parameter_gets_a_gradient():
    model = tiny_model(tie_word_embeddings=True, embedding_size=10, **{k: 0.3 for k in NO_DROPOUT}).train()
    ids = random_ids(4, 8)
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gradcheck_on_float64_micro_model():
    model = tiny_model(vocab_size=7, embedding_size=3, hidden_size=4).double()
    ids = random_ids(2, 4, vocab_size=7)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: model(inputs_embeds=x).logits, (embeds,))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 6)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("dropout", list(NO_DROPOUT))
def test_each_dropout_is_off_in_eval_and_on_in_train(dropout):
    model = tiny_model(**{dropout: 0.5})
    ids = random_ids(4, 8)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dropout", ["input_dropout", "hidden_dropout", "output_dropout"])
def test_a_locked_dropout_put_in_training_mode_drops_in_an_evaluated_model(dropout):
    """Monte Carlo dropout: `model.eval()`, then `.train()` on the dropout modules alone."""
    model = tiny_model(**{dropout: 0.5})
    getattr(model.model, dropout).train()
    ids = random_ids(4, 8)
    torch.manual_seed(0)
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_locked_dropout_uses_one_mask_across_time():
    model = tiny_model(input_dropout=0.5).train()
    embeds = torch.ones(3, 12, 6)
    captured = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    model(inputs_embeds=embeds)
    dropped = captured["x"]
    assert (dropped == 0).any() and (dropped == 2).any()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # the same mask at every step
    assert not torch.equal(dropped[0], dropped[1])  # a different mask per sequence


def test_embedding_dropout_drops_whole_word_types():
    model = tiny_model(embedding_dropout=0.5).train()
    ids = torch.tensor([[5, 6, 5, 6, 5, 6, 7, 7]] * 4)
    embeds = model.model.embed(ids)
    zero = (embeds == 0).all(-1)
    for token in (5, 6, 7):
        assert zero[ids == token].all() or not zero[ids == token].any()


def test_weight_dropout_changes_recurrent_weights_only_in_training():
    model = tiny_model(weight_dropout=0.5)
    layer = model.model.layers[0]
    stored = {name: p.detach().clone() for name, p in layer.rnn.named_parameters()}
    x = torch.randn(2, 5, 6)
    layer.eval()
    eval_out = layer(x)[0]
    torch.testing.assert_close(eval_out, layer.rnn(x)[0], atol=0, rtol=0)
    layer.train()
    train_out = layer(x)[0]
    assert not torch.allclose(train_out, eval_out)
    # dropping only the hidden-to-hidden matrix: the first step (zero state) is unaffected
    torch.testing.assert_close(train_out[:, 0], eval_out[:, 0])
    for name, parameter in layer.rnn.named_parameters():
        torch.testing.assert_close(parameter, stored[name], atol=0, rtol=0)  # stored weights untouched


@pytest.mark.parametrize(
    "arguments",
    [dict(vocab_size=0), dict(hidden_size=-1), dict(num_hidden_layers=0), dict(embedding_size=1.5),
     dict(input_dropout=1.0), dict(weight_dropout=-0.1), dict(output_dropout=2),
     dict(num_hidden_layers=1, tie_word_embeddings=True, hidden_size=8, embedding_size=6),
     dict(eos_token_id=40), dict(initializer_range=0), dict(activation_regularization=-1.0),
     dict(temporal_activation_regularization="1"), dict(input_dropout=True), dict(hidden_dropout="0.1"),
     dict(initializer_range=True), dict(use_cache="yes"), dict(tie_word_embeddings=1), dict(pad_token_id=True)],
)
def test_invalid_config_values_raise_naming_the_argument(arguments):
    name = next(iter(arguments)) if len(arguments) == 1 else "tie_word_embeddings"
    with pytest.raises(ValueError, match=name):
        tiny_config(**arguments)


def test_config_fields_accept_integer_floats_and_store_floats():
    config = tiny_config(input_dropout=0, weight_dropout=0, activation_regularization=2, initializer_range=1)
    for name in ("input_dropout", "weight_dropout", "activation_regularization", "initializer_range"):
        assert type(getattr(config, name)) is float, name
    assert (config.activation_regularization, config.initializer_range) == (2.0, 1.0)
    assert LSTMConfig.default_config_fields()["input_dropout"] == 0.65  # dataclass fields with their defaults
    config.update_from_string("input_dropout=0.25")
    assert config.input_dropout == 0.25


def test_config_checks_run_again_at_save(tmp_path):
    config = tiny_config()
    config.hidden_dropout = 1.5
    with pytest.raises(ValueError, match="hidden_dropout"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_config_json_of_an_earlier_version_loads(tmp_path):
    """As the custom-`__init__` config wrote it (a Trainer run: `use_cache` false, `torch_dtype`)."""
    earlier = {
        "activation_regularization": 2.0, "architectures": ["LSTMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_lstm.LSTMConfig", "AutoModelForCausalLM": "modeling_lstm.LSTMForCausalLM"},
        "bos_token_id": 1, "embedding_dropout": 0.0, "embedding_size": 6, "eos_token_id": 2, "hidden_dropout": 0.1,
        "hidden_size": 10, "initializer_range": 0.1, "input_dropout": 0.0, "model_type": "lstm", "num_hidden_layers": 3,
        "output_dropout": 0.2, "pad_token_id": 0, "temporal_activation_regularization": 0.0,
        "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "5.24.0", "use_cache": False,
        "vocab_size": 40, "weight_dropout": 0.1,
    }
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    for config in (LSTMConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(config, LSTMConfig)
        assert (config.num_hidden_layers, config.hidden_dropout, config.use_cache) == (3, 0.1, False)
        assert config.layer_sizes == [(6, 10), (10, 10), (10, 6)] and config.dtype == torch.float32
    assert LSTMForCausalLM(config).eval()(random_ids(1, 4)).logits.shape == (1, 4, 40)


def test_saved_config_says_use_cache_as_the_generation_config_does(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "saved")
    arguments = LSTMTrainingArguments(output_dir=str(tmp_path / "trained"), report_to="none", bf16=False,
                                      eval_strategy="no", eval_on_start=False, load_best_model_at_end=False)
    LSTMTrainer(model=tiny_model(), args=arguments).save_model()  # Trainer copies its `use_cache` into the config
    for folder in (tmp_path / "saved", tmp_path / "trained"):
        config = json.loads((folder / "config.json").read_text())
        generation_config = json.loads((folder / "generation_config.json").read_text())
        assert config["use_cache"] is True and generation_config["use_cache"] is True, folder.name


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.tensor([[3, 40]])), "input_ids"),
        (lambda m: m(torch.tensor([[3, -1]])), "input_ids"),
        (lambda m: m(torch.tensor([[3, 4]]), labels=torch.tensor([[3, 41]])), "labels"),
        (lambda m: m(torch.tensor([[3, 4]]), attention_mask=torch.ones(1, 3)), "attention_mask"),
        (lambda m: m(torch.tensor([[3, 4, 5]]), attention_mask=torch.tensor([[1, 0, 1]])), "padding between"),
        (lambda m: m(torch.tensor([[3, 4]]), attention_mask=torch.tensor([[1, 2]])), "attention_mask"),
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "at least one time step"),
        (lambda m: m(), "exactly one"),
        (lambda m: m(torch.tensor([[3]]), cache=m(torch.tensor([[3], [4]]), use_cache=True).cache), "batch"),
        (lambda m: m.generate(torch.tensor([[3, 4]]), max_new_tokens=2, penalty_alpha=0.5, top_k=3), "only supports"),
        (lambda m: m.generate(torch.tensor([[3, 4]]), max_new_tokens=2, penalty_alpha=0.5, top_k=3,
                              trust_remote_code=True), "only supports"),
        (lambda m: m.generate(torch.tensor([[3, 4]]), max_new_tokens=2, num_beams=4, num_beam_groups=2,
                              diversity_penalty=1.0), "only supports"),
        (lambda m: m.generate(torch.tensor([[3, 4]]), max_new_tokens=2, prompt_lookup_num_tokens=2), "only supports"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model())


def test_embedding_accessors_and_resize_keep_the_tie():
    model = tiny_model(tie_word_embeddings=True, embedding_size=10)
    assert model.get_input_embeddings() is model.model.embeddings
    assert model.get_output_embeddings() is model.lm_head
    model.resize_token_embeddings(48)
    assert model.config.vocab_size == 48
    assert model.lm_head.weight is model.model.embeddings.weight
    assert model.lm_head.weight.shape == (48, 10) and model.lm_head.bias.shape == (48,)
    assert model(torch.tensor([[47, 3]])).logits.shape == (1, 2, 48)


def test_headless_model_and_auto_classes():
    config = tiny_config()
    assert isinstance(AutoModel.from_config(config), LSTMModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), LSTMForCausalLM)
    out = LSTMModel(config)(random_ids(2, 5), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 5, 10)
    assert len(out.hidden_states) == 3  # embeddings and each layer


@pytest.mark.parametrize("use_cache", [False, True])
def test_config_output_hidden_states_is_the_default_of_both_models(use_cache):
    """As in transformers' models: `config.output_hidden_states` applies where the call does not say."""
    model = tiny_model(output_hidden_states=True).eval()
    ids = random_ids(2, 5)
    out = model(ids, use_cache=use_cache)
    inner = model.model(ids, use_cache=use_cache)
    assert len(out.hidden_states) == len(inner.hidden_states) == 3  # embeddings and each layer
    torch.testing.assert_close(out.hidden_states[-1], inner.last_hidden_state)
    assert (out.cache is not None) == use_cache
    assert model(ids, output_hidden_states=False).hidden_states is None
    assert len(model(ids, use_cache=use_cache, return_dict=False)) == 2 + use_cache  # logits, [cache], hidden states


def test_logits_to_keep_and_tuple_outputs():
    model = tiny_model()
    ids = random_ids(2, 6)
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
    loss, logits, cache = model(ids, labels=ids, use_cache=True, return_dict=False)
    torch.testing.assert_close(logits, full)
