"""The model on a CUDA GPU: the CPU's results there, training, generation, saving, and the sizing measured there.

Skipped without a GPU (CI has none); on a GPU machine: `pytest tests/test_cuda.py`. TF32 is off where results are
compared with the CPU's (cuDNN's LSTM uses it by default on Ampere and later: errors near 1e-3).
"""

import json
import math

import pytest
import torch
from conftest import NO_DROPOUT, left_padded_prompts, random_ids, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache

from lm_lstm import cli, sizing
from lm_lstm.configuration_lstm import LSTMConfig
from lm_lstm.sizing import Layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(3, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    return ids, mask


def test_forward_loss_and_state_on_the_gpu_equal_the_cpus():
    model = tiny_model(num_hidden_layers=3)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    cpu = model(ids, attention_mask=mask, labels=labels, use_cache=True)
    gpu = model.cuda()(ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda(), use_cache=True)
    assert gpu.logits.device.type == "cuda"
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, atol=1e-6, rtol=0)
    for gpu_layer, cpu_layer in zip(gpu.cache.layers, cpu.cache.layers, strict=True):
        for slot in (0, 1):  # hidden and cell states
            torch.testing.assert_close(gpu_layer.recurrent_states[slot].cpu(), cpu_layer.recurrent_states[slot],
                                       atol=1e-5, rtol=0)


def test_full_forward_equals_stepping_through_the_cache_on_the_gpu():
    model = tiny_model(num_hidden_layers=3).cuda()
    ids = random_ids(3, 9).cuda()
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [True, False])  # in eval mode, too: cuDNN's backward needs its training mode
def test_gradients_on_the_gpu_equal_the_cpus(training):
    model = tiny_model(tie_word_embeddings=True, embedding_size=10).train(training)
    ids, mask = padded_batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    model.cuda()(ids.cuda(), attention_mask=mask.cuda(), labels=ids.cuda()).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad.cpu(), expected[name], atol=1e-6, rtol=1e-4, msg=name)
    assert all(module.training == training for module in model.modules())  # the mode it had


def test_generation_on_the_gpu_equals_the_cpus():
    """Greedy and beam search over left-padded prompts, batched: the CPU's tokens."""
    model = tiny_model()
    _, ids, mask = left_padded_prompts()
    options = [dict(do_sample=False), dict(num_beams=3, do_sample=False)]
    cpu = [model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, **o) for o in options]
    model.cuda()
    for expected, option in zip(cpu, options):
        gpu = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, min_new_tokens=12, **option)
        assert gpu.tolist() == expected.tolist(), option


def test_training_steps_on_the_gpu_under_bf16_autocast_learn(shakespeare_text, char_tokenizer):
    """Every AWD-LSTM dropout on, bf16 autocast, AdamW: each parameter gets a finite gradient, and the loss on a
    batch of real text falls well below ln(vocabulary size)."""
    model = tiny_model(vocab_size=len(char_tokenizer), embedding_size=32, hidden_size=64,
                       **{name: 0.1 for name in NO_DROPOUT}).cuda().train()
    ids = torch.tensor(char_tokenizer(shakespeare_text[:4096])["input_ids"][: 8 * 64]).view(8, 64).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        if step == 0:
            for name, parameter in model.named_parameters():
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
                assert parameter.grad.abs().sum() > 0, name
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(len(char_tokenizer)) and losses[-1] < 0.6 * losses[0], losses[::10]


def test_saved_on_the_gpu_loads_onto_it_with_identical_logits(tmp_path):
    model = tiny_model(tie_word_embeddings=True, embedding_size=10).cuda()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda").eval()
    assert loaded.device.type == "cuda" and loaded.lm_head.weight is loaded.model.embeddings.weight
    ids = random_ids(2, 6).cuda()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_the_sizing_measures_on_the_gpu_it_is_given(monkeypatch):
    devices = []

    def recorded(model, *args, **options):
        devices.append(model.device.type)
        return timed(model, *args, **options)

    timed = sizing.training_step_seconds
    monkeypatch.setattr(sizing, "training_step_seconds", recorded)
    config = LSTMConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2)
    measurement = sizing.measure(config, 24, Layout(streams=4, block_size=32), bf16=True, device="cuda")
    assert devices == ["cuda"] and 0 < measurement.tokens_per_second < 1e9


def test_lm_lstm_train_runs_on_the_gpu_and_sizes_for_it(tmp_path, capsys):
    """The main job on the bundled corpus with a 30-second budget: it sizes the model by the GPU's speed, trains there
    (bf16), learns, and its card names the GPU and the sizing."""
    output = tmp_path / "model"
    code = cli.main(["train", "--output_dir", str(output), "--max_time", "30s", "--report_to", "none"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    sized = next(line for line in out.splitlines() if line.startswith("Sized for a 30 s budget"))
    state = json.loads((output / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert evals[-1] < 0.5 * evals[0], evals  # nats per character, from about ln(65) untrained
    card = (output / "README.md").read_text()
    assert torch.cuda.get_device_name(0) in card and sized in card
