"""The LSTM language model as a `transformers` model.

This file is shipped with saved models as remote code: besides torch and transformers it imports only
`configuration_lstm`, with a relative import, so `trust_remote_code=True` loads it without `lm_lstm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import inspect
import os
import stat
import statistics
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops import scan
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.weak import WeakIdKeyDictionary
from transformers import initialization as init
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_lstm import LSTMConfig

HIDDEN_STATE, CELL_STATE = 0, 1  # state slots of a cache layer
STEP_MATMUL_MAX_ROWS = 256  # beyond, `F.linear` without measuring: it was the faster at 1024 rows wherever measured
STEP_KERNEL_TRIALS = 10  # timed calls of each kernel per shape, in use, before the fastest is kept
# Another kernel displaces `F.linear` only if its median time is below this fraction of `F.linear`'s: on an Intel CPU
# with AMX the three were within 10% at one row, and the best of 10 timings ranked the transposed copy first where it
# was the slower in decoding (benchmarks/README.md).
STEP_KERNEL_MARGIN = 0.9
# How one-token steps compute their products: None measures it per shape, once per process (it depends on the
# machine); a name of `STEP_KERNELS` forces it where it applies (deterministic tests, benchmarks).
STEP_KERNEL: str | None = None
STEP_KERNELS = ("step_matmul", "linear", "transposed_matmul")
_step_kernel_ranking: dict[tuple[int, ...], tuple[str, ...]] = {}  # by (rows, *weight.shape): names, fastest first
_step_kernel_seconds: dict[tuple[int, ...], dict[str, list[float]]] = {}  # the trials under way
# By (rows, *weight.shape) where the transposed copy ranks first: the median seconds a call saves with it against
# `F.linear`, which computes the steps it would not pay for (as `torch.lstm_cell`'s own product, in a decoding plan)
_step_kernel_saving: dict[tuple[int, ...], float] = {}
_transposed_copy_seconds: dict[tuple[int, ...], float] = {}  # by weight shape: what the last copy took to make


@contextlib.contextmanager
def cudnn_backward_kept(rnn: nn.Module, inputs: torch.Tensor) -> Iterator[None]:
    """Runs the `nn.LSTM`s of `rnn` in training mode on a GPU in eval mode when gradients are on: cuDNN keeps what its
    backward pass needs only in training mode ("cudnn RNN backward can only be called in training mode"), and a user
    may take gradients of an evaluated model (saliency, attribution). Nothing else changes: a one-layer `nn.LSTM` has
    no dropout."""
    lstms = []
    if inputs.device.type == "cuda" and torch.is_grad_enabled():
        lstms = [module for module in rnn.modules() if isinstance(module, nn.LSTM) and not module.training]
    for lstm in lstms:
        lstm.training = True
    try:
        yield
    finally:
        for lstm in lstms:
            lstm.training = False


def is_tracing() -> bool:
    """Whether `torch.compile` or `torch.export` is tracing the model. Traced, the model skips the checks that read
    the inputs' values (a graph cannot branch on data), and its LSTM layers run as traceable operations
    (`LSTMLayer._traced`) rather than the fused kernel, which cannot take padding without reading the mask."""
    return torch.compiler.is_compiling()


def step_kernel(
    rows: torch.Tensor, weight: torch.Tensor, transposed: TransposedWeights | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel that computes `F.linear(rows, weight)` for a one-token step, the fastest here of `F.linear`,
    `step_matmul` and `transposed.matmul` (`TransposedWeights`: given a cache's, without autograd, on a parameter);
    `F.linear` for more than a few rows, other dtypes or devices, and under autocast. Raises `ValueError` if
    `STEP_KERNEL` is not None and names no kernel of `STEP_KERNELS`.

    The choice is measured in use, once per shape and process: the first `STEP_KERNEL_TRIALS` calls of each kernel
    take turns, each timed where it runs, then the kernels are ranked by their median times (`rank_step_kernels`;
    `STEP_KERNEL` forces one). The transposed copy, ranked first, gives way to `F.linear` where it would not pay for
    itself over the steps its cache expects (`TransposedWeights.pays`). In use, a kernel reads the weight from
    memory, as decoding does (a model's weights follow one another through the caches): timed on a weight it had just
    read, `F.linear` looked the faster on an AVX2-only EPYC, where in decoding it is the slowest
    (`benchmarks/README.md`).
    """
    if STEP_KERNEL is not None and STEP_KERNEL not in STEP_KERNELS:
        raise ValueError(f"STEP_KERNEL is {STEP_KERNEL!r}; use None or one of {', '.join(STEP_KERNELS)}.")
    if not (
        rows.device.type == "cpu"
        and rows.dtype == weight.dtype == torch.float32
        and rows.shape[0] <= STEP_MATMUL_MAX_ROWS
        and not torch.is_autocast_enabled("cpu")
    ):
        return F.linear
    usable = STEP_KERNELS if transposed is not None and can_transpose(weight) else STEP_KERNELS[:2]
    if STEP_KERNEL is not None:
        return step_kernel_named(STEP_KERNEL if STEP_KERNEL in usable else "linear", transposed)
    shape = (rows.shape[0], *weight.shape)
    ranking = _step_kernel_ranking.get(shape)
    if ranking is not None:  # only the transposed copy can be unusable here: then the next kernel
        if ranking[0] == "transposed_matmul" and ranking[0] in usable and not transposed.pays(weight, shape):
            return F.linear  # a short generation: not worth the copy
        return step_kernel_named(ranking[0] if ranking[0] in usable else ranking[1], transposed)
    seconds = _step_kernel_seconds.setdefault(shape, {name: [] for name in usable})
    trial = min((name for name in seconds if name in usable), key=lambda name: len(seconds[name]))  # in turn
    return functools.partial(_timed_step_kernel, shape, trial, transposed)


def linear_weight(
    kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    transposed: TransposedWeights | None,
) -> torch.Tensor | None:
    """The tensor to give `F.linear` (or `torch.lstm_cell`, which computes its products with it) in place of `weight`
    so that it computes as `kernel` (of `step_kernel`) would: `weight` for `F.linear`; for `transposed.matmul`, the
    transposed copy seen as `weight` (`F.linear` then multiplies by the row-major copy); None for the others."""
    if kernel is F.linear:
        return weight
    if transposed is not None and kernel == transposed.matmul:
        return transposed.of(weight).t()
    return None


