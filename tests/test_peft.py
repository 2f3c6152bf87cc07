"""LoRA with PEFT on every weight kind: the embeddings, the output layer and the recurrent matrices."""

import pytest
import torch
import torch.nn.functional as F
from conftest import NO_DROPOUT, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.dynamic_module_utils import get_class_from_dynamic_module

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

RECURRENT = ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
TARGETS = {
    "embeddings": dict(target_modules=["embeddings"]),
    "output layer": dict(target_modules=["lm_head"]),
    # `nn.LSTM` is not a module PEFT adapts; its matrices are parameters it can target.
    "recurrent": dict(target_modules=[], target_parameters=RECURRENT),
}


def lora(model, target: str, **overrides):
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **TARGETS[target], **overrides))


def training_data(count: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def train_with_trainer(model, output_dir) -> list[float]:
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False, use_cpu=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=training_data())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def load_remote_code_base(folder):
    """The base model from its folder through the code saved beside it, as `trust_remote_code=True` loads it where
    `lm_lstm` is not installed (here `lm_lstm` registered its classes with the Auto classes, which would take them)."""
    model_class = get_class_from_dynamic_module("modeling_lstm.LSTMForCausalLM", folder)
    model = model_class.from_pretrained(folder).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return model


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_model(weight_dropout=0.5, input_dropout=0.2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("target", TARGETS)
def test_lora_trains_with_weight_drop_round_trips_and_merges(target, base_folder, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    assert base.config.weight_dropout == 0.5
    frozen = {name: weight.clone() for name, weight in base.state_dict().items()}
    model = lora(base, target)
    losses = train_with_trainer(model, tmp_path / "run")
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    model.eval()
    # Only the adapter moved; its B matrices start at zero, so a change shows that gradients reached them.
    base_weights = {name.replace("base_layer.", ""): weight for name, weight in base.state_dict().items()
                    if "lora_" not in name}
    assert base_weights.keys() == frozen.keys()
    assert all(torch.equal(weight, frozen[name]) for name, weight in base_weights.items())
    assert all(weight.abs().sum() > 0 for name, weight in model.named_parameters() if "lora_B" in name)

    ids = torch.randint(3, 40, (2, 7))
    # As the reloaded adapter is: `F.linear` on a 3-D input rounds differently (1e-8) whether its weight requires grad.
    model.requires_grad_(False)
    with torch.no_grad():
        adapted = model(ids).logits
        model.save_pretrained(tmp_path / "adapter")
        fresh = load_remote_code_base(base_folder)
        assert (fresh(ids).logits - adapted).abs().max() > 1e-3  # the adapter changes the model
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)
        generated = reloaded.generate(ids, max_new_tokens=5, do_sample=False)

        merged = reloaded.merge_and_unload()
        assert type(merged.lm_head) is nn.Linear and all(type(layer.rnn) is nn.LSTM for layer in merged.model.layers)
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.generate(ids, max_new_tokens=5, do_sample=False), generated, atol=0, rtol=0)


def test_weight_drop_under_recurrent_lora_drops_the_base_matrix_and_adds_the_update():
    """In training, a layer with LoRA on `weight_hh_l0` computes with `dropout(W) + B A`, one mask per forward pass,
    and leaves the LSTM's parameters as they were."""
    base = tiny_model(**{**NO_DROPOUT, "weight_dropout": 0.5})
    model = lora(base, "recurrent", init_lora_weights=False)  # random B: a nonzero update
    layers = base.model.layers
    lstms = [layer.rnn.get_base_layer() for layer in layers]
    parameters_before = [dict(lstm.named_parameters()) for lstm in lstms]
    ids = torch.randint(3, 40, (2, 7))

    torch.manual_seed(3)
    trained = model.train()(ids).logits
    torch.manual_seed(3)
    masks = [F.dropout(torch.ones_like(lstm.weight_hh_l0), 0.5, training=True) for lstm in lstms]

    expected = tiny_model(**NO_DROPOUT)
    with torch.no_grad():
        for layer, mask, expected_layer in zip(layers, masks, expected.model.layers):
            expected_layer.rnn.weight_hh_l0.mul_(mask)
            wrapper = layer.rnn  # one PEFT wrapper per adapted parameter, nested
            while hasattr(wrapper, "parameter_name"):
                getattr(expected_layer.rnn, wrapper.parameter_name).add_(wrapper.get_delta_weight("default"))
                wrapper = wrapper.base_layer
    torch.testing.assert_close(trained, expected(ids).logits)
    assert all(0 < (mask == 0).float().mean() < 1 for mask in masks)
    assert [dict(lstm.named_parameters()) for lstm in lstms] == parameters_before
    assert all(type(lstm) is nn.LSTM and not hasattr(lstm, "parametrizations") for lstm in lstms)


def test_lora_on_tied_embeddings_adapts_one_side_and_merging_changes_both():
    """The default config ties the embeddings and the output layer; their LoRA adapts the input lookup or the output
    layer alone, but merging writes the update into the one shared matrix, so the merged model is another model."""
    base = tiny_model(tie_word_embeddings=True, embedding_size=10)
    ids = torch.randint(3, 40, (2, 7))
    with torch.no_grad():
        plain_output_layer = base.lm_head(base.model(ids).last_hidden_state)
        model = lora(base, "embeddings", init_lora_weights=False).eval()
        adapted = model(ids).logits
        hidden = model.get_base_model().model(ids).last_hidden_state
        torch.testing.assert_close(adapted, F.linear(hidden, base.lm_head.weight, base.lm_head.bias))
        assert (adapted - plain_output_layer).abs().max() > 1e-3
        merged = model.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embeddings.weight
        assert (merged(ids).logits - adapted).abs().max() > 1e-2


def test_recurrent_lora_generates_like_its_merged_model_step_by_step():
    """An adapted LSTM runs the full-sequence kernel in one-token steps (the fast step reads the weights directly);
    generation agrees with the merged model, which takes the fast step."""
    model = lora(tiny_model(), "recurrent", init_lora_weights=False).eval()
    ids = torch.randint(3, 40, (3, 4))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged.generate(ids, max_new_tokens=8, do_sample=False), generated, atol=0, rtol=0)


def test_exporting_an_adapted_lstm_asks_for_the_merged_model():
    model = lora(tiny_model(), "recurrent").eval()
    with pytest.raises(ValueError, match="merge_and_unload"):
        torch.export.export(model, (torch.tensor([[1, 2, 3]]),), {"use_cache": False})
    merged = model.merge_and_unload()
    program = torch.export.export(merged, (torch.tensor([[1, 2, 3]]),), {"use_cache": False})
    torch.testing.assert_close(program.module()(torch.tensor([[1, 2, 3]]), use_cache=False).logits,
                               merged(torch.tensor([[1, 2, 3]]), use_cache=False).logits)
