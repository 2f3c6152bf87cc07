"""torch.export, torch.compile(fullgraph=True) and ONNX graphs with explicit state, and generation with onnxruntime."""

import json
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model
from transformers import AutoTokenizer, DynamicCache

from lm_lstm import LSTMForCausalLM
from lm_lstm.cli import main
from lm_lstm.export import ExplicitStateLM, export_onnx, export_programs, max_logit_difference, plain_float_copy
from lm_lstm.onnx_generation import OnnxLM
from lm_lstm.training import configure_generation


def padded_batch(batch_size: int, length: int, vocab_size: int, seed: int = 0):
    """Token ids with a left-padded first row and a right-padded last row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : length // 3] = 0
    attention_mask[-1, length - 2 :] = 0
    return input_ids, attention_mask


def random_states(model, batch_size: int) -> list[torch.Tensor]:
    return [torch.randn(batch_size, hidden) for _, hidden in model.config.layer_sizes for _ in range(2)]


def cache_holding(model, states: list[torch.Tensor]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for layer_idx in range(model.config.num_hidden_layers):
        cache.update_recurrent_state(states[2 * layer_idx].clone(), layer_idx, state_idx=0)
        cache.update_recurrent_state(states[2 * layer_idx + 1].clone(), layer_idx, state_idx=1)
    return cache


def cache_states(cache) -> list[torch.Tensor]:
    return [layer.recurrent_states[slot] for layer in cache.layers for slot in (0, 1)]


def forward_export_inputs() -> tuple[dict, dict]:
    """Keyword inputs of `model.forward` for exporting it, and their dynamic shapes: any batch and length."""
    input_ids, attention_mask = padded_batch(2, 5, 40)
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    return kwargs, {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "use_cache": None}


@torch.no_grad()
def test_exported_forward_takes_any_batch_and_length_with_padding():
    model = tiny_model()
    kwargs, dynamic_shapes = forward_export_inputs()
    program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes)
    for shape in [(3, 11), (1, 2), (4, 30)]:
        input_ids, attention_mask = padded_batch(*shape, 40, seed=shape[1])
        if shape[0] == 1:
            attention_mask[:] = 1
        got = program.module()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        want = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dynamo_onnx_export_of_the_forward_pass_runs_in_onnxruntime():
    model = tiny_model()
    kwargs, dynamic_shapes = forward_export_inputs()
    program = torch.onnx.export(model, (), kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    input_ids, attention_mask = padded_batch(3, 12, 40, seed=1)
    (logits,) = program(input_ids=input_ids, attention_mask=attention_mask)  # onnxruntime
    want = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_exported_prefill_and_decode_programs_compute_what_the_model_computes():
    model = tiny_model()
    programs = export_programs(model)
    input_ids, attention_mask = padded_batch(3, 9, 40)
    states = random_states(model, 3)
    logits, *new_states = programs["prefill"].module()(input_ids, attention_mask, *states)
    cache = cache_holding(model, states)
    want = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
    last_real = [8, 8, 6]  # the right-padded last row ends two positions early
    torch.testing.assert_close(logits, want[torch.arange(3), last_real], atol=1e-5, rtol=1e-5)
    for got, expected in zip(new_states, cache_states(cache)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    next_ids = torch.tensor([[4], [5], [6]])
    logits, *next_states = programs["decode"].module()(next_ids, None, *new_states)
    want = model(next_ids, cache=cache, use_cache=True).logits[:, 0]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(next_states, cache_states(cache)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="evaluation mode"):
        export_programs(model.train())


@torch.no_grad()
def test_compiled_fullgraph_forward_and_decode_step_equal_eager():
    model = tiny_model()
    input_ids, attention_mask = padded_batch(3, 7, 40)
    torch._dynamo.reset()
    try:
        # Dynamo refuses to look inside any nn.LSTM module unless allowed, even to read its weights (README).
        with torch._dynamo.config.patch(allow_rnn=True):
            # aot_eager: graph breaks are dynamo's business, and inductor is covered by the training test below
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            got = compiled(input_ids, attention_mask=attention_mask, use_cache=False).logits
            torch.testing.assert_close(got, model(input_ids, attention_mask=attention_mask, use_cache=False).logits)

            eager_cache, compiled_cache = DynamicCache(), DynamicCache()
            model(input_ids, attention_mask=attention_mask, cache=eager_cache)
            model(input_ids, attention_mask=attention_mask, cache=compiled_cache)
            next_ids = torch.tensor([[4], [5], [6]])
            got = compiled(next_ids, cache=compiled_cache, use_cache=True).logits
            torch.testing.assert_close(got, model(next_ids, cache=eager_cache, use_cache=True).logits)
            for got, want in zip(cache_states(compiled_cache), cache_states(eager_cache)):
                torch.testing.assert_close(got, want)
            assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 8
    finally:
        torch._dynamo.reset()
    # Eager checks are unchanged after tracing.
    with pytest.raises(ValueError, match=r"`input_ids` must be in \[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="only 0 \\(padding\\) and 1"):
        model(input_ids, attention_mask=attention_mask * 2)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, char_tokenizer):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(char_tokenizer), embedding_size=16, hidden_size=24, tie_word_embeddings=True)
    configure_generation(model, char_tokenizer)
    folder = tmp_path_factory.mktemp("export") / "model"
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def onnx_folder(saved_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "onnx"
    assert main(["export", str(saved_model), "--output_dir", str(folder)]) == 0
    return folder


def test_export_command_writes_graphs_config_and_tokenizer(onnx_folder, saved_model, capsys, tmp_path):
    model = LSTMForCausalLM.from_pretrained(saved_model)
    assert max_logit_difference(model, onnx_folder) < 1e-5
    assert main(["export", str(saved_model), "--output_dir", str(tmp_path / "int8"), "--int8"]) == 0
    int8_difference = float(capsys.readouterr().out.split("one decode step): ")[1])
    assert 1e-5 < int8_difference < 0.05  # quantised, close
    assert json.loads((tmp_path / "int8" / "onnx_config.json").read_text())["weights"].startswith("int8")
    int8_ops = {node.op_type for node in onnx.load(tmp_path / "int8" / "decode.onnx").graph.node}
    assert "MatMulInteger" in int8_ops
    config = json.loads((onnx_folder / "onnx_config.json").read_text())
    assert config["weights"] == "float32"
    assert config["graphs"]["prefill"]["inputs"] == ["input_ids", "attention_mask", "hidden.0", "cell.0", "hidden.1",
                                                     "cell.1"]
    assert config["state_sizes"] == [24, 24, 16, 16]  # tied: the last layer has the embedding size
    decode_ops = {node.op_type for node in onnx.load(onnx_folder / "decode.onnx").graph.node}
    prefill_ops = {node.op_type for node in onnx.load(onnx_folder / "prefill.onnx").graph.node}
    assert "Scan" in prefill_ops and not decode_ops & {"Scan", "Loop"}  # one token needs no loop
    tokenizer = AutoTokenizer.from_pretrained(onnx_folder)
    assert tokenizer("ROMEO:")["input_ids"] == AutoTokenizer.from_pretrained(saved_model)("ROMEO:")["input_ids"]


@torch.no_grad()
def test_onnxruntime_greedy_generation_equals_generate(onnx_folder, saved_model):
    model = LSTMForCausalLM.from_pretrained(saved_model).eval()
    onnx_lm = OnnxLM(onnx_folder)
    input_ids, attention_mask = padded_batch(3, 10, model.config.vocab_size)
    attention_mask[-1] = 1  # generation pads on the left only
    # The left-padded row begins with the document-start token, so it is read from zeros; the others after it.
    input_ids[0, int(attention_mask[0].argmax())] = model.config.eos_token_id
    for rows in (slice(0, 1), slice(1, 2), slice(0, 3)):
        want = model.generate(input_ids[rows], attention_mask=attention_mask[rows], max_new_tokens=40, do_sample=False)
        got = onnx_lm.generate(input_ids[rows].numpy(), attention_mask[rows].numpy(), max_new_tokens=40)
        np.testing.assert_array_equal(got, want.numpy())
    # Its greedy tokens barely depend on the state, so the logits of the first step are compared too.
    first = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                           output_logits=True, return_dict_in_generate=True).logits[0]
    ids, mask = input_ids.numpy(), attention_mask.numpy()
    got, _ = onnx_lm.run("prefill", onnx_lm.start_states(ids, mask), input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(got, first.numpy(), atol=1e-5)
    from_zeros, _ = onnx_lm.run("prefill", onnx_lm.initial_states(3), input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(from_zeros[0], got[0], atol=1e-5)  # the row that begins with the start token
    assert np.abs(from_zeros[1:] - got[1:]).max(axis=1).min() > 1e-4  # every other row differs


@torch.no_grad()
def test_onnxruntime_generation_ends_rows_as_generate_does(onnx_folder, saved_model, tmp_path):
    model = LSTMForCausalLM.from_pretrained(saved_model).eval()
    input_ids, attention_mask = padded_batch(3, 10, model.config.vocab_size, seed=1)
    attention_mask[-1] = 1
    free = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    eos = int(free[1, 12])  # a token row 1 generates third: as end of sequence, rows end at different steps
    folder = tmp_path / "onnx"
    shutil.copytree(onnx_folder, folder)
    config = json.loads((folder / "onnx_config.json").read_text())
    (folder / "onnx_config.json").write_text(json.dumps(dict(config, eos_token_id=eos)))
    want = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                          eos_token_id=eos)
    got = OnnxLM(folder).generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=12)
    np.testing.assert_array_equal(got, want.numpy())
    assert got.shape[1] < free.shape[1] or (got[:, 10:] == config["pad_token_id"]).any()


def test_onnxruntime_sampling(onnx_folder):
    onnx_lm = OnnxLM(onnx_folder)
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    first = onnx_lm.generate(prompt, max_new_tokens=30, do_sample=True, top_p=0.9, temperature=0.8, seed=3)
    assert first.shape == (2, 33) and (first >= 0).all() and (first < onnx_lm.config["vocab_size"]).all()
    np.testing.assert_array_equal(
        first, onnx_lm.generate(prompt, max_new_tokens=30, do_sample=True, top_p=0.9, temperature=0.8, seed=3)
    )
    assert not np.array_equal(first, onnx_lm.generate(prompt, max_new_tokens=30, do_sample=True, seed=4))
    np.testing.assert_array_equal(  # top_k=1 leaves only the most likely token
        onnx_lm.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, seed=5),
        onnx_lm.generate(prompt, max_new_tokens=10),
    )


def test_onnxruntime_generation_memory_is_flat_in_length(onnx_folder):
    onnx_lm = OnnxLM(onnx_folder)
    onnx_lm.config["eos_token_id"] = None  # generate every token asked for
    prompt = np.array([[5, 6, 7]])
    peaks = {}
    for length in (256, 4096):
        tracemalloc.start()
        assert onnx_lm.generate(prompt, max_new_tokens=length).shape == (1, 3 + length)
        peaks[length] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Only the generated ids grow (8 bytes each, twice at the end); keeping logits (65 floats) or states per token
    # would not fit.
    assert (peaks[4096] - peaks[256]) / (4096 - 256) < 40


def test_export_refuses_what_it_cannot_export(saved_model, onnx_folder, tmp_path, capsys):
    assert main(["export", str(saved_model), "--output_dir", str(onnx_folder)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(OSError, match="no onnx_config.json"):
        OnnxLM(tmp_path)
    with pytest.raises(ValueError, match="Only lm-lstm models"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "linear")


@torch.no_grad()
def test_explicit_state_wrapper_starts_from_zeros_as_the_model_does():
    model = tiny_model()
    input_ids, attention_mask = padded_batch(2, 6, 40)
    zeros = [torch.zeros_like(state) for state in random_states(model, 2)]
    logits, *states = ExplicitStateLM(model)(input_ids, attention_mask, *zeros)
    cache = DynamicCache()
    want = model(input_ids, attention_mask=attention_mask, cache=cache).logits
    torch.testing.assert_close(logits, want[torch.arange(2), [5, 3]])
    for got, expected in zip(states, cache_states(cache)):
        torch.testing.assert_close(got, expected)


def test_onnx_generation_runs_without_torch_or_transformers(onnx_folder):
    """The file alone, imported where torch and transformers cannot be, generates the tokens it generates here."""
    import lm_lstm.onnx_generation

    script = (
        "import sys, importlib.util\n"
        "sys.modules.update(torch=None, transformers=None, lm_lstm=None)\n"
        f"spec = importlib.util.spec_from_file_location('onnx_generation', {lm_lstm.onnx_generation.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print(module.OnnxLM({str(onnx_folder)!r}).generate([[5, 6, 7]], max_new_tokens=12).tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    want = OnnxLM(onnx_folder).generate(np.array([[5, 6, 7]]), max_new_tokens=12).tolist()
    assert json.loads(result.stdout) == want


def test_compiled_training_step_gives_the_eager_gradients():
    """`torch.compile` as `Trainer(torch_compile=True)` uses it: default settings, graph breaks allowed."""
    model = tiny_model(weight_dropout=0.0).train()
    input_ids, attention_mask = padded_batch(3, 7, 40)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    gradients = []
    torch._dynamo.reset()
    try:
        for forward in (model, torch.compile(model)):
            model.zero_grad()
            forward(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
            gradients.append([parameter.grad.clone() for parameter in model.parameters()])
    finally:
        torch._dynamo.reset()
    for eager, compiled in zip(*gradients):
        torch.testing.assert_close(compiled, eager)


def test_onnxruntime_generation_checks_what_generate_checks(onnx_folder, tmp_path):
    onnx_lm = OnnxLM(onnx_folder)
    vocab_size = onnx_lm.config["vocab_size"]
    prompt = np.array([[5, 6, 7]])
    refused = [
        (dict(input_ids=np.array([[5, -1]])), r"must be in \[0, "),
        (dict(input_ids=np.array([[5, vocab_size]])), r"must be in \[0, "),
        (dict(input_ids=np.array([[5.7, 6.2]])), "must be integers"),
        (dict(input_ids=np.array([5, 6])), "must be integers of shape"),
        (dict(input_ids=np.zeros((1, 0), np.int64)), "length >= 1"),
        (dict(input_ids=prompt, attention_mask=np.array([[1, 0, 1]])), "on the left only"),
        (dict(input_ids=prompt, attention_mask=np.array([[1, 1, 2]])), "0 and 1"),
        (dict(input_ids=prompt, max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=prompt, max_new_tokens=2.5), "max_new_tokens"),
        (dict(input_ids=prompt, do_sample=True, temperature=0), "temperature"),
        (dict(input_ids=prompt, do_sample=True, top_p=0), "top_p"),
        (dict(input_ids=prompt, do_sample=True, top_k=-3), "top_k"),
    ]
    for arguments, message in refused:
        with pytest.raises(ValueError, match=message):
            onnx_lm.generate(**arguments)
    assert onnx_lm.generate(prompt, max_new_tokens=0).tolist() == prompt.tolist()
    for broken in ("{", "{}", '{"graphs": {"prefill": {"file": "missing.onnx"}}, "state_sizes": [], "vocab_size": 3}'):
        (tmp_path / "onnx_config.json").write_text(broken)
        with pytest.raises(OSError, match="onnx_config.json|not all there"):
            OnnxLM(tmp_path)


def test_export_checks_its_options_before_exporting(saved_model, tmp_path, capsys):
    for opset in ("17", "99"):
        assert main(["export", str(saved_model), "--output_dir", str(tmp_path / "out"), "--opset", opset]) == 2
        assert "`opset` must be from 18" in capsys.readouterr().err
    (tmp_path / "afile").write_text("keep me")
    assert main(["export", str(saved_model), "--output_dir", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    model = LSTMForCausalLM.from_pretrained(saved_model).to(torch.bfloat16).train()
    exported = plain_float_copy(model)  # what `export_onnx` exports
    assert exported.dtype == torch.float32 and not exported.training
    assert model.dtype == torch.bfloat16 and model.training  # the caller's model is left as it was