def step_kernel_named(
    name: str, transposed: TransposedWeights | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The one-token step kernel of a name of `STEP_KERNELS` (`transposed_matmul` needs `transposed`)."""
    if name == "transposed_matmul":
        return transposed.matmul
    return step_matmul if name == "step_matmul" else F.linear


def _timed_step_kernel(
    shape: tuple[int, ...], trial: str, transposed: TransposedWeights | None, rows: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """One trial of `step_kernel`'s measurement: the kernel named `trial`, timed (a transposed copy is made before)."""
    if trial == "transposed_matmul":
        transposed.of(weight)
    kernel = step_kernel_named(trial, transposed)
    start = time.perf_counter()
    outputs = kernel(rows, weight)
    elapsed = time.perf_counter() - start
    seconds = _step_kernel_seconds.get(shape)
    if seconds is not None:  # None: the shape was decided meanwhile (another trial of the same step)
        seconds[trial].append(elapsed)
        if min(map(len, seconds.values())) >= STEP_KERNEL_TRIALS:
            ranking = _step_kernel_ranking[shape] = rank_step_kernels(seconds)
            del _step_kernel_seconds[shape]
            if ranking[0] == "transposed_matmul":
                medians = {name: statistics.median(seconds[name]) for name in ("linear", "transposed_matmul")}
                _step_kernel_saving[shape] = medians["linear"] - medians["transposed_matmul"]
            if transposed is not None and not any(
                kept[1:] == shape[1:] and kept_ranking[0] == "transposed_matmul"
                for kept, kept_ranking in _step_kernel_ranking.items()
            ):
                transposed.forget(shape[1:])  # only the kernel that uses the copies pays their memory
    return outputs


def rank_step_kernels(seconds: dict[str, list[float]]) -> tuple[str, ...]:
    """The names of `seconds` (kernel -> its timed calls, in seconds), fastest first by median time; `linear` first
    unless another is faster by `STEP_KERNEL_MARGIN`. Within that margin the plain kernel wins: the others pay a
    copy of the weight or a padded row, and decoding pays what a call costs on average, not at best."""
    medians = {name: statistics.median(times) for name, times in seconds.items()}

    def fastest_first(names: list[str]) -> list[str]:
        ranking = sorted(names, key=medians.get)
        if medians[ranking[0]] >= STEP_KERNEL_MARGIN * medians["linear"]:
            ranking.remove("linear")
            ranking.insert(0, "linear")
        return ranking

    ranking = fastest_first(list(medians))
    if ranking[0] == "transposed_matmul":  # the next is where no copy can serve (autograd): by the same rule
        ranking = ranking[:1] + fastest_first([name for name in medians if name != "transposed_matmul"])
    return tuple(ranking)


def step_matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(rows, weight)` for the few rows of a one-token step, computed as `(weight @ rows.T).T`.

    A one-token step is bound by reading the weights. On CPU, MKL computes `F.linear` on a few rows with a
    matrix-vector or small-batch kernel that, on AVX-512 machines, reads the weight at a fifth to half of the memory
    bandwidth of the matrix-matrix product `weight @ rows.T` with at least two columns: 1.5-5x slower for 1 to 8 rows
    (see benchmarks/README.md). Returns a transposed view.
    """
    batch_size = rows.shape[0]
    # Row-major rows (`rows.T` a transposed view: MKL's fast case), at least two (one would be a matrix-vector product).
    rows = rows.expand(2, -1).contiguous() if batch_size == 1 else rows.contiguous()
    return torch.mm(weight, rows.t())[:, :batch_size].t()


def can_transpose(weight: torch.Tensor) -> bool:
    """Whether `TransposedWeights.matmul` may stand for `F.linear` on `weight`: a module's own parameter (not a tensor
    made anew at each call, as a parametrization's, whose copy would be made at every step), outside autograd."""
    return type(weight) is nn.Parameter and not weight.is_inference() and not torch.is_grad_enabled()


class TransposedWeights:
    """Row-major copies of weights' transposes, for `matmul`, kept by a cache for the decoding it serves (one
    `generate()` call): made at its first step that uses them and freed with it, at most the weights' size again.

    On an AVX2-only EPYC, `rows @ W_T` read a weight at 24-28 GB/s where `F.linear` read it at 15 and `step_matmul`
    at 16-20 (benchmarks/README.md). The copies live no longer than a cache because not every change to a weight is
    seen: a copy is made again when the weight's version counter moves (in-place writes, `load_state_dict`), but fused
    optimizers and writes through `.data` (PEFT's `merge_and_unload`) leave it as it was.

    A copy is kept by the weight's storage, weakly, and goes with it: a new storage (a replaced parameter, `.half()`
    then `.float()`) gets a new copy even at the old one's address, and the weight itself has no weak reference,
    which `torch.utils.swap_tensors` refuses (`.to()` under `torch.__future__.set_swap_module_params_on_conversion`).

    `steps`, the most one-token steps the cache is expected to take, decides whether a copy pays for itself (`pays`):
    a short generation is faster without. `generate()` sets it to `max_new_tokens` (or `max_length`) for its call;
    None means many. A cache decoded further by hand after `generate()` keeps that call's expectation: set
    `cache.transposed_weights.steps = None` for many.
    """

    def __init__(self, steps: int | None = None) -> None:
        # storage -> {(dtype, storage offset, shape, strides) of a weight: ((data_ptr, version), its transpose)}
        self.copies = WeakIdKeyDictionary()
        self.steps = steps

    def __len__(self) -> int:
        return sum(map(len, self.copies.values()))

    def __deepcopy__(self, memo: dict) -> TransposedWeights:
        return TransposedWeights()  # derived from the weights: made again where needed

    def _current(self, weight: torch.Tensor) -> tuple[tuple, tuple[int, int], torch.Tensor | None]:
        """The key of `weight` among its storage's copies, what a current copy holds, and that copy (None: none)."""
        view = (weight.dtype, weight.storage_offset(), weight.shape, weight.stride())
        version = (weight.data_ptr(), weight._version)  # the address moves when the storage is resized in place
        kept = self.copies.get(weight.untyped_storage(), {}).get(view)
        return view, version, kept[1] if kept is not None and kept[0] == version else None

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        """The row-major copy of `weight.T`."""
        view, version, copy = self._current(weight)
        if copy is None:
            start_time = time.perf_counter()
            copy = weight.new_empty(weight.shape[1], weight.shape[0])
            for start in range(0, weight.shape[0], 256):  # in blocks: 3.6x `.t().contiguous()` for 10,000 x 650
                copy[:, start : start + 256].copy_(weight[start : start + 256].detach().t())
            self.copies.setdefault(weight.untyped_storage(), {})[view] = (version, copy)
            _transposed_copy_seconds[tuple(weight.shape)] = time.perf_counter() - start_time
        return copy

    def pays(self, weight: torch.Tensor, shape: tuple[int, ...]) -> bool:
        """Whether `transposed_matmul` should compute the steps of `shape` (rows, *weight.shape) on `weight`, not
        `F.linear`: its copy is made, or the `steps` expected save more time with it (`_step_kernel_saving`) than a
        copy of a weight of this shape took to make (`_transposed_copy_seconds`). Unmeasured, it is taken to pay."""
        cost = _transposed_copy_seconds.get(shape[1:])
        saving = _step_kernel_saving.get(shape)
        if self.steps is None or cost is None or saving is None or self.steps * saving > cost:
            return True
        return self._current(weight)[2] is not None

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`F.linear(rows, weight)` as `rows @ W_T`. Not for autograd: the copy is not the parameter."""
        return rows @ self.of(weight)

    def forget(self, weight_shape: tuple[int, ...]) -> None:
        """Drops the copies of the weights of this shape."""
        for views in self.copies.values():
            for view in [view for view in views if tuple(view[2]) == weight_shape]:
                del views[view]


class DecodingPlan:
    """What one-token decoding steps after a cache read (`LSTMForCausalLM._decoding_step`), resolved once for it: each
    layer's `torch.lstm_cell` weights and biases and the output layer's `F.linear` weight and bias, each a parameter
    or the view of its transposed copy that `step_kernel` chose (`linear_weight`), or None where that layer takes
    `LSTMLayer._step` (`step_matmul`) or the output layer `_output_logits`.

    It serves steps of `model` at the batch size and `STEP_KERNEL` it was made for while the model is as it was: the
    same module classes and submodules, the same parameters with the same storage and version counters (in-place
    writes, `load_state_dict`, `.to()` change those), and no submodule in training mode or with forward hooks or a
    `forward` of its own (accelerate's device hooks). Global module hooks (`register_module_forward_hook`) are not
    looked for. It holds the model's modules and parameters, as the cache holds its state, until the cache is dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        layers: tuple[tuple[torch.Tensor, ...] | None, ...],
        head: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> None:
        self.model, self.batch_size, self.step_kernel = weakref.ref(model), batch_size, STEP_KERNEL
        self.layers, self.head = layers, head
        self.structure = [(module, type(module), dict(module._modules)) for module in model.modules()]
        self.parameters = [
            (module, name, parameter, parameter.data_ptr(), parameter._version)
            for module in model.modules()
            for name, parameter in module._parameters.items()
            if parameter is not None
        ]

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied cache makes its own, as it makes its own transposed copies

    def serves(self, model: nn.Module, batch_size: int) -> bool:
        """Whether the plan holds for a step of `model` (in evaluation mode) on `batch_size` rows now."""
        return (
            self.model() is model
            and batch_size == self.batch_size
            and STEP_KERNEL == self.step_kernel
            and all(
                type(module) is kind
                and module._modules == children
                and (module is model or not is_changed_by_a_call(module))
                for module, kind, children in self.structure
            )
            and all(
                owner._parameters.get(name) is parameter
                and parameter.data_ptr() == storage
                and parameter._version == version
                for owner, name, parameter, storage, version in self.parameters
            )
        )


def is_changed_by_a_call(module: nn.Module) -> bool:
    """Whether calling `module` does more than its class's `forward` in evaluation: it is in training mode, or has
    forward hooks or a `forward` of its own (accelerate's device hooks)."""
    return module.training or bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in module.__dict__


CAUSAL_LM_OUTPUT_FIELDS = tuple(field.name for field in dataclasses.fields(CausalLMOutputWithPast))


def decoding_step_output(logits: torch.Tensor, cache: Cache) -> CausalLMOutputWithPast:
    """`CausalLMOutputWithPast(logits=logits, cache=cache)`, made as its dataclass `__init__` and
    `ModelOutput.__post_init__` leave it (every field an attribute, the ones set also items, in field order) without
    their per-field checks: 1 us instead of 15 on an AVX2-only EPYC, against a small model's step of 100-200 us."""
    output = CausalLMOutputWithPast.__new__(CausalLMOutputWithPast)
    output.__dict__.update(dict.fromkeys(CAUSAL_LM_OUTPUT_FIELDS), logits=logits, cache=cache)
    OrderedDict.__setitem__(output, "logits", logits)
    OrderedDict.__setitem__(output, "cache", cache)
    return output


def transposed_weights(cache: Cache | None) -> TransposedWeights | None:
    """The transposed copies `cache` keeps for one-token steps (`TransposedWeights`), made with it; None without."""
    if cache is None:
        return None
    if not isinstance(getattr(cache, "transposed_weights", None), TransposedWeights):
        cache.transposed_weights = TransposedWeights()
    return cache.transposed_weights


@functools.cache
def cpu_autocast_runs_lstm(dtype: torch.dtype) -> bool:
    """Whether `nn.LSTM` runs under CPU autocast to `dtype` here, tried once per process on a 1x1 LSTM.

    Autocast sends the LSTM to oneDNN in `dtype`; on a CPU without bf16 arithmetic (AVX2 only, or oneDNN limited to
    it by `ONEDNN_MAX_CPU_ISA=AVX2`) oneDNN cannot create that primitive and raises.
    """
    zero = torch.zeros(1, 1, 1)
    weights = [torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4), torch.zeros(4)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            torch.lstm(zero, (zero, zero), weights, True, 1, 0.0, False, False, False)
    except RuntimeError:
        return False
    return True


def lstm_outside_autocast(inputs: torch.Tensor) -> bool:
    """Whether an LSTM on `inputs` must leave CPU autocast (see `cpu_autocast_runs_lstm`) and run in their dtype."""
    return (
        inputs.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and not cpu_autocast_runs_lstm(torch.get_autocast_dtype("cpu"))
    )


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence and feature, reused at every time step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    @property
    def drops(self) -> bool:
        """Whether it drops anything: in training mode with p > 0; otherwise it is the identity."""
        return self.training and self.p > 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.drops:
            return hidden_states
        batch_size, _, features = hidden_states.shape
        keep = hidden_states.new_empty(batch_size, 1, features).bernoulli_(1 - self.p)
        return hidden_states * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropped(dropout: LockedDropout, hidden_states: torch.Tensor) -> torch.Tensor:
    """`dropout(hidden_states)`, without the module call where it is the identity (in evaluation, unless the module
    itself is in training mode, as for Monte Carlo dropout): a call costs more than a small one-token step."""
    return dropout(hidden_states) if dropout.drops else hidden_states


class WeightDropMask(nn.Module):
    """A parametrization (`torch.nn.utils.parametrize`) multiplying a weight by one dropout mask, drawn at
    construction: the weight is read several times in a forward pass, and every read must see the same mask."""

    def __init__(self, weight: torch.Tensor, p: float):
        super().__init__()
        self.mask = F.dropout(torch.ones_like(weight), p, training=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class PaddingLayout:
    """Where the real tokens of a padded batch are, and how to move them to the front of each row and back.

    Rows may be left-padded (generation), right-padded (training) or both, but the real tokens of a row must be
    contiguous. Aligned to the front, the rows can be packed, so the fused LSTM kernels stop each row's state at its
    last real token and never step through padding (`LSTMLayer` does this).
    """

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        self.mask = mask
        if is_tracing():
            return  # traced layers mask each step instead (`LSTMLayer._traced`); packing depends on the data
        positions = torch.arange(mask.shape[1], device=mask.device)
        self.lengths = mask.sum(dim=1)
        self.starts = torch.where(mask, positions, mask.shape[1]).amin(dim=1).clamp(max=mask.shape[1] - 1)
        ends = torch.where(mask, positions, -1).amax(dim=1)
        if bool(((ends - self.starts + 1 != self.lengths) & (self.lengths > 0)).any()):
            raise ValueError(
                "`attention_mask` has padding between real tokens; only left or right padding is supported."
            )
        self.empty_rows = self.lengths == 0
        self.packing_lengths = self.lengths.clamp(min=1).cpu()
        self._to_front = (self.starts[:, None] + positions).clamp(max=mask.shape[1] - 1)
        self._to_original = (positions - self.starts[:, None]).clamp(min=0)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None, batch_size: int, seq_len: int) -> PaddingLayout | None:
        """Checks `attention_mask`; returns None when it marks no padding. Traced (`is_tracing`), the mask's values
        are neither checked nor looked at: any mask is taken as padding."""
        if attention_mask is None:
            return None
        if attention_mask.shape != (batch_size, seq_len):
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, sequence_length) = {(batch_size, seq_len)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if is_tracing():
            return cls(attention_mask)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real token).")
        if bool(attention_mask.all()):
            return None
        return cls(attention_mask)

    def _gather(self, sequences: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index[:, :, None].expand(-1, -1, sequences.shape[-1])
        return sequences.gather(1, index)

    def to_front(self, sequences: torch.Tensor) -> torch.Tensor:
        """Moves each row's real tokens to the start of the row."""
        return self._gather(sequences, self._to_front)

    def to_original(self, sequences: torch.Tensor) -> torch.Tensor:
        """Undoes `to_front`; padding positions become zeros."""
        return self._gather(sequences, self._to_original) * self.mask[:, :, None]

    def keep_state_of_empty_rows(self, new_state: torch.Tensor, old_state: torch.Tensor | None) -> torch.Tensor:
        """Rows without a real token must leave the state as it was (packing needs at least one step per row)."""
        if not bool(self.empty_rows.any()):
            return new_state
        old_state = torch.zeros_like(new_state) if old_state is None else old_state.to(new_state.dtype)
        return torch.where(self.empty_rows[:, None], old_state, new_state)


class LSTMLayer(GradientCheckpointingLayer):
    """One LSTM layer on the fused `nn.LSTM` kernel, with DropConnect on its hidden-to-hidden weights.

    The layer reads no cache: it gets its initial state and returns its final one, so that gradient checkpointing can
    run it again in the backward pass (the cache has been updated by then).
    """

    def __init__(self, config: LSTMConfig, layer_idx: int):
        super().__init__()
        input_size, hidden_size = config.layer_sizes[layer_idx]
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.weight_dropout = config.weight_dropout
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        initial_hidden: torch.Tensor | None = None,
        initial_cell: torch.Tensor | None = None,
        padding: PaddingLayout | None = None,
        transposed: TransposedWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the layer over `(batch, time, features)` inputs, from zeros or the given `(batch, hidden)` states.

        With `padding`, only the real positions count: outputs at padding positions are zero, each row's final state
        is the one after its last real token, and a row without any keeps its initial state. Returns the outputs and
        the final hidden and cell states. `transposed`: the cache's copies for one-token steps (`step_kernel`).
        """
        dropping_weights = self.training and self.weight_dropout > 0
        if is_tracing():
            return self._traced(hidden_states, initial_hidden, initial_cell, padding, dropping_weights)
        one_step = hidden_states.shape[1] == 1 and padding is None and not dropping_weights
        outside_autocast = lstm_outside_autocast(hidden_states)
        with torch.autocast("cpu", enabled=False) if outside_autocast else contextlib.nullcontext():
            if one_step and type(self.rnn) is nn.LSTM:
                return self._step(hidden_states, initial_hidden, initial_cell, transposed)
            return self._run(hidden_states, initial_hidden, initial_cell, padding, dropping_weights)

    def _run(
        self,
        hidden_states: torch.Tensor,
        initial_hidden: torch.Tensor | None,
        initial_cell: torch.Tensor | None,
        padding: PaddingLayout | None,
        dropping_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused kernel over the whole sequence; padded rows are aligned to the front and packed."""
        initial_state = None
        if initial_hidden is not None:
            dtype = hidden_states.dtype
            initial_state = (initial_hidden[None].to(dtype), initial_cell[None].to(dtype))
        inputs = hidden_states
        if padding is not None:
            inputs = pack_padded_sequence(
                padding.to_front(hidden_states), padding.packing_lengths, batch_first=True, enforce_sorted=False
            )
        if dropping_weights and type(self.rnn) is nn.LSTM:
            dropped = F.dropout(self.rnn.weight_hh_l0, self.weight_dropout, training=True)
            outputs, (hidden, cell) = torch.func.functional_call(
                self.rnn, {"weight_hh_l0": dropped}, (inputs, initial_state)
            )
        elif dropping_weights:
            # A wrapper around the LSTM, such as PEFT's LoRA on its weights (`target_parameters`), adds its update to
            # them as a parametrization while it runs; the drop is a parametrization too, registered first, so that
            # the update is added to the dropped matrix.
            lstm = next(module for module in self.rnn.modules() if isinstance(module, nn.LSTM))
            drop = WeightDropMask(lstm.weight_hh_l0, self.weight_dropout)
            parametrize.register_parametrization(lstm, "weight_hh_l0", drop, unsafe=True)
            try:
                outputs, (hidden, cell) = self.rnn(inputs, initial_state)
            finally:
                parametrize.remove_parametrizations(lstm, "weight_hh_l0", leave_parametrized=False)
        else:
            with cudnn_backward_kept(self.rnn, hidden_states):
                outputs, (hidden, cell) = self.rnn(inputs, initial_state)
        hidden, cell = hidden[0], cell[0]
        if padding is not None:
            outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=hidden_states.shape[1])
            outputs = padding.to_original(outputs)
            hidden = padding.keep_state_of_empty_rows(hidden, initial_hidden)
            cell = padding.keep_state_of_empty_rows(cell, initial_cell)
        return outputs, hidden, cell

    def _traced(
        self,
        hidden_states: torch.Tensor,
        hidden: torch.Tensor | None,
        cell: torch.Tensor | None,
        padding: PaddingLayout | None,
        dropping_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer as traceable operations: the input projection of every step at once, then the recurrence. Under
        `torch.export` it is a `scan` over time steps (one graph for any length; ONNX `Scan`); under `torch.compile`,
        and for a static one-token input, a loop over the steps, unrolled (inductor cannot compile `scan` on CPU in
        torch 2.13). Padding positions leave the state as it was and output zeros, as `_run` does."""
        rnn = self.rnn
        if type(rnn) is not nn.LSTM:
            raise ValueError(
                f"Layer {self.layer_idx}'s LSTM is a {type(rnn).__name__}: compile or export the plain model (merge "
                "adapters with `merge_and_unload()`; quantise after exporting)."
            )
        batch_size, seq_len = hidden_states.shape[:2]
        if hidden is None:  # two tensors: `scan` goes wrong when its initial carries alias each other
            hidden, cell = (hidden_states.new_zeros(batch_size, rnn.hidden_size) for _ in range(2))
        hidden, cell = hidden.to(hidden_states.dtype), cell.to(hidden_states.dtype)
        weight_hh = rnn.weight_hh_l0
        if dropping_weights:
            weight_hh = F.dropout(weight_hh, self.weight_dropout, training=True)
        gate_inputs = F.linear(hidden_states, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)
        real = padding.mask if padding is not None else None

        def step(state: tuple[torch.Tensor, torch.Tensor], inputs: tuple[torch.Tensor, ...]):
            hidden, cell = state
            new_hidden, new_cell = lstm_cell_from_gates(inputs[0] + F.linear(hidden, weight_hh), cell)
            if real is None:
                return (new_hidden, new_cell), new_hidden.clone()  # scan's outputs may not alias its carry
            keep = inputs[1][:, None]
            new_hidden, new_cell = torch.where(keep, new_hidden, hidden), torch.where(keep, new_cell, cell)
            return (new_hidden, new_cell), new_hidden * keep

        time_major = (gate_inputs.transpose(0, 1),) + (() if real is None else (real.t(),))
        if torch.compiler.is_exporting() and not (isinstance(seq_len, int) and seq_len == 1):
            (hidden, cell), outputs = scan(step, (hidden, cell), time_major)
            return outputs.transpose(0, 1), hidden, cell
        outputs = []
        for position in range(seq_len):
            (hidden, cell), output = step((hidden, cell), tuple(inputs[position] for inputs in time_major))
            outputs.append(output)
        return torch.stack(outputs, 1), hidden, cell

    def _step(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor | None,
        cell: torch.Tensor | None,
        transposed: TransposedWeights | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One time step: the same arithmetic as the fused kernel, without its per-call set-up cost, which dominates
        a single step (about 15x on oneDNN) and so token-by-token generation. The gates' products are
        `step_kernel`'s; where both are `F.linear`, `torch.lstm_cell` computes the step."""
        inputs = inputs[:, 0]
        if hidden is None:
            hidden = cell = inputs.new_zeros(inputs.shape[0], self.hidden_size)
        elif hidden.dtype != inputs.dtype or cell.dtype != inputs.dtype:  # a cache filled in another precision
            hidden, cell = hidden.to(inputs.dtype), cell.to(inputs.dtype)
        rnn = self.rnn
        input_kernel = step_kernel(inputs, rnn.weight_ih_l0, transposed)
        recurrent_kernel = step_kernel(hidden, rnn.weight_hh_l0, transposed)
        cell_arguments = lstm_cell_arguments(rnn, input_kernel, recurrent_kernel, transposed)
        if cell_arguments is not None:
            hidden, cell = torch.lstm_cell(inputs, (hidden, cell), *cell_arguments)
            return hidden[:, None], hidden, cell
        gates = input_kernel(inputs, rnn.weight_ih_l0) + recurrent_kernel(hidden, rnn.weight_hh_l0)
        hidden, cell = lstm_cell_from_gates(gates + (rnn.bias_ih_l0 + rnn.bias_hh_l0), cell)
        return hidden[:, None], hidden, cell


def lstm_cell_arguments(
    rnn: nn.LSTM,
    input_kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    recurrent_kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    transposed: TransposedWeights | None,
) -> tuple[torch.Tensor, ...] | None:
    """The weights and biases that `torch.lstm_cell` takes for a one-token step of `rnn` whose products are the
    kernels of `step_kernel` (`linear_weight`); None where one of them is neither `F.linear` nor the transposed copy."""
    input_weight = linear_weight(input_kernel, rnn.weight_ih_l0, transposed)
    recurrent_weight = linear_weight(recurrent_kernel, rnn.weight_hh_l0, transposed)
    if input_weight is None or recurrent_weight is None:
        return None
    return input_weight, recurrent_weight, rnn.bias_ih_l0, rnn.bias_hh_l0


def lstm_cell_from_gates(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM cell update from its `(batch, 4 * hidden)` pre-activations (input, forget, cell, output gates, in
    `nn.LSTM`'s order) and the previous `(batch, hidden)` cell state; returns the new hidden and cell states."""
    input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, 1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
    hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
    return hidden, cell


class LSTMCacheLayer(LinearAttentionLayer, CacheLayerMixin):
    """One LSTM layer's state in a transformers `Cache`: h and c (recurrent state slots 0 and 1), and the number of
    positions (padding included) they have consumed.

    `get_seq_length` reports that count, so that `generate`, continuing from a returned cache, feeds only the positions
    that follow, as it does for attention caches. It asks only caches that have a `CacheLayerMixin` layer (it takes
    the others to have no length), hence the second base, as transformers' hybrid recurrent-attention layers have.
    """

    # Not compileable, so that `generate` neither builds 4D attention masks for it nor compiles the forward pass
    # (`torch.compile` breaks the graph at `nn.LSTM`).
    is_compileable = False

    def __init__(self):
        CacheLayerMixin.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=2)
        self.seen_tokens = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("An LSTM cache layer holds h and c (`update_recurrent_state`), not keys and values.")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


def prepare_cache(cache: Cache, config: LSTMConfig) -> Cache:
    """Makes `cache` hold this model's states, in place, and returns it; raises a ValueError if it cannot.

    It must have one recurrent layer with h and c per LSTM layer. Layers without a state yet, and the missing layers of
    an empty `DynamicCache()`, become `LSTMCacheLayer`s, which count the positions they consume. Layers holding a
    state stay as they are (a trainer's `DynamicCache(config=...)` filled with `update_recurrent_state`).
    """
    if not isinstance(cache, Cache):
        raise ValueError(f"`cache` must be a transformers `Cache` such as `DynamicCache()`, got {type(cache).__name__}.")
    num_layers = config.num_hidden_layers
    if not cache.layers:  # `DynamicCache()` adds layers on its first `update`, attention ones
        cache.layers.extend(LSTMCacheLayer() for _ in range(num_layers))
    if len(cache.layers) != num_layers:
        raise ValueError(
            f"The `cache` has {len(cache.layers)} layers, but the model has {num_layers}. Pass `DynamicCache()`, "
            "`DynamicCache(config=model.config)` or a cache this model returned."
        )
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(layer, LSTMCacheLayer):
            continue
        if not isinstance(layer, LinearAttentionCacheLayerMixin) or isinstance(layer, CacheLayerMixin):
            raise ValueError(
                f"The `cache` holds a {type(layer).__name__} at layer {layer_idx}, which keeps attention keys and "
                "values; an LSTM needs recurrent layers for h and c. Pass `DynamicCache()`, "
                "`DynamicCache(config=model.config)` or a cache this model returned."
            )
        if not any(layer.is_recurrent_states_initialized.values()):
            cache.layers[layer_idx] = LSTMCacheLayer()
        elif layer.number_of_states < 2:
            raise ValueError(
                f"The `cache` layer {layer_idx} has {layer.number_of_states} state slot; an LSTM needs two (h and c)."
            )
    return cache


def store_state(cache: Cache, layer_idx: int, hidden: torch.Tensor, cell: torch.Tensor, num_positions: int) -> None:
    """Writes a layer's final h and c into `cache`, which has consumed `num_positions` more positions."""
    cache.update_recurrent_state(hidden, layer_idx, state_idx=HIDDEN_STATE)
    cache.update_recurrent_state(cell, layer_idx, state_idx=CELL_STATE)
    layer_cache = cache.layers[layer_idx]
    if isinstance(layer_cache, LSTMCacheLayer):
        layer_cache.seen_tokens += num_positions


def has_read_nothing(cache: Cache) -> bool:
    """Whether `cache` (made ready by `prepare_cache`) has consumed no position: new, or `reset()`."""
    return all(isinstance(layer, LSTMCacheLayer) and layer.seen_tokens == 0 for layer in cache.layers)


def first_real_positions(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.LongTensor:
    """`(batch, 1)`: where each row's first token that `attention_mask` marks real is (padding is on the left); 0 for
    rows without padding, or without a real token."""
    if attention_mask is None:
        return input_ids.new_zeros(input_ids.shape[0], 1)
    return attention_mask.int().argmax(dim=1, keepdim=True)


def real_position_mask(
    attention_mask: torch.Tensor | None, shift_labels: torch.Tensor | None, hidden_states: torch.Tensor
) -> torch.Tensor:
    """`(batch, time)` bool: which positions of `hidden_states` hold real tokens. The attention mask says so; stream
    batches carry none on purpose (it would make the layers pack the rows, 1.5x slower), and there a position with a
    target is real. Without either, every position is."""
    if attention_mask is not None:
        return attention_mask.bool()
    if shift_labels is not None:
        return shift_labels != -100
    return torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)


ASSISTED_DECODING = "assisted decoding (it rolls the state back to before rejected tokens)"
# The model inputs that `generate` passes on at each step and `LSTMForCausalLM.forward` takes as they are, so that
# `prepare_inputs_for_generation` may pass them on itself (any other one goes through transformers' preparation).
DECODING_STEP_OPTIONS = frozenset({"logits_to_keep", "output_hidden_states", "output_attentions", "return_dict"})
# Generation options (with their unset value) of decoding methods this model does not run: those transformers moved
# to Hub code written for attention caches, and assisted decoding. `generate` would otherwise ignore some of them
# silently (`penalty_alpha` with sampling, `dola_layers` with beam search...).
UNSUPPORTED_GENERATION_OPTIONS = {
    "penalty_alpha": (0.0, "contrastive search"),
    "low_memory": (None, "contrastive search"),
    "dola_layers": (None, "DoLa decoding"),
    "num_beam_groups": (1, "group beam search"),
    "diversity_penalty": (0.0, "group beam search"),
    "constraints": (None, "constrained beam search"),
    "force_words_ids": (None, "constrained beam search"),
    "prompt_lookup_num_tokens": (None, ASSISTED_DECODING),
    "assistant_early_exit": (None, ASSISTED_DECODING),
    "use_mtp": (None, ASSISTED_DECODING),
}


def _regular_files(pattern: str) -> dict[str, os.stat_result]:
    """The regular files (not links) whose paths match the glob `pattern`, with their `os.lstat`."""
    found = {}
    for path in glob.glob(pattern):
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            found[path] = info
    return found


@contextlib.contextmanager
def plain_file_permissions(pattern: str) -> Iterator[None]:
    """Gives the files matching the glob `pattern` that the block writes (new ones, or ones it replaces) the
    permissions a plain `open()` gives: 0o666 less the umask for a new file, the old file's mode for a replaced one.

    safetensors >= 0.8 writes through a temporary file created 0600 whatever the umask, then renames it into place: a
    model folder others cannot load (safetensors/safetensors#782). Files the block leaves alone, and links, are not
    touched."""
    before = _regular_files(pattern)
    yield
    mask = os.umask(0o077)  # read by setting it, to the strictest value meanwhile
    os.umask(mask)
    for path, info in _regular_files(pattern).items():
        old = before.get(path)
        if old is None or (old.st_dev, old.st_ino) != (info.st_dev, info.st_ino):
            os.chmod(path, 0o666 & ~mask if old is None else stat.S_IMODE(old.st_mode))


class LSTMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the flags `transformers` reads, shared by the LSTM models."""

    config_class = LSTMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LSTMLayer"]
    _is_stateful = True
    _supported_generation_modes = [
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    ]

    def _init_weights(self, module: nn.Module) -> None:
        """Classic LSTM LM initialisation: uniform embeddings and output weights, zero output bias, and PyTorch's
        uniform(-1/sqrt(hidden), 1/sqrt(hidden)) for the recurrent weights."""
        width = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -width, width)
        elif isinstance(module, nn.Linear):
            init.uniform_(module.weight, -width, width)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LSTM):
            bound = module.hidden_size**-0.5
            for parameter in module.parameters():
                init.uniform_(parameter, -bound, bound)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, the weight files it writes (`model*.safetensors`) given the permissions
        of a plain new file (`plain_file_permissions`)."""
        with plain_file_permissions(os.path.join(glob.escape(os.fspath(save_directory)), "model*.safetensors")):
            super().save_pretrained(save_directory, *args, **kwargs)


class LSTMModel(LSTMPreTrainedModel):
    """The embedding and the stack of LSTM layers, without an output layer."""

    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.input_dropout = LockedDropout(config.input_dropout)
        self.layers = nn.ModuleList(LSTMLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.hidden_dropout = LockedDropout(config.hidden_dropout)
        self.output_dropout = LockedDropout(config.output_dropout)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Looks tokens up, dropping whole word types in training (`embedding_dropout`)."""
        # From the config, not the module: a wrapper such as PEFT's LoRA `Embedding` has no `num_embeddings`.
        vocab_size = self.config.vocab_size
        if input_ids.numel() and not is_tracing():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"`input_ids` must be in [0, {vocab_size}) (the vocabulary size), got values from {low} to {high}."
                )
        embeds = self.embeddings(input_ids)
        p = self.config.embedding_dropout if self.training else 0.0  # a config read costs 2-3 us a token
        if p > 0:
            keep = embeds.new_empty(vocab_size).bernoulli_(1 - p) / (1 - p)
            embeds = embeds * keep[input_ids][..., None]
        return embeds

    def _initial_states(self, cache: Cache | None, batch_size: int) -> list[tuple[torch.Tensor | None, ...]]:
        """The (h, c) each layer starts from: the cache's, or None (zeros) where it holds none."""
        if cache is None:
            return [(None, None)] * len(self.layers)
        states = []
        for layer, layer_cache in zip(self.layers, cache.layers):
            if not layer_cache.is_recurrent_states_initialized[HIDDEN_STATE]:
                states.append((None, None))
                continue
            hidden, cell = layer_cache.recurrent_states[HIDDEN_STATE], layer_cache.recurrent_states[CELL_STATE]
            if hidden.shape[0] != batch_size:
                raise ValueError(
                    f"The `cache` holds states for a batch of {hidden.shape[0]}, but the inputs have a batch of "
                    f"{batch_size}. Continue from a cache with inputs of the batch it was built with."
                )
            expected = (batch_size, layer.hidden_size)
            if hidden.shape != expected or cell.shape != expected:
                raise ValueError(
                    f"The `cache` holds states of shape {tuple(hidden.shape)} and {tuple(cell.shape)} at layer "
                    f"{layer.layer_idx}, where this model's are {expected}: it comes from another model."
                )
            if torch.is_grad_enabled():
                # The cache is updated in place after the layer ran; autograd needs the states it started from.
                hidden, cell = hidden.clone(), cell.clone()
            states.append((hidden, cell))
        return states

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids in `[0, vocab_size)`. Give either these or `inputs_embeds`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (left or right, not in between). The recurrent state does not
                move through padding, and outputs at padding positions are zero.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, embedding_size)`, *optional*):
                Embeddings to use instead of looking `input_ids` up.
            cache (`Cache`, *optional*):
                The recurrent state (h and c of every layer) to continue from; it is updated in place. Feed only the
                tokens that follow the ones already consumed. `DynamicCache()`, `DynamicCache(config=model.config)`
                and the caches the model returns all serve (see `prepare_cache`); their `get_seq_length()` is the
                number of positions consumed.
            use_cache (`bool`, *optional*):
                Whether to return the cache (a new one when none is given). Defaults to `config.use_cache` in
                evaluation mode and `False` in training.
            output_hidden_states (`bool`, *optional*):
                Whether to return the embeddings and the output of every layer.
            return_dict (`bool`, *optional*):
                Whether to return a `BaseModelOutputWithPast` rather than a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if kwargs.get("output_attentions"):
            raise ValueError("`output_attentions=True`: an LSTM has no attention weights to return.")
        if cache is not None and use_cache is False:
            # The state in `cache` would move on in place while the caller re-feeds the whole sequence.
            raise ValueError("`use_cache=False` with a `cache`: pass `use_cache=True` to continue from it, or no cache.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
            inputs_embeds = self.embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                "The inputs must hold at least one time step, with shape (batch_size, sequence_length[, features]); "
                f"got {tuple(inputs_embeds.shape[:2])}."
            )
        batch_size, seq_len = inputs_embeds.shape[:2]
        padding = PaddingLayout.from_mask(attention_mask, batch_size, seq_len)

        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if cache is not None:
            prepare_cache(cache, self.config)
        elif use_cache:
            cache = prepare_cache(DynamicCache(), self.config)
        initial_states = self._initial_states(cache, batch_size)
        transposed = transposed_weights(cache)

        all_hidden_states = (inputs_embeds,) if output_hidden_states else None
        hidden_states = dropped(self.input_dropout, inputs_embeds)
        for layer_idx, (layer, (hidden, cell)) in enumerate(zip(self.layers, initial_states)):
            if layer_idx > 0:
                hidden_states = dropped(self.hidden_dropout, hidden_states)
            hidden_states, hidden, cell = layer(hidden_states, hidden, cell, padding, transposed)
            if cache is not None:
                store_state(cache, layer_idx, hidden, cell, seq_len)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = dropped(self.output_dropout, hidden_states)

        returned_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, returned_cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=returned_cache, hidden_states=all_hidden_states
        )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy (nats per target) of `(batch, time, vocab)` logits: against `labels` shifted by one position,
    or against `shift_labels` as given; -100 targets are ignored. Summed, then divided by `num_items_in_batch` when
    given (exact under `Trainer`'s gradient accumulation), else by the number of targets. `label_smoothing` mixes the
    targets with the uniform distribution (Szegedy et al., 2016), as `torch.nn.functional.cross_entropy` does."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    targets = shift_labels.to(logits.device)
    loss = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if torch.is_tensor(count):
        count = count.to(loss.device)
    return loss / count


class LSTMForCausalLM(LSTMPreTrainedModel, GenerationMixin):
    """The LSTM language model: `LSTMModel` and an output layer over the vocabulary."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        self.model = LSTMModel(config)
        self.lm_head = nn.Linear(config.output_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.model.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None, **kwargs
    ) -> tuple[GenerationConfig, dict]:
        # The merged options are checked here, before `generate` picks a decoding method (and fetches Hub code).
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for option, (unset, method) in UNSUPPORTED_GENERATION_OPTIONS.items():
            if getattr(generation_config, option, None) not in (None, False, unset):
                self._refuse_generation_option(option, method)
        return generation_config, model_kwargs

    def _validate_generation_mode(
        self, generation_mode: GenerationMode, generation_config: GenerationConfig, generation_mode_kwargs: dict
    ) -> None:
        if generation_mode_kwargs.get("assistant_model") is not None:
            self._refuse_generation_option("assistant_model", ASSISTED_DECODING)
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _refuse_generation_option(self, option: str, method: str) -> None:
        raise ValueError(
            f"`{option}` asks for {method}, which {type(self).__name__} cannot do: it only supports greedy search, "
            "sampling and beam search (with or without sampling)."
        )

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict, *args, **kwargs
    ) -> None:
        # The cache must count positions from the start: `generate` reads its length before the first forward pass
        # when it prefills in chunks (`prefill_chunk_size`).
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is not None:
            prepare_cache(cache, self.config)
            # At most this many one-token steps follow (`max_length` counts the prompt too, where it is the limit).
            steps = generation_config.max_new_tokens
            transposed_weights(cache).steps = generation_config.max_length if steps is None else steps
            cache.decoding_plan = None  # a cache continued: its kernels are chosen again, for these steps

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        if inputs_embeds is None and input_ids.shape[1] == 0 and (cache is None or cache.get_seq_length() == 0):
            raise ValueError(
                "The prompt is empty (`input_ids` of shape (batch, 0)): call `generate()` without `input_ids` to start "
                "a document (from `bos_token_id`), or give at least one token."
            )
        if (
            next_sequence_length == 1
            and cache is not None
            and use_cache
            and not is_first_iteration
            and kwargs.keys() <= DECODING_STEP_OPTIONS
            and input_ids.device == getattr(getattr(self.get_input_embeddings(), "weight", None), "device", None)
        ):
            # The steady state of decoding, one new token at a time: the state holds everything before it and every
            # new token is real. What `super()` does for any model (a copy of the token, the signature of `forward`,
            # `self.device` twice, attention-mask building for other caches) cost more here than the step of a small
            # model (benchmarks/README.md).
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": use_cache, **kwargs}
        if next_sequence_length is not None and next_sequence_length <= 0:
            # `generate` continuing from a cache feeds what follows the positions it consumed: here, nothing.
            given = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            raise ValueError(
                f"The `cache` has consumed {cache.get_seq_length()} positions, but the inputs hold {given}: continue "
                "with the whole sequence (the consumed positions, then the new ones), or with only the new tokens and "
                "an `attention_mask` covering the whole sequence."
            )
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        model_inputs.pop("position_ids", None)
        if cache is None:
            # Without a cache every step feeds the whole sequence again, from zeros: the start token goes in front.
            if model_inputs.get("input_ids") is not None:
                model_inputs["input_ids"], model_inputs["attention_mask"] = self._with_document_start(
                    model_inputs["input_ids"], model_inputs.get("attention_mask")
                )
            return model_inputs
        if use_cache and not is_first_iteration:
            # The state already skipped the prompt's padding; every new token is real.
            model_inputs["attention_mask"] = None
        elif attention_mask is not None:
            # The mask covers the whole sequence; the state holds everything before these inputs.
            inputs = model_inputs["input_ids"] if model_inputs["input_ids"] is not None else model_inputs["inputs_embeds"]
            model_inputs["attention_mask"] = attention_mask[:, -inputs.shape[1] :]
        return model_inputs

    def _prefill(self, input_ids: torch.LongTensor, generation_config: GenerationConfig, model_kwargs: dict,
                 *args, **kwargs):
        # Before the prompt is read (whole, or in chunks with `prefill_chunk_size`), from a cache that has read nothing.
        cache = model_kwargs.get("cache")
        if cache is not None and has_read_nothing(cache):
            prompt = input_ids if input_ids.shape[1] > 0 else None  # `inputs_embeds` alone come with no ids
            self._start_from_document_start(cache, input_ids.shape[0], prompt, model_kwargs.get("attention_mask"))
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def _rows_to_start(self, batch_size: int, input_ids: torch.LongTensor | None,
                       attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """`(batch,)` bool: the prompts that do not begin with the document-start token (`config.eos_token_id`); all
        of them when only embeddings are given. None when the config names no such token."""
        start = self.config.eos_token_id
        if start is None:
            return None
        if input_ids is None:
            return torch.ones(batch_size, dtype=torch.bool, device=self.device)
        return input_ids.gather(1, first_real_positions(input_ids, attention_mask))[:, 0] != start

    def _start_from_document_start(self, cache: Cache, batch_size: int, input_ids: torch.LongTensor | None,
                                   attention_mask: torch.Tensor | None) -> None:
        """Puts in `cache`, which has read nothing, the state after the document-start token, for the rows whose
        prompt does not begin with it (the others stay at zeros). It counts no position: the cache's length stays
        the prompt's.

        The token is EOS (`tokenization.document_start_id`): lm-lstm's training text has it before every document,
        and starts from zeros only where a stream begins. A prompt read from zeros gets poor first predictions,
        byte-token junk on small character models. Generation without a prompt starts from the token itself.
        """
        rows = self._rows_to_start(batch_size, input_ids, attention_mask)
        if rows is None or not bool(rows.any()):
            return
        start = torch.full((batch_size, 1), self.config.eos_token_id, dtype=torch.long, device=rows.device)
        self.model(input_ids=start, attention_mask=rows[:, None].long(), cache=cache, use_cache=True)
        for layer in cache.layers:
            layer.seen_tokens = 0

    def _with_document_start(self, input_ids: torch.LongTensor,
                             attention_mask: torch.Tensor | None) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """`(batch, length + 1)` inputs and mask: the document-start token before each prompt that does not begin
        with it, a padding position before the others; what `_start_from_document_start` puts in a cache."""
        rows = self._rows_to_start(input_ids.shape[0], input_ids, attention_mask)
        if rows is None or not bool(rows.any()):
            return input_ids, attention_mask
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        before_first = first_real_positions(input_ids, attention_mask)  # in the shifted row: before the first
        input_ids = F.pad(input_ids, (1, 0)).scatter(1, before_first, self.config.eos_token_id)
        mask = F.pad(mask, (1, 0)).scatter(1, before_first, rows[:, None].to(mask.dtype))
        return input_ids, mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the causal language-modelling loss, **shifted inside the model** (`labels = input_ids`
                works). Values in `[0, vocab_size)`, or -100 for positions to ignore. The loss honours
                `num_items_in_batch` in `kwargs`, so `Trainer`'s gradient accumulation is exact. Instead of
                `labels`, `shift_labels` in `kwargs` gives the target of every position itself (no shift), as when
                the next block continues the sequence and the state is carried. `label_smoothing` in `kwargs`
                (a float in [0, 1)) smooths the targets as `torch.nn.functional.cross_entropy` does.
                In training, the AR and TAR penalties of the config are added to the loss.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0: all), or for the given positions.

        The other arguments are those of [`LSTMModel.forward`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        shift_labels = kwargs.get("shift_labels")
        if (
            use_cache
            and cache is not None
            and not is_tracing()  # before the shape test, which a dynamic length would turn into a guard
            and input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and attention_mask is None
            and inputs_embeds is None
            and labels is None
            and shift_labels is None
            and return_dict
            and not output_hidden_states
            and not kwargs.get("output_attentions")
            and isinstance(logits_to_keep, int)
            and logits_to_keep >= 0  # a negative count keeps no position of one
        ):
            plan = self._decoding_plan(cache, input_ids)
            if plan is not None:
                return self._decoding_step(input_ids, cache, plan)
        for targets in (labels, shift_labels):
            if targets is not None:
                self._check_labels(targets)
        has_targets = labels is not None or shift_labels is not None
        penalize = has_targets and self.training and self._has_activation_penalties
        # A tuple, not a second `ModelOutput`, which costs more than a small one-token step.
        last_hidden_state, *returned = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states or penalize,
            return_dict=False,
            output_attentions=kwargs.get("output_attentions"),  # refused there
        )
        layer_outputs = returned.pop() if output_hidden_states or penalize else None
        returned_cache = returned[0] if returned else None
        hidden_states = slice_logits_to_keep(last_hidden_state, logits_to_keep)
        logits = self._output_logits(hidden_states, transposed_weights(returned_cache))

        loss = None
        if has_targets:
            loss = causal_lm_loss(
                logits, labels, shift_labels, kwargs.get("num_items_in_batch"), kwargs.get("label_smoothing", 0.0)
            )
        if penalize:
            real_positions = real_position_mask(attention_mask, shift_labels, last_hidden_state)
            loss = loss + self._activation_penalties(
                last_hidden_state, layer_outputs[-1], real_positions, kwargs.get("num_items_in_batch")
            )
        all_hidden_states = layer_outputs if output_hidden_states else None

        if not return_dict:
            output = (logits,) + tuple(v for v in (returned_cache, all_hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=returned_cache, hidden_states=all_hidden_states)

    def _decoding_plan(self, cache: Cache, input_ids: torch.LongTensor) -> DecodingPlan | None:
        """The `DecodingPlan` of `cache` for a step on `input_ids`, made where it has none that serves; None where the
        step takes `forward`'s general path: in training (of any module), under autograd or autocast, with module
        hooks or wrappers, before every layer of `cache` holds a state of this batch in the weights' dtype, and while
        `step_kernel` is still timing its kernels."""
        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type):
            return None
        batch_size = input_ids.shape[0]
        plan = getattr(cache, "decoding_plan", None)
        if plan is None or not plan.serves(self, batch_size):
            plan = cache.decoding_plan = self._make_decoding_plan(cache, batch_size)
        return plan

    def _make_decoding_plan(self, cache: Cache, batch_size: int) -> DecodingPlan | None:
        """A new `DecodingPlan` for `cache`, or None (see `_decoding_plan`)."""
        layers, head = self.model.layers, self.lm_head
        if any(type(layer.rnn) is not nn.LSTM for layer in layers) or any(
            is_changed_by_a_call(module) for module in self.modules() if module is not self
        ):
            return None  # before any kernel work: steps with hooks or dropout ask at every step
        prepare_cache(cache, self.config)
        transposed = transposed_weights(cache)
        layer_arguments = []
        for layer, layer_cache in zip(layers, cache.layers):
            rnn, states = layer.rnn, layer_cache.recurrent_states
            if not all(
                layer_cache.is_recurrent_states_initialized[slot]
                and states[slot].shape == (batch_size, layer.hidden_size)
                and states[slot].dtype == rnn.weight_hh_l0.dtype
                for slot in (HIDDEN_STATE, CELL_STATE)
            ):
                return None
            kernels = [step_kernel(states[HIDDEN_STATE], weight, transposed) for weight in rnn.all_weights[0][:2]]
            if any(isinstance(kernel, functools.partial) for kernel in kernels):
                return None  # still timed: by the general path's steps
            layer_arguments.append(lstm_cell_arguments(rnn, *kernels, transposed))
        kernel = self._output_kernel(cache.layers[-1].recurrent_states[HIDDEN_STATE], transposed)
        if isinstance(kernel, functools.partial):
            return None
        weight = None if kernel is None else linear_weight(kernel, head.weight, transposed)
        head_arguments = None if weight is None else (weight, head.bias)
        return DecodingPlan(self, batch_size, tuple(layer_arguments), head_arguments)

    def _decoding_step(self, input_ids: torch.LongTensor, cache: Cache, plan: DecodingPlan) -> CausalLMOutputWithPast:
        """`forward` for one token a row after `cache`, in evaluation, returning the logits and the cache: the steady
        state of generation. The same checks, kernels and results as the general path, with `plan`'s tensors, without
        the preparation for padding, dropout, targets and hidden states and the layer modules' calls, which cost more
        than a small model's step (benchmarks/README.md)."""
        model = self.model
        rows = model.embed(input_ids)[:, 0]
        states = model._initial_states(cache, input_ids.shape[0])
        for layer, (hidden, cell), cell_arguments in zip(model.layers, states, plan.layers):
            if cell_arguments is None or hidden is None:
                _, hidden, cell = layer._step(rows[:, None], hidden, cell, transposed_weights(cache))
            else:
                hidden, cell = torch.lstm_cell(rows, (hidden, cell), *cell_arguments)
            store_state(cache, layer.layer_idx, hidden, cell, 1)
            rows = hidden
        if plan.head is None:
            logits = self._output_logits(rows[:, None], transposed_weights(cache))
        else:
            logits = F.linear(rows[:, None], *plan.head)
        return decoding_step_output(logits, cache)

    def _output_kernel(
        self, rows: torch.Tensor, transposed: TransposedWeights | None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """`step_kernel`'s choice for the output layer on a one-token step's `(batch, features)` rows; None where the
        layer is called as it is: not a plain `nn.Linear` on a plain weight, or traced."""
        head = self.lm_head
        # `step_matmul` takes plain weights only: a quantiser's tensor subclass (torchao's `Int8Tensor`) implements
        # `F.linear` but not the `torch.mm` that `step_matmul` calls.
        if type(head) is not nn.Linear or type(head.weight) not in (torch.Tensor, nn.Parameter) or is_tracing():
            return None
        return step_kernel(rows, head.weight, transposed)

    def _output_logits(self, hidden_states: torch.Tensor, transposed: TransposedWeights | None) -> torch.Tensor:
        """`lm_head` on the hidden states; by `step_kernel`'s choice for a one-token step (with the cache's
        `transposed` copies)."""
        head = self.lm_head
        if hidden_states.shape[1] != 1:
            return head(hidden_states)
        rows = hidden_states[:, 0]
        kernel = self._output_kernel(rows, transposed)
        if kernel is None or kernel is F.linear:
            return head(hidden_states)
        weight = linear_weight(kernel, head.weight, transposed)
        if weight is not None:
            return F.linear(hidden_states, weight, head.bias)
        logits = kernel(rows, head.weight)
        if head.bias is not None:
            logits = logits + head.bias
        return logits.contiguous()[:, None]

    @property
    def _has_activation_penalties(self) -> bool:
        return self.config.activation_regularization > 0 or self.config.temporal_activation_regularization > 0

    def _activation_penalties(
        self,
        dropped_output: torch.Tensor,
        raw_output: torch.Tensor,
        real: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """AR + TAR (AWD-LSTM) on the last layer's `(batch, time, features)` output: mean squares over the features,
        averaged over the `real` positions (`(batch, time)` bool), or over `num_items_in_batch` as the loss is (exact
        under gradient accumulation)."""
        real_pairs = real[:, 1:] & real[:, :-1]
        # Masked sums rather than boolean indexing, whose output size would depend on the data when traced.
        activation = (dropped_output.float().pow(2).mean(-1) * real).sum()
        temporal = ((raw_output[:, 1:] - raw_output[:, :-1]).float().pow(2).mean(-1) * real_pairs).sum()
        count = num_items_in_batch if num_items_in_batch is not None else real.sum().clamp(min=1)
        config = self.config
        return (
            config.activation_regularization * activation + config.temporal_activation_regularization * temporal
        ) / count

    def _check_labels(self, labels: torch.Tensor) -> None:
        if is_tracing():
            return
        vocab_size = self.config.vocab_size
        invalid = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bool(invalid.any()):
            raise ValueError(
                f"`labels` must be in [0, {vocab_size}) or -100 (ignored), got {int(labels[invalid][0])}."
            )


# transformers' `prepare_inputs_for_generation` reads `inspect.signature(self.forward)` at every generated token for
# models registered for the Auto classes, as these are: given here once (it cost 0.15 ms a token on an AVX2 EPYC).
LSTMForCausalLM.forward.__signature__ = inspect.signature(LSTMForCausalLM.forward)

__all__ = ["LSTMForCausalLM", "LSTMModel", "LSTMPreTrainedModel"]
