"""The model as graphs with its recurrent state as explicit inputs and outputs: `torch.export` programs and ONNX files.

An LSTM's state is a few fixed-size tensors (h and c of each layer), so a deployed model needs no cache object: a
prefill graph reads a prompt and returns the state after it, and a one-token decode graph advances that state. Both
come from the model's own code traced by `torch.export` (`modeling_lstm.is_tracing`: the layers run as a scan over
time, one graph for any length), and ONNX files come from PyTorch's dynamo exporter. `onnx_generation` runs the
files with onnxruntime alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import DynamicCache

from .modeling_lstm import LSTMForCausalLM, prepare_cache, store_state
from .onnx_generation import ONNX_CONFIG_NAME, OnnxLM
from .output_dir import staged_output_dir

ONNX_OPSET = 20
GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}


def state_names(num_layers: int, suffix: str = "") -> list[str]:
    """The state's names in graph order: `hidden.0`, `cell.0`, `hidden.1`, ... (with `suffix`, e.g. `_out`)."""
    return [f"{kind}.{layer}{suffix}" for layer in range(num_layers) for kind in ("hidden", "cell")]


class ExplicitStateLM(nn.Module):
    """An `LSTMForCausalLM` as a function of tensors only, for `torch.export` and ONNX.

    `forward(input_ids, attention_mask, *states) -> (logits, *new_states)`:
    - `input_ids`: `(batch, length)` int64 token ids; `attention_mask`: `(batch, length)` 1 for real tokens and 0
      for padding (left or right), or None for no padding;
    - `states`: the hidden and cell state of each layer, `(batch, layer_hidden_size)` float each, in the order
      `state_names` gives (zeros start a sequence);
    - `logits`: `(batch, vocab_size)` at each row's last real position; the new states follow that position.

    It runs the wrapped model's own `forward` on a cache holding the given states, so it computes what the model
    computes. Inputs are not checked (a graph cannot read their values): ids must be in `[0, vocab_size)`.
    """

    def __init__(self, model: LSTMForCausalLM):
        super().__init__()
        self.lm = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *states: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = prepare_cache(DynamicCache(), self.lm.config)
        for layer_idx in range(len(cache.layers)):
            store_state(cache, layer_idx, states[2 * layer_idx], states[2 * layer_idx + 1], 0)
        hidden_states = self.lm.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True
        ).last_hidden_state
        if attention_mask is None:
            last_hidden = hidden_states[:, -1]
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last_position = (attention_mask.bool() * positions).amax(dim=1)
            last_hidden = hidden_states[torch.arange(input_ids.shape[0], device=input_ids.device), last_position]
        logits = self.lm.lm_head(last_hidden)
        new_states = [layer.recurrent_states[slot] for layer in cache.layers for slot in (0, 1)]
        return (logits, *new_states)


def example_inputs(
    model: LSTMForCausalLM, batch_size: int = 2, length: int = 3, with_mask: bool = True
) -> tuple[torch.Tensor | None, ...]:
    """Inputs of the right kinds for `ExplicitStateLM(model)`: token ids, a mask (or None) and zero states."""
    device, dtype = model.device, model.dtype
    input_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device) if with_mask else None
    states = [torch.zeros(batch_size, hidden, dtype=dtype, device=device) for _, hidden in model.config.layer_sizes
              for _ in range(2)]
    return (input_ids, attention_mask, *states)


def dynamic_shapes(model: LSTMForCausalLM, prefill: bool) -> tuple:
    """`torch.export` dynamic shapes for `example_inputs`: any batch; any length for the prefill graph, one token for
    the decode graph."""
    batch = torch.export.Dim("batch", min=1)
    tokens = {0: batch, 1: torch.export.Dim("length", min=1)} if prefill else {0: batch}
    states = tuple({0: batch} for _ in range(2 * model.config.num_hidden_layers))
    return (tokens, tokens if prefill else None, states)  # the states as one entry: `forward`'s `*states`


def export_programs(model: LSTMForCausalLM) -> dict[str, torch.export.ExportedProgram]:
    """`torch.export` programs of `ExplicitStateLM(model)`: "prefill" (ids, mask, states; any batch and length) and
    "decode" (one token per row, no mask, states; any batch). The model must be in evaluation mode."""
    if model.training:
        raise ValueError("Export a model in evaluation mode (`model.eval()`): training mode drops activations.")
    wrapper = ExplicitStateLM(model)
    return {
        "prefill": torch.export.export(wrapper, example_inputs(model), dynamic_shapes=dynamic_shapes(model, True)),
        "decode": torch.export.export(
            wrapper, example_inputs(model, length=1, with_mask=False), dynamic_shapes=dynamic_shapes(model, False)
        ),
    }


