"""Quantised inference through the ecosystem's quantisers, the output layer included: transformers' `TorchAoConfig`
and `QuantoConfig`, and torch.ao's dynamic int8 quantisation of the LSTM and output layers."""

import copy

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, QuantoConfig, TorchAoConfig

pytest.importorskip("optimum.quanto")
torchao_quantization = pytest.importorskip("torchao.quantization")


def torchao(quant_type):
    return lambda folder: AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=TorchAoConfig(quant_type, modules_to_not_convert=[])  # [] : lm_head too
    )


def quanto(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=QuantoConfig(weights="int8", modules_to_not_convert=[])
    )


def torch_dynamic(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)


# name: (load quantised from a folder, quantises activations too, save_pretrained + from_pretrained round-trips)
QUANTISERS = {
    "torchao int8 weights": (torchao(torchao_quantization.Int8WeightOnlyConfig()), False, True),
    "torchao int8 dynamic": (torchao(torchao_quantization.Int8DynamicActivationInt8WeightConfig()), True, True),
    "quanto int8 weights": (quanto, False, False),
    "torch.ao dynamic int8": (torch_dynamic, True, False),
}


def output_layer_is_quantised(model) -> bool:
    head = model.lm_head
    return type(head) is not nn.Linear or type(head.weight) is not nn.Parameter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved untied model: the default config ties the output layer to the embeddings (see the tied test)."""
    path = tmp_path_factory.mktemp("fp32")
    tiny_model(initializer_range=1.0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", QUANTISERS)
def test_quantised_model_generates_like_its_full_forward_pass_and_near_fp32(name, folder, fp32):
    load, quantises_activations, _ = QUANTISERS[name]
    model = load(folder).eval()
    assert output_layer_is_quantised(model)
    ids = torch.randint(3, 40, (2, 5))
    ids[:, 0] = model.config.eos_token_id  # a prompt that starts a document is read from zeros, as `model(...)` reads
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        step_logits = torch.stack(out.logits, dim=1)
        full = model(out.sequences).logits
        reference = fp32(out.sequences).logits
    scale = reference.abs().max()
    # One-token steps (`generate`) against the whole sequence at once: the same arithmetic with weights alone
    # quantised; activation scales computed per call differ between the two.
    tolerance = 0.02 * scale if quantises_activations else 1e-6
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 : -1], atol=tolerance, rtol=0)
    if not quantises_activations:
        assert torch.equal(out.sequences[:, ids.shape[1]:], full[:, ids.shape[1] - 1 : -1].argmax(-1))
    error = (full - reference).abs().max() / scale
    assert 0 < error < 0.03, error  # int8 moves the logits, a little


@pytest.mark.parametrize("name", [name for name, (_, _, saves) in QUANTISERS.items() if saves])
def test_torchao_quantised_model_saves_and_reloads(name, folder, tmp_path):
    model = QUANTISERS[name][0](folder).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.lm_head.weight) is type(model.lm_head.weight) is not nn.Parameter
    ids = torch.randint(3, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                           model.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("name, error", [
    ("quanto int8 weights", ValueError),  # transformers: "not serializable"
    ("torch.ao dynamic int8", AttributeError),  # its packed LSTM weights have no `device`
])
def test_quanto_and_torch_dynamic_models_cannot_be_saved(name, error, folder, tmp_path):
    """What the README says of them in the installed versions: quantise after loading instead."""
    with pytest.raises(error):
        QUANTISERS[name][0](folder).save_pretrained(tmp_path)


def test_tied_output_layer_torchao_keeps_fp32_torch_dynamic_quantises_a_copy(tmp_path):
    """A tied checkpoint holds the shared matrix once, as the embeddings: `TorchAoConfig` quantises the `nn.Linear`
    weights it loads, so none here; `quantize_dynamic` replaces the output layer with an int8 copy."""
    model = tiny_model(tie_word_embeddings=True, embedding_size=10, initializer_range=1.0)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 40, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
        loaded = QUANTISERS["torchao int8 weights"][0](tmp_path).eval()
        assert not output_layer_is_quantised(loaded)
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        assert output_layer_is_quantised(dynamic) and type(dynamic.model.embeddings.weight) is nn.Parameter
        assert 0 < (dynamic(ids).logits - expected).abs().max() < 0.03 * expected.abs().max()