def export_onnx(
    model: LSTMForCausalLM,
    output_dir: str | Path,
    tokenizer=None,
    opset: int = ONNX_OPSET,
    int8: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes `prefill.onnx` and `decode.onnx` (see `export_programs`; float32), `onnx_config.json` (how to run them:
    input and output names, state sizes, special tokens) and, if given, the tokenizer into `output_dir`. With `int8`,
    the graphs' matrix weights are quantised to int8 by onnxruntime's dynamic quantisation (activations stay float,
    quantised on the fly). `model` itself is left as it was (a float32 copy in evaluation mode is exported).

    The graphs' inputs are `input_ids` (int64), `attention_mask` (int64, prefill only) and the states named by
    `state_names` (float32 zeros to start); their outputs are `logits` of the last real position and the states with
    an `_out` suffix. `onnx_generation.OnnxLM` runs them. Raises `ValueError` for a model other than a plain lm-lstm
    one or an `opset` outside 18 (the exporter's own) to the installed `onnx`'s latest, and `FileExistsError` for an
    `output_dir` that is a file, or a non-empty folder without `overwrite`. Nothing is written unless the whole
    export succeeds (`staged_output_dir`).
    """
    model = plain_float_copy(model)
    latest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= latest:
        raise ValueError(f"`opset` must be from 18 to {latest} (the installed onnx's latest), got {opset}.")
    num_layers = model.config.num_hidden_layers
    names = {
        "prefill": (["input_ids", "attention_mask", *state_names(num_layers)], ["logits", *state_names(num_layers, "_out")]),
        "decode": (["input_ids", *state_names(num_layers)], ["logits", *state_names(num_layers, "_out")]),
    }
    output_dir = Path(output_dir).resolve()
    with staged_output_dir(output_dir, overwrite) as staging:
        for graph, program in export_programs(model).items():
            inputs, outputs = names[graph]
            onnx_program = torch.onnx.export(
                program, input_names=inputs, output_names=outputs, opset_version=opset, dynamo=True, verbose=False
            )
            written = {entry.domain: entry.version for entry in onnx_program.model_proto.opset_import}.get("")
            if written != opset:  # the exporter reports a failed conversion and carries on with its own opset
                raise ValueError(f"The ONNX exporter could not write opset {opset} (it wrote {written}).")
            onnx_program.save(str(staging / GRAPH_FILES[graph]))
            if int8:
                quantize_int8(staging / GRAPH_FILES[graph])
        config = model.config
        description = {
            "format": "lm-lstm onnx",
            "opset": opset,
            "weights": "int8 (onnxruntime dynamic quantisation)" if int8 else "float32",
            "graphs": {graph: {"file": GRAPH_FILES[graph], "inputs": names[graph][0], "outputs": names[graph][1]}
                       for graph in GRAPH_FILES},
            "state_sizes": [hidden for _, hidden in config.layer_sizes for _ in range(2)],
            "vocab_size": config.vocab_size,
            "bos_token_id": config.bos_token_id,
            "document_start_id": config.eos_token_id,  # what prompts are read after (`LSTMForCausalLM._prefill`)
            "eos_token_id": model.generation_config.eos_token_id,
            "pad_token_id": model.generation_config.pad_token_id,
        }
        (staging / ONNX_CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output_dir


def plain_float_copy(model: LSTMForCausalLM) -> LSTMForCausalLM:
    """`model` as float32, on the CPU, in evaluation mode: itself if it is so already, else a copy. Raises
    `ValueError` for a model that is not lm-lstm's, or is quantised or adapted (export the plain model)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "lstm":
        raise ValueError(f"Only lm-lstm models export this way; this one is a {type(model).__name__}.")
    plain = (
        not getattr(model, "is_quantized", False)
        and all(type(layer.rnn) is nn.LSTM for layer in model.model.layers)
        and type(model.lm_head) is nn.Linear
        and all(type(parameter) is nn.Parameter for parameter in model.parameters())
    )
    if not plain:
        raise ValueError(
            "Export the plain model: this one is quantised or adapted (merge adapters with `merge_and_unload()`; for "
            "int8 graphs, export the float model with `--int8` / `int8=True`)."
        )
    if model.dtype == torch.float32 and model.device.type == "cpu" and not model.training:
        return model
    return copy.deepcopy(model).float().cpu().eval()


def quantize_int8(path: Path) -> None:
    """Replaces the ONNX file at `path` by its onnxruntime dynamic int8 quantisation: the weights of the graph's
    MatMul and Gemm nodes, per output channel. The prefill graph's scan keeps its recurrent weights in float32
    (onnxruntime does not quantise inside subgraphs); the decode graph is quantised whole."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_suffix(".int8.onnx")
    quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, per_channel=True)
    quantized.replace(path)


@torch.no_grad()
def max_logit_difference(model: LSTMForCausalLM, folder: str | Path, batch_size: int = 2, length: int = 16) -> float:
    """The largest difference between the model's logits and the exported graphs' (onnxruntime), over the last
    position of a random left-padded prompt (prefill) and one decode step after it."""
    onnx_lm = OnnxLM(folder)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.config.vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : length // 2] = 0
    next_ids = torch.randint(model.config.vocab_size, (batch_size, 1), generator=generator)
    cache = DynamicCache()
    model = plain_float_copy(model)
    expected = [model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits[:, -1],
                model(next_ids, cache=cache, use_cache=True).logits[:, -1]]
    logits, states = onnx_lm.run("prefill", onnx_lm.initial_states(batch_size), input_ids=input_ids.numpy(),
                                 attention_mask=attention_mask.numpy())
    next_logits, _ = onnx_lm.run("decode", states, input_ids=next_ids.numpy())
    return max(float((torch.from_numpy(got) - want).abs().max()) for got, want in zip((logits, next_logits), expected))
