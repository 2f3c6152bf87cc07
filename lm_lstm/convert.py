"""Converting classic LSTM language-model checkpoints into lm-lstm model folders (`lm-lstm convert`), in the style
of transformers' `convert_*_checkpoint` scripts.

Two sources, each an `RNNModel` of embedding `encoder`, LSTM layers and output layer `decoder` (an `nn.Linear`, tied
to the encoder or not), reading text as their `data.Corpus` does (whitespace-separated words, `<eos>` at every line end):

- `pytorch-example`: PyTorch's word-level language model (https://github.com/pytorch/examples,
  `word_language_model/model.py`): one multi-layer `nn.LSTM` named `rnn` (keys `rnn.weight_ih_l0`, ...,
  `rnn.bias_hh_l{n-1}`). Its `main.py` saves the whole model (`torch.save(model, f)`); a `state_dict()` works too.
- `awd-lstm`: AWD-LSTM (https://github.com/salesforce/awd-lstm-lm, `model.py`): a `ModuleList` `rnns` of one-layer
  `nn.LSTM`s, each wrapped in `WeightDrop` when trained with weight drop (`rnns.0.module.weight_ih_l0`,
  `rnns.0.module.weight_hh_l0_raw`, ...; `rnns.0.weight_hh_l0` without it). Layer l reads `ninp` if l == 0 else
  `nhid` features and has `nhid` units, except the last, which has `ninp` when tied. `weight_hh_l0_raw` is the weight
  before DropConnect, the one the model uses in evaluation. Its `main.py` saves `[model, criterion, optimizer]`; only
  a plain softmax converts (a `SplitCrossEntropyLoss` with splits, used for vocabularies over 75,000 words, is
  refused).

Both layouts are exactly `LSTMConfig`'s (every layer `hidden_size` but the last, `embedding_size` when tied), so the
weights are copied unchanged and the converted model's logits equal the source's. Dropouts do not change logits in
evaluation; the config records the source's dropouts when a whole pickled model holds them (the example's `drop.p`
as input and output dropout and its LSTM's `dropout` as hidden dropout; AWD-LSTM's `dropoute`, `dropouti`,
`dropouth`, `dropout` and its `WeightDrop` probability), 0 otherwise. AR / TAR (training arguments) are not recorded.

Loading runs no code from the checkpoint. `.safetensors` files hold tensors only. PyTorch files are read with
`torch.load(weights_only=True)`, torch's restricted unpickler (tensors and plain containers; every other global is
refused), or, for the legacy format of torch < 1.6, whose whole-model pickles that unpickler cannot read, with
`LegacyUnpickler`, which applies the same rules. A whole pickled model names the source's classes (`model.RNNModel`,
`torch.nn.modules.rnn.LSTM`, `weight_drop.WeightDrop`, ...): those names, found beforehand by reading the pickle's
opcodes (`pickletools`, which executes nothing), are allow-listed as inert stand-in classes (`StandIn`) that only keep
the pickled attributes, and the few functions such pickles call (`INERT_FUNCTIONS`) as functions that do nothing; the
source's code is never imported or called. A pickle that names anything else (such as `os.system`) is refused with a
`CheckpointError` that says how to export a `state_dict` instead. No option turns this off. A tensor that reaches past
its storage is refused too (torch would grow the storage with uninitialised memory): `LegacyUnpickler` checks each
one and allocates storages that cannot grow; torch's zip loader refuses them itself.

Every weight must be floating point (float16, bfloat16, float32 or float64), finite and within float32's range: the
converted model stores float32. All checks run before anything is written, and the folder is written beside the
output folder and moved into place only once the saved model's logits match the source's, so a failed conversion
leaves nothing behind.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import pickletools
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .card import ConversionSummary, write_conversion_card
from .configuration_lstm import LSTMConfig
from .data import DataError, file_digest, utf8_chunks
from .messages import first_line
from .modeling_lstm import LSTMForCausalLM
from .output_dir import staged_output_dir
from .tokenization import LINE_END, UNKNOWN_WORD, word_tokenizer
from .training import configure_generation

PYTORCH_EXAMPLE, AWD_LSTM = "pytorch-example", "awd-lstm"
SOURCES: tuple[str, ...] = (PYTORCH_EXAMPLE, AWD_LSTM)
SOURCE_NAMES = {
    PYTORCH_EXAMPLE: "PyTorch word_language_model example",
    AWD_LSTM: "AWD-LSTM (salesforce/awd-lstm-lm)",
}
SOURCE_URLS = {
    PYTORCH_EXAMPLE: "https://github.com/pytorch/examples/tree/main/word_language_model",
    AWD_LSTM: "https://github.com/salesforce/awd-lstm-lm",
}
SUPPORTED_FORMATS = (
    "pytorch-example (encoder.weight, rnn.weight_ih_l0 ... rnn.bias_hh_l{n-1}, decoder.weight, decoder.bias) or "
    "awd-lstm (encoder.weight, rnns.{i}.module.weight_ih_l0 / weight_hh_l0_raw / bias_ih_l0 / bias_hh_l0, "
    "decoder.weight, decoder.bias)"
)
# Class names of the two codebases that whole pickles (models, AWD-LSTM's criterion, cached `data.Corpus`) hold, in
# any module; and name prefixes of torch classes that a pickled model or optimizer holds. Each becomes a `StandIn`.
SOURCE_CLASS_NAMES = frozenset(
    {"RNNModel", "WeightDrop", "LockedDropout", "SplitCrossEntropyLoss", "Corpus", "Dictionary"}
)
TORCH_STAND_IN_PREFIXES = ("torch.nn.modules.", "torch.nn.backends.", "torch.optim.")
# Functions that pickled models, optimizers and criteria call, each replaced by an inert function: an optimizer's
# `state` and AWD-LSTM's criterion's `stats` are `defaultdict(dict)` / `defaultdict(list)` (read as plain dicts), and
# AWD-LSTM's `WeightDrop` sets each LSTM's `flatten_parameters` to one of its own methods, which pickles as
# `getattr(weight_drop, "widget_demagnetizer_y2k_edition")` (read as None).
INERT_FUNCTIONS = frozenset({"builtins.dict", "builtins.list", "collections.defaultdict", "builtins.getattr"})
AWD_LSTM_SPLIT_VOCABULARY = 75000  # AWD-LSTM's main.py uses a split softmax above this vocabulary size
CHECK_SHAPE = (2, 16)  # random token ids on which a conversion compares its logits with the source's
CHECK_TOLERANCE = 1e-4  # largest absolute logit difference a conversion accepts (float32 gives ~1e-6)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where a dict checkpoint may nest the weights


class CheckpointError(ValueError):
    """A checkpoint or vocabulary that cannot be converted; the message says what is wrong and what to do."""


class StandIn:
    """An inert stand-in for a class named in a pickle: unpickling creates it without running any code and stores the
    pickled attributes in it. `source_name` (on each subclass) is the name the pickle gave."""

    source_name = "?"

    def __init__(self, *args, **kwargs):  # a pickle may call the class (REDUCE): keep the arguments, do nothing
        self.__dict__["_stand_in_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(part, (dict, type(None))) for part in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stand_in_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {type(self).source_name}>"


@functools.cache
def stand_in_class(name: str) -> type[StandIn]:
    """The `StandIn` subclass that replaces the pickled global `name` (one class per name, the same on every call)."""
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"source_name": name, "__module__": __name__})


def _empty_dict(*args, **kwargs) -> dict:
    return {}


def _nothing(*args, **kwargs) -> None:
    return None


def is_stand_in_name(name: str) -> bool:
    """Whether the pickled global `name` is replaced by a `StandIn`: a class of either source codebase or a torch
    module, backend or optimizer class."""
    return name.rsplit(".", 1)[-1] in SOURCE_CLASS_NAMES or name.startswith(TORCH_STAND_IN_PREFIXES)


def _qualified(module: str, name: str) -> str:
    """The name torch's unpickler looks a GLOBAL up by (Python 2 names mapped as it does)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _is_zip(path: Path) -> bool:
    """Whether `path` is in torch.save's zip format (checked as torch does, by the first bytes)."""
    with path.open("rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def _globals_in_pickle(stream, into: set[str]) -> None:
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            module, name = argument.split(" ", 1)
            into.add(_qualified(module, name))


def pickled_globals(path: str | Path) -> set[str]:
    """The globals (classes and functions, as "module.name") that a `torch.save` file names, read from the pickle's
    opcodes without executing it: the zip format of torch >= 1.6 and the legacy format before it.

    Raises `CheckpointError` if the file is neither.
    """
    path = Path(path)
    names: set[str] = set()
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as archive:
                records = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not records:
                    raise ValueError("no data.pkl")
                for record in records:
                    _globals_in_pickle(io.BytesIO(archive.read(record)), names)
        else:
            with path.open("rb") as stream:
                if stream.read(1) != pickle.PROTO:  # torch.save's legacy format starts with a protocol-2 pickle
                    raise ValueError("neither a zip archive nor a pickle")
                stream.seek(0)
                for _ in range(4):  # magic number, protocol version, system info, the object
                    _globals_in_pickle(stream, names)
    except (ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save) nor a .safetensors file ({error})."
        ) from None
    return names


def _refusal(path: Path, reason: str, vocabulary: bool = False) -> CheckpointError:
    if vocabulary:
        advice = ("A vocabulary file must be a word list (one word per line) or the source's corpus cache (a "
                  "torch.save'd data.Corpus or data.Dictionary, such as AWD-LSTM's corpus.*.data).")
    else:
        advice = (f"If you trust the file, export its weights where it was made: python -c \"import torch; "
                  f"m = torch.load('{path.name}', weights_only=False); torch.save((m[0] if isinstance(m, list) else m)"
                  ".state_dict(), 'state_dict.pt')\" and convert state_dict.pt.")
    return CheckpointError(f"refusing to unpickle {path}: {reason}; nothing in it was run. {advice}")


def _allow_list(names: Iterable[str]) -> dict[str, object]:
    """What each of the pickled globals `names` that a checkpoint of either source may hold is read as."""
    allowed: dict[str, object] = {name: stand_in_class(name) for name in names if is_stand_in_name(name)}
    allowed.update({name: _nothing if name == "builtins.getattr" else _empty_dict
                    for name in names if name in INERT_FUNCTIONS})
    return allowed


def _not_a_source_global(names: Iterable[str]) -> str:
    return f"it names {', '.join(sorted(names))}, which a PyTorch word_language_model or AWD-LSTM checkpoint does not"


def _python_name(torch_name: str) -> str:
    """The name Python's unpickler resolves a global that torch's restricted unpickler reports as `torch_name` to
    (torch maps fewer Python 2 names: it reports `subprocess.Popen`, pickled as `commands Popen`, as
    `commands.Popen`)."""
    module, _, name = torch_name.rpartition(".")
    return _qualified(module, name) if module else torch_name


def load_torch_file(path: str | Path, vocabulary: bool = False) -> object:
    """Loads a `torch.save` file without running code from it.

    The classes it names are replaced by `StandIn`s where `is_stand_in_name` allows, the functions in
    `INERT_FUNCTIONS` by functions that do nothing. Files of the zip format (torch >= 1.6) are read with
    `torch.load(weights_only=True)` and those stand-ins allow-listed; legacy files with `LegacyUnpickler`, the same
    rules for the format whose whole models torch's safe loader cannot read. Raises `CheckpointError` (one line) if
    the file names anything else, such as `os.system` (advising how to export a state_dict, or for a `vocabulary`
    what a vocabulary file must be), or is not a checkpoint.
    """
    path = Path(path)
    names = pickled_globals(path)
    allowed = _allow_list(names)
    if not _is_zip(path):
        refused = names - allowed.keys() - LEGACY_GLOBALS.keys()
        if refused:
            raise _refusal(path, _not_a_source_global(refused), vocabulary)
        return load_legacy_torch_file(path, allowed, vocabulary)
    try:
        with torch.serialization.safe_globals([(value, name) for name, value in allowed.items()]):
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if refused:
                raise _refusal(path, _not_a_source_global(map(_python_name, refused)), vocabulary)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, _torch_refusal_reason(error), vocabulary) from None
    except RuntimeError as error:
        if "storage that is not resizable" in str(error):  # torch refuses a tensor that reaches past its storage
            raise CheckpointError(
                f"{path}: not a checkpoint lm-lstm can read: a tensor reaches past its storage."
            ) from None
        raise _malformed(path, error) from None
    except (ValueError, EOFError, zipfile.BadZipFile, TypeError, AttributeError, IndexError, KeyError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise _malformed(path, error) from None


def _torch_refusal_reason(error: pickle.UnpicklingError) -> str:
    """The reason in `torch.load(weights_only=True)`'s long error message (the line after "WeightsUnpickler error:")."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        after = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if after:
            return after[0]
    return first_line(error)


class _StorageType:
    """What a legacy pickle's storage class (`torch.FloatStorage`, `torch.cuda.HalfStorage`, ...) is read as."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class RefusedGlobal(pickle.UnpicklingError):
    """Raised by `LegacyUnpickler` for what `torch.load(weights_only=True)` would refuse: a global, persistent id or
    object state outside its rules."""


class MalformedCheckpoint(pickle.UnpicklingError):
    """Raised by `LegacyUnpickler` for a pickle whose values cannot be a checkpoint's (such as a tensor larger than its
    storage)."""


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tensor_extent(storage: object, storage_offset: object, size: object, stride: object) -> None:
    """Refuses a pickled tensor that would reach past its storage (`storage_offset` plus the extent its `size` and
    `stride` span, in elements, over the storage's element count), which torch would grow with uninitialised
    memory, or whose geometry is not non-negative integers. Raises `MalformedCheckpoint`."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise MalformedCheckpoint(f"a tensor is built on a {type(storage).__name__}, not a storage")
    if not (_is_index(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_is_index, size)) and all(map(_is_index, stride))):
        raise MalformedCheckpoint(
            f"a tensor has storage offset {storage_offset!r}, size {size!r} and stride {stride!r}; expected "
            "non-negative integers, one stride per dimension"
        )
    extent = 0 if 0 in size else 1 + sum((length - 1) * step for length, step in zip(size, stride))
    if storage_offset + extent > storage._size():
        raise MalformedCheckpoint(
            f"a tensor of size {tuple(size)} (stride {tuple(stride)}, storage offset {storage_offset}) reaches past "
            f"its storage of {storage._size():,} elements"
        )


def _within_storage(rebuild):
    """`torch._utils._rebuild_tensor(_v2)`, refusing a tensor that reaches past its storage (`check_tensor_extent`)."""
    @functools.wraps(rebuild)
    def checked(storage, storage_offset, size, stride, *args):
        check_tensor_extent(storage, storage_offset, size, stride)
        return rebuild(storage, storage_offset, size, stride, *args)

    return checked


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
LEGACY_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "collections.Counter": Counter,
    "builtins.set": set,
    "torch.Size": torch.Size,
    "torch.nn.parameter.Parameter": nn.Parameter,  # how torch < 1.0 pickled parameters: Parameter(data, requires_grad)
    "torch._utils._rebuild_tensor": _within_storage(torch._utils._rebuild_tensor),
    "torch._utils._rebuild_tensor_v2": _within_storage(torch._utils._rebuild_tensor_v2),
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    **{f"{module}.{name}": _StorageType(dtype) for module in ("torch", "torch.cuda")
       for name, dtype in _STORAGE_DTYPES.items()},
}
"""The globals other than stand-ins that `LegacyUnpickler` accepts: tensors and their storages, and containers (a
subset of what `torch.load(weights_only=True)` accepts)."""
LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization's


class LegacyUnpickler(pickle._Unpickler):
    """A restricted unpickler for `torch.save`'s legacy format (before torch 1.6), under the rules of
    `torch.load(weights_only=True)`: globals only from `allowed` (stand-ins) and `LEGACY_GLOBALS` (looked up, never
    imported), object state set only on stand-ins and `OrderedDict`s, persistent ids only for storages and for the
    classes of pickled modules, which the legacy format records that way (and which must be stand-ins).

    It is Python's own unpickler (`pickle._Unpickler`) with `find_class`, `persistent_load` and BUILD replaced.
    Storages are allocated zeroed (at most `storage_bytes` bytes in all) and filled by `load_legacy_torch_file`.
    They are not resizable (they live in numpy arrays, which torch cannot grow), and a tensor that reaches past its
    storage is refused (`check_tensor_extent`) rather than given uninitialised memory.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream, allowed: dict[str, object], storage_bytes: int):
        super().__init__(stream, encoding="utf-8")
        self.allowed = allowed
        self.storage_bytes = storage_bytes
        self.storages: dict[object, tuple[np.ndarray, int]] = {}  # each storage's bytes and elements, by its key

    def find_class(self, module: str, name: str):
        full_name = _qualified(module, name)
        for table in (self.allowed, LEGACY_GLOBALS):
            if full_name in table:
                return table[full_name]
        raise RefusedGlobal(f"unsupported global {full_name}")

    def persistent_load(self, pid):
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], StandIn):
            return pid[1]
        if kind == "storage" and len(pid) == 6 and isinstance(pid[1], _StorageType):
            _, storage_type, key, _location, numel, view = pid
            if view is not None:
                raise RefusedGlobal("storage views (checkpoints of PyTorch < 0.4) are not supported")
            element_size = torch.empty((), dtype=storage_type.dtype).element_size()
            if key not in self.storages:
                if not _is_index(numel) or numel * element_size > self.storage_bytes:
                    raise MalformedCheckpoint(f"a storage of {numel!r} elements does not fit in the file")
                self.storage_bytes -= numel * element_size
                self.storages[key] = np.zeros(numel * element_size, dtype=np.uint8), numel
            data, _ = self.storages[key]
            if data.size != numel * element_size:
                raise MalformedCheckpoint(f"storage {key!r} is given two sizes")
            return torch.storage.TypedStorage(
                wrap_storage=torch.from_numpy(data).untyped_storage(), dtype=storage_type.dtype, _internal=True
            )
        raise RefusedGlobal(f"unsupported persistent id {kind!r}")

    def load_build(self):
        state = self.stack.pop()
        instance = self.stack[-1]
        if isinstance(instance, StandIn):
            instance.__setstate__(state)
        elif type(instance) is OrderedDict and isinstance(state, dict):
            instance.__dict__.update(state)
        else:
            raise RefusedGlobal(f"refused to set the state of a {type(instance).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def load_legacy_torch_file(path: str | Path, allowed: dict[str, object], vocabulary: bool = False) -> object:
    """Reads a file of `torch.save`'s legacy format (`_use_new_zipfile_serialization=False`, or torch < 1.6) with
    `LegacyUnpickler`: its header pickles, the object, the storage keys, then each storage's raw bytes.

    Raises `CheckpointError` for a global outside `allowed` and `LEGACY_GLOBALS` (advising as `load_torch_file` does
    for `vocabulary`), or a malformed file, such as one with a tensor larger than its storage.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as stream:
        try:
            header = [LegacyUnpickler(stream, {}, 0).load() for _ in range(3)]
            if header[0] != LEGACY_MAGIC_NUMBER or header[1] != LEGACY_PROTOCOL_VERSION:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save).")
            if not (isinstance(header[2], dict) and header[2].get("little_endian", True)):
                raise CheckpointError(f"{path}: saved on a big-endian machine, which is not supported.")
            unpickler = LegacyUnpickler(stream, allowed, size)
            result = unpickler.load()
            keys = LegacyUnpickler(stream, {}, 0).load()
            if not isinstance(keys, list) or sorted(map(repr, keys)) != sorted(map(repr, unpickler.storages)):
                raise CheckpointError(f"{path}: not a checkpoint lm-lstm can read: its storage table does not match "
                                      "its tensors.")
            for key in keys:
                data, numel = unpickler.storages[key]
                count = int.from_bytes(stream.read(8), "little", signed=True)
                if count != numel or stream.readinto(memoryview(data)) != data.size:
                    raise CheckpointError(f"{path}: not a checkpoint lm-lstm can read: storage {key!r} is truncated "
                                          "or malformed.")
        except RefusedGlobal as error:
            raise _refusal(path, first_line(error), vocabulary) from None
        except MalformedCheckpoint as error:
            raise CheckpointError(f"{path}: not a checkpoint lm-lstm can read: {first_line(error)}.") from None
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError, EOFError,
                RuntimeError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise _malformed(path, error, stream.tell()) from None
    return result


def _malformed(path: Path, error: BaseException, offset: int | None = None) -> CheckpointError:
    """The error for a file that fails to load for a reason other than a refusal: the message of torch, pickle or
    zipfile, or, for an error inside Python's own code (a hand-made pickle popping an empty stack, objects nested too
    deeply), what that means, and where in the file (`offset`) if known."""
    if isinstance(error, RecursionError):
        reason = "its objects are nested too deeply"
    elif isinstance(error, EOFError):
        reason = "it is truncated"
    elif type(error) in (RuntimeError, ValueError, zipfile.BadZipFile):
        reason = first_line(error)
    else:  # IndexError, KeyError, TypeError, AttributeError, pickle.UnpicklingError from pickle's opcodes
        reason = "its pickle is malformed" + (f" (near byte {offset:,})" if offset is not None else "")
    return CheckpointError(f"{path}: not a checkpoint lm-lstm can read: {reason}.")


def stand_in_attribute(obj: object, name: str, default=None):
    """An attribute a pickled object held (`StandIn` instances keep them in `__dict__`)."""
    return obj.__dict__.get(name, default) if isinstance(obj, StandIn) else default


MAX_MODULE_DEPTH, MAX_MODULES = 100, 10000  # far beyond either source's models (depth 4, a few dozen modules)


def stand_in_state_dict(module: StandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """The `state_dict()` that the pickled `nn.Module` behind `module` would return: its parameters and persistent
    buffers, then its submodules', under dotted names.

    Raises `CheckpointError` for modules that contain themselves (which no real model does), are nested over
    `MAX_MODULE_DEPTH` deep or number over `MAX_MODULES`.
    """
    state: dict[str, torch.Tensor] = {}
    visits = 0

    def add(module: StandIn, prefix: str, ancestors: tuple[int, ...]) -> None:
        nonlocal visits
        visits += 1
        if visits > MAX_MODULES:
            raise CheckpointError(f"not a checkpoint lm-lstm can read: its model holds over {MAX_MODULES:,} modules.")
        if len(ancestors) > MAX_MODULE_DEPTH:
            raise CheckpointError(
                f"not a checkpoint lm-lstm can read: its modules are nested over {MAX_MODULE_DEPTH} deep."
            )
        parameters = stand_in_attribute(module, "_parameters") or {}
        buffers = stand_in_attribute(module, "_buffers") or {}
        non_persistent = stand_in_attribute(module, "_non_persistent_buffers_set")
        non_persistent = non_persistent if isinstance(non_persistent, (set, frozenset, list, tuple)) else ()
        for tensors, skipped in ((parameters, ()), (buffers, non_persistent)):
            if isinstance(tensors, dict):
                for name, tensor in tensors.items():
                    if isinstance(tensor, torch.Tensor) and name not in skipped:
                        state[prefix + str(name)] = tensor
        children = stand_in_attribute(module, "_modules") or {}
        if isinstance(children, dict):
            for name, child in children.items():
                if isinstance(child, StandIn):
                    if id(child) in ancestors or child is module:
                        raise CheckpointError(
                            f"not a checkpoint lm-lstm can read: its module `{prefix}{name}` contains itself."
                        )
                    add(child, f"{prefix}{name}.", (*ancestors, id(module)))

    add(module, prefix, ())
    return state


def _child(module: object, name: str) -> object:
    children = stand_in_attribute(module, "_modules") or {}
    return children.get(name) if isinstance(children, dict) else None


@dataclass
class SourceCheckpoint:
    """What a classic checkpoint holds: its weights under the source's key names, the source format, and facts read
    from a whole pickled model."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    source: str  # one of SOURCES
    kind: str  # how it was saved, in words
    dropouts: dict[str, float] = field(default_factory=dict)  # LSTMConfig dropout fields found in a pickled model
    notes: list[str] = field(default_factory=list)  # caveats for the user and the card


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _is_model(obj: object) -> bool:
    return isinstance(obj, StandIn) and _child(obj, "encoder") is not None


def _probability(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    return None


def _pickled_dropouts(model: StandIn, source: str) -> dict[str, float]:
    """The LSTMConfig dropouts that a pickled `RNNModel` of `source` records in its attributes (see the module doc)."""
    if source == PYTORCH_EXAMPLE:
        drop = _probability(stand_in_attribute(_child(model, "drop"), "p"))
        found = {"input_dropout": drop, "output_dropout": drop,
                 "hidden_dropout": _probability(stand_in_attribute(_child(model, "rnn"), "dropout"))}
    else:
        attribute = functools.partial(stand_in_attribute, model)
        first_layer = _child(_child(model, "rnns"), "0")
        wrapped = first_layer is not None and type(first_layer).source_name.endswith("WeightDrop")
        found = {
            "embedding_dropout": _probability(attribute("dropoute")),
            "input_dropout": _probability(attribute("dropouti")),
            "hidden_dropout": _probability(attribute("dropouth")),
            "output_dropout": _probability(attribute("dropout")),
            "weight_dropout": _probability(stand_in_attribute(first_layer, "dropout")) if wrapped else 0.0,
        }
    return {name: value for name, value in found.items() if value is not None}


def _check_criterion(objects: Iterable[object], path: Path) -> None:
    """Refuses an AWD-LSTM `SplitCrossEntropyLoss` with splits: a softmax that lm-lstm's output layer cannot express."""
    for obj in objects:
        if isinstance(obj, StandIn) and type(obj).source_name.endswith("SplitCrossEntropyLoss"):
            splits = stand_in_attribute(obj, "splits")
            if isinstance(splits, (list, tuple)) and len(splits) > 2:
                raise CheckpointError(
                    f"{path}: the model was trained with AWD-LSTM's split (adaptive) softmax, splits "
                    f"{list(splits[1:-1])}; lm-lstm's output layer is a plain softmax over the vocabulary, so only "
                    "checkpoints trained with a plain softmax (no splits) can be converted."
                )


def detect_source(keys: Iterable[str]) -> str:
    """The source format (one of `SOURCES`) that state_dict `keys` follow.

    Raises `CheckpointError` naming the supported formats when they match neither (or name a non-LSTM model of
    either codebase: the example's Transformer, AWD-LSTM's QRNN).
    """
    keys = list(keys)
    if any(k.startswith(("transformer_encoder.", "pos_encoder.")) for k in keys):
        raise CheckpointError("this is the PyTorch example's TransformerModel, not an LSTM; only LSTMs convert.")
    if any(k.startswith("rnns.") and ".linear." in k for k in keys):
        raise CheckpointError("this is an AWD-LSTM QRNN model, not an LSTM; only LSTMs convert.")
    if any(k.startswith("rnns.") for k in keys):
        return AWD_LSTM
    if any(k.startswith("rnn.weight_ih_l") for k in keys):
        return PYTORCH_EXAMPLE
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise CheckpointError(f"the checkpoint's keys ({shown or 'none'}) match no supported format: {SUPPORTED_FORMATS}.")


def load_checkpoint(path: str | Path, source: str | None = None) -> SourceCheckpoint:
    """Reads a checkpoint of either source safely (see the module doc): a `.safetensors` or `torch.save` state_dict
    (also nested under "state_dict", "model_state_dict" or "model"), a whole pickled model, or a list such as
    AWD-LSTM's `[model, criterion, optimizer]`. The format is read from the key names; `source` (one of `SOURCES`),
    if given, must match it.

    Raises `CheckpointError` for an unreadable or unsafe file, a format that is neither source (or not `source`), or
    an AWD-LSTM split softmax; `OSError` if the file is missing.
    """
    path = Path(path)
    if source is not None and source not in SOURCES:
        raise CheckpointError(f"`source` must be one of {SOURCES}, got {source!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({error}).") from None
    else:
        obj = load_torch_file(path)

    model = None
    objects = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if isinstance(obj, dict) and not _is_state_dict(obj):
        objects = [obj[key] for key in STATE_DICT_KEYS if key in obj]
    state_dict = next((o for o in objects if _is_state_dict(o)), None)
    if state_dict is not None:
        kind = "state_dict"
    else:
        model = next((o for o in objects if _is_model(o)), None)
        if model is None:
            raise CheckpointError(
                f"{path}: holds a {type(obj).__name__}, neither a model with an `encoder` nor a state_dict of "
                f"tensors; expected {SUPPORTED_FORMATS}."
            )
        _check_criterion(objects, path)
        try:
            state_dict = stand_in_state_dict(model)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        kind = "whole pickled model" + (f" (in a {type(obj).__name__} of {len(objects)})" if len(objects) > 1 else "")
    state_dict = dict(state_dict)
    for kept, dropped in (("decoder.weight", "encoder.weight"), ("encoder.weight", "decoder.weight")):
        if dropped not in state_dict and kept in state_dict:  # a tied model saved without duplicates (safetensors)
            state_dict[dropped] = state_dict[kept]
    detected = detect_source(state_dict)
    if source is not None and source != detected:
        raise CheckpointError(f"{path}: `source` is {source!r}, but its keys are those of {detected!r}.")
    checkpoint = SourceCheckpoint(path=path, state_dict=state_dict, source=detected, kind=kind)
    if model is not None:
        rnn_type = stand_in_attribute(model, "rnn_type")
        if isinstance(rnn_type, str) and rnn_type != "LSTM":
            raise CheckpointError(f"{path}: the model is a {rnn_type}, not an LSTM; only LSTMs convert.")
        checkpoint.dropouts = _pickled_dropouts(model, detected)
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# Vocabularies


def _text_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file as the sources' `Corpus` reads them (in text mode, where LF, CR LF and CR end
    lines), without a byte-order mark at its start.

    Raises `CheckpointError` naming the file and the offset of its first byte that is not UTF-8, `OSError` if it is
    missing.
    """
    try:
        with open(path, encoding="utf-8-sig") as lines:
            yield from lines
    except UnicodeDecodeError:
        try:
            for _ in utf8_chunks(path):  # finds where, as lm-lstm's other commands report it
                pass
        except DataError as error:
            raise CheckpointError(str(error)) from None
        raise


def corpus_vocabulary(paths: Sequence[str | Path]) -> list[str]:
    """The vocabulary, in id order, that the sources' `data.Corpus` builds from `paths`, read in the given order: for
    every line, the words of `line.split()` and then `<eos>`, each new word taking the next id. (`Corpus` reads
    `train.txt`, `valid.txt` and `test.txt`, in that order.) A byte-order mark at a file's start is not a word.

    Raises `CheckpointError` for a file that is not UTF-8, `OSError` for a missing file.
    """
    words: dict[str, int] = {}
    for path in paths:
        for line in _text_lines(path):  # as the example's Corpus.tokenize
            for word in line.split() + [LINE_END]:
                words.setdefault(word, len(words))
    return list(words)


def _is_torch_file(path: Path) -> bool:
    with path.open("rb") as stream:
        head = stream.read(2)
    return head == b"\x80\x02" or _is_zip(path)  # torch.save's legacy format (a protocol-2 pickle), or its zip format


def _check_word_ids(word2idx: dict[object, int], path: Path) -> None:
    """Refuses a word -> id dict whose ids are not exactly 0 ... n - 1, each once: the ids are embedding rows, so
    renumbering them would pair words with other words' rows."""
    if not word2idx:
        return
    words_of: dict[int, list] = {}
    for word, index in word2idx.items():
        words_of.setdefault(index, []).append(word)
    count = len(word2idx)
    shared = next((index for index, words in words_of.items() if len(words) > 1), None)
    outside = next((index for index in words_of if not 0 <= index < count), None)
    if shared is not None:
        words = words_of[shared]
        problem = f"id {shared} is given to {len(words)} words ({', '.join(map(repr, words[:3]))})"
    elif outside is not None:
        problem = f"id {outside} is outside 0 ... {count - 1}"
    else:
        return
    raise CheckpointError(
        f"{path}: its word -> id dict must number its {count:,} words 0 ... {count - 1}, each once (the ids are "
        f"rows of the model's embedding), but {problem}."
    )


def _pickled_vocabulary(obj: object, path: Path) -> list[str]:
    if isinstance(obj, StandIn) and stand_in_attribute(obj, "dictionary") is not None:  # a data.Corpus
        obj = stand_in_attribute(obj, "dictionary")
    if isinstance(obj, StandIn):  # a data.Dictionary
        obj = stand_in_attribute(obj, "idx2word")
    if isinstance(obj, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):  # word2idx
        _check_word_ids(obj, path)
        obj = sorted(obj, key=obj.get)
    if not (isinstance(obj, list) and obj and all(isinstance(word, str) for word in obj)):
        raise CheckpointError(f"{path}: holds no vocabulary (a data.Corpus, data.Dictionary or list of words).")
    return obj


def read_vocabulary(path: str | Path) -> list[str]:
    """Reads a vocabulary in id order: a text file of one word per line (line i is id i), or a `torch.save`d
    `data.Corpus` / `data.Dictionary` (such as AWD-LSTM's cached `corpus.*.data`), read without running code.

    Raises `CheckpointError` for an empty line, a line of several words, text that is not UTF-8 (a byte-order mark
    at its start is skipped), a pickle without a vocabulary, or a word -> id dict whose ids are not 0 ... n - 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such vocabulary file.")
    if _is_torch_file(path):
        return _pickled_vocabulary(load_torch_file(path, vocabulary=True), path)
    words = []
    for number, line in enumerate(_text_lines(path), 1):
        fields = line.split()
        if len(fields) != 1:
            what = "is empty" if not fields else f"holds {len(fields)} words ({line.strip()[:40]!r})"
            raise CheckpointError(f"{path}: line {number} {what}; a vocabulary file has one word per line.")
        words.append(fields[0])
    return words


def vocabulary_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """`word_tokenizer(vocabulary)`, with errors that say what a converted vocabulary needs."""
    if LINE_END not in vocabulary:
        raise CheckpointError(
            f"the vocabulary has no {LINE_END!r}, which both sources add at every line end and lm-lstm starts and "
            "ends documents with; check that it is the model's vocabulary."
        )
    try:
        return word_tokenizer(vocabulary)
    except ValueError as error:
        raise CheckpointError(f"the vocabulary cannot be used: {error}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Weights


@dataclass
class LSTMLayout:
    """The shapes read from a source state_dict: vocabulary, embedding, each layer's hidden size, tying."""

    vocab_size: int
    embedding_size: int
    layer_sizes: list[int]
    tied: bool


def _layer_keys(state_dict: dict[str, torch.Tensor], source: str) -> list[dict[str, str]]:
    """For each layer, bottom to top, the source key of each of lm-lstm's `nn.LSTM` parameter names."""
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    layers = []
    if source == PYTORCH_EXAMPLE:
        count = 0
        while f"rnn.weight_ih_l{count}" in state_dict:
            count += 1
        for layer in range(count):
            layers.append({name: f"rnn.{name[:-1]}{layer}" for name in names})
        return layers
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"rnns\.(\d+)\.", k))}
    for layer in range(max(indices) + 1 if indices else 0):
        prefix = f"rnns.{layer}.module." if any(k.startswith(f"rnns.{layer}.module.") for k in state_dict) \
            else f"rnns.{layer}."
        keys = {name: prefix + name for name in names}
        if prefix + "weight_hh_l0_raw" in state_dict or prefix.endswith("module."):
            keys["weight_hh_l0"] = prefix + "weight_hh_l0_raw"  # WeightDrop's weight before DropConnect
        layers.append(keys)
    return layers


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (
        (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or bool(torch.equal(a, b))
    )


def read_layout(state_dict: dict[str, torch.Tensor], source: str) -> LSTMLayout:
    """Checks a source state_dict key by key and shape by shape and returns its layout.

    Raises `CheckpointError` (one line) naming a missing or unexpected key, a tensor of the wrong shape, a layer that
    is not an LSTM (GRU, plain RNN), sizes that `LSTMConfig` cannot express, or a weight that `check_weight` refuses.
    """
    checked: set[str] = set()

    def tensor(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"the {source} checkpoint lacks `{key}`; expected {SUPPORTED_FORMATS}.")
        if key not in checked:
            check_weight(key, state_dict[key])
            checked.add(key)
        return state_dict[key]

    def expect(key: str, shape: tuple[int, ...], why: str) -> None:
        if _shape(tensor(key)) != shape:
            raise CheckpointError(f"`{key}` has shape {_shape(tensor(key))}, expected {shape} ({why}).")

    encoder = tensor("encoder.weight")
    if encoder.dim() != 2:
        raise CheckpointError(f"`encoder.weight` has shape {_shape(encoder)}, expected (vocabulary, embedding size).")
    vocab_size, embedding_size = _shape(encoder)
    layers = _layer_keys(state_dict, source)
    if not layers:
        raise CheckpointError(f"the {source} checkpoint has no LSTM layer; expected {SUPPORTED_FORMATS}.")
    sizes, input_size = [], embedding_size
    for index, keys in enumerate(layers):
        recurrent = tensor(keys["weight_hh_l0"])
        if recurrent.dim() != 2 or recurrent.shape[1] == 0:
            raise CheckpointError(f"`{keys['weight_hh_l0']}` has shape {_shape(recurrent)}, expected (4 x hidden, hidden).")
        hidden = recurrent.shape[1]
        gates = recurrent.shape[0] / hidden
        if gates != 4:
            kind = {3: "a GRU", 1: "a plain RNN"}.get(gates, "not an LSTM")
            raise CheckpointError(
                f"layer {index} is {kind} (`{keys['weight_hh_l0']}` has shape {_shape(recurrent)}; an LSTM's is "
                "(4 x hidden, hidden)); only LSTMs convert."
            )
        where = f"layer {index}: 4 x hidden size {hidden}"
        expect(keys["weight_ih_l0"], (4 * hidden, input_size), f"{where}, input size {input_size}")
        expect(keys["bias_ih_l0"], (4 * hidden,), where)
        expect(keys["bias_hh_l0"], (4 * hidden,), where)
        sizes.append(hidden)
        input_size = hidden
    # A deduplicated tied checkpoint keeps one of the two.
    decoder = tensor("decoder.weight") if "decoder.weight" in state_dict else encoder
    tied = _same_tensor(decoder, encoder)
    expect("decoder.bias", (vocab_size,), "one bias per word of encoder.weight")
    if "decoder.weight" in state_dict:
        expect("decoder.weight", (vocab_size, sizes[-1]), f"vocabulary {vocab_size} x last layer's size {sizes[-1]}")
    elif sizes[-1] != embedding_size:
        raise CheckpointError("the checkpoint lacks `decoder.weight` and is not tied (last layer size != embedding).")
    used = {"encoder.weight", "decoder.weight", "decoder.bias", *(k for keys in layers for k in keys.values())}
    ignored = {keys["weight_hh_l0"][: -len("_raw")] for keys in layers if keys["weight_hh_l0"].endswith("_raw")}
    unexpected = sorted(set(state_dict) - used - ignored)
    if unexpected:
        raise CheckpointError(
            f"the {source} checkpoint has unexpected keys {', '.join(unexpected[:6])}"
            f"{', ...' if len(unexpected) > 6 else ''} (a bidirectional or projected LSTM, or another model?); "
            f"expected {SUPPORTED_FORMATS}."
        )
    layout = LSTMLayout(vocab_size, embedding_size, sizes, tied)
    lstm_config(layout)  # refuses sizes LSTMConfig cannot express
    return layout


FLOAT_DTYPES = "float16, bfloat16, float32 or float64"


def check_weight(key: str, tensor: torch.Tensor) -> None:
    """Refuses, naming the source's `key`, a weight that does not convert to lm-lstm's float32 weights unchanged: one
    that is not a dense CPU tensor of floating point (complex would lose its imaginary part; integer and bool
    tensors are no trained weights), holds NaN or infinite values, or values beyond float32's range."""
    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        where = tensor.layout if tensor.layout != torch.strided else f"{tensor.device.type} device"
        raise CheckpointError(f"the checkpoint's `{key}` is a tensor of {where}; only dense CPU tensors convert.")
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"the checkpoint's `{key}` is {str(tensor.dtype).removeprefix('torch.')}, not floating point; "
            f"only {FLOAT_DTYPES} weights convert."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"the checkpoint's `{key}` holds NaN or infinite values; it cannot be converted.")
    if tensor.dtype == torch.float64 and not bool(torch.isfinite(tensor.float()).all()):
        raise CheckpointError(
            f"the checkpoint's `{key}` holds values beyond float32's range (largest {float(tensor.abs().max()):.3g}); "
            "lm-lstm's weights are float32."
        )


def lstm_config(layout: LSTMLayout, vocabulary: Sequence[str] | None = None, **fields) -> LSTMConfig:
    """The `LSTMConfig` of a source layout, with the token ids of `<eos>` (padding, BOS, EOS) from `vocabulary` and
    any other fields (dropouts) given; dropouts not given are 0.

    Raises `CheckpointError` if the layer sizes do not fit `LSTMConfig` (every layer `hidden_size` but the last, which
    is `embedding_size` when tied).
    """
    sizes = layout.layer_sizes
    hidden_size = sizes[0] if len(sizes) > 1 or not layout.tied else layout.embedding_size
    expected = [hidden_size] * len(sizes)
    if layout.tied:
        expected[-1] = layout.embedding_size
    if sizes != expected:
        raise CheckpointError(
            f"layer sizes {sizes} (embedding {layout.embedding_size}, {'tied' if layout.tied else 'untied'}) do not "
            "fit LSTMConfig: every layer but the last must have the same size, and the last the embedding size when "
            "tied, the same size otherwise."
        )
    eos = vocabulary.index(LINE_END) if vocabulary is not None and LINE_END in vocabulary else None
    dropouts = dict.fromkeys(
        ("embedding_dropout", "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout"), 0.0
    )
    return LSTMConfig(
        vocab_size=layout.vocab_size, embedding_size=layout.embedding_size, hidden_size=hidden_size,
        num_hidden_layers=len(sizes), tie_word_embeddings=layout.tied,
        pad_token_id=eos, bos_token_id=eos, eos_token_id=eos, **{**dropouts, **fields},
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The source's weights under `LSTMForCausalLM`'s names (`model.embeddings.weight`,
    `model.layers.{i}.rnn.weight_ih_l0`, ..., `lm_head.weight`, `lm_head.bias`), as float32, values unchanged.

    Raises `CheckpointError` as `read_layout` does.
    """
    read_layout(state_dict, source)
    converted = {
        "model.embeddings.weight": state_dict["encoder.weight"],
        "lm_head.weight": state_dict.get("decoder.weight", state_dict["encoder.weight"]),
        "lm_head.bias": state_dict["decoder.bias"],
    }
    for index, keys in enumerate(_layer_keys(state_dict, source)):
        for name, key in keys.items():
            converted[f"model.layers.{index}.rnn.{name}"] = state_dict[key]
    return {name: tensor.detach().float().contiguous() for name, tensor in converted.items()}


def source_logits(state_dict: dict[str, torch.Tensor], source: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits `(batch, time, vocabulary)` of the source model on `input_ids`, from a zero state, computed as the
    source computes them in evaluation (time-major `nn.LSTM`s on the source's own parameter names; float32): a
    reference independent of lm-lstm's model code."""
    weights = {key: tensor.detach().float() for key, tensor in state_dict.items()}
    hidden_states = F.embedding(input_ids.t(), weights["encoder.weight"])  # (time, batch, embedding)
    layers = _layer_keys(weights, source)
    if source == PYTORCH_EXAMPLE:
        sizes = [weights[keys["weight_hh_l0"]].shape[1] for keys in layers]
        rnn = nn.LSTM(hidden_states.shape[-1], sizes[0], len(layers))
        rnn.load_state_dict({key[len("rnn."):]: weights[key] for keys in layers for key in keys.values()})
        hidden_states, _ = rnn(hidden_states)
    else:
        for keys in layers:
            hidden = weights[keys["weight_hh_l0"]].shape[1]
            rnn = nn.LSTM(hidden_states.shape[-1], hidden, 1)
            rnn.load_state_dict({name: weights[key] for name, key in keys.items()})
            hidden_states, _ = rnn(hidden_states)
    decoder = weights.get("decoder.weight", weights["encoder.weight"])
    return F.linear(hidden_states, decoder, weights["decoder.bias"]).transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConversionResult:
    """A finished conversion: where it was written, what it was made from, and how close its logits are."""

    output_dir: Path
    checkpoint: SourceCheckpoint
    config: LSTMConfig
    vocabulary_source: str
    max_logit_difference: float
    checked_tokens: int


def _check_vocabulary_size(layout: LSTMLayout, vocabulary: Sequence[str], origin: str, from_corpus: bool) -> None:
    if len(vocabulary) == layout.vocab_size:
        return
    hint = (
        " The sources' Corpus also adds the words of valid.txt and test.txt, after train.txt's: pass all three, "
        "in that order." if from_corpus and len(vocabulary) < layout.vocab_size else ""
    )
    raise CheckpointError(
        f"the checkpoint has a vocabulary of {layout.vocab_size:,} words (encoder.weight has {layout.vocab_size:,} "
        f"rows) but {origin} gives {len(vocabulary):,}; use the vocabulary the model was trained with.{hint}"
    )


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    vocab_file: str | Path | None = None,
    train_files: Sequence[str | Path] | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Converts a checkpoint of either source into an lm-lstm folder: `model.safetensors`, `config.json` with
    `auto_map` and the model's code files, a word-level tokenizer over the source's vocabulary,
    `generation_config.json` and a card naming the source.

    The vocabulary comes from `vocab_file` (`read_vocabulary`) or, as the sources' `Corpus` builds it, from
    `train_files` (`corpus_vocabulary`); exactly one must be given. The saved folder is loaded back and its logits on
    random token ids compared with `source_logits`.

    Everything is checked before anything is written (weights finite, float, within float32; the source's logits
    finite), and the folder is written beside `output_dir` and moved into place only once its logits match
    (`staged_output_dir`): a failed conversion leaves nothing behind.

    Raises `CheckpointError` (a `ValueError`) for an unsafe, unreadable or mismatched checkpoint or vocabulary,
    `OSError` for missing files or a non-empty `output_dir` (unless `overwrite`), `RuntimeError` if the logits differ
    by more than `CHECK_TOLERANCE`.
    """
    if (vocab_file is None) == (not train_files):
        raise CheckpointError("give the vocabulary as exactly one of a vocabulary file and the training text files.")
    output_dir = Path(output_dir)
    checkpoint = load_checkpoint(checkpoint_path, source)
    layout = read_layout(checkpoint.state_dict, checkpoint.source)
    if vocab_file is not None:
        vocabulary = read_vocabulary(vocab_file)
        origin = f"the vocabulary file {Path(vocab_file).name}"
    else:
        vocabulary = corpus_vocabulary(train_files)
        origin = "the words of " + ", ".join(Path(f).name for f in train_files) + " (in order of first appearance)"
    _check_vocabulary_size(layout, vocabulary, origin, from_corpus=vocab_file is None)
    tokenizer = vocabulary_tokenizer(vocabulary)
    if checkpoint.source == AWD_LSTM and layout.vocab_size > AWD_LSTM_SPLIT_VOCABULARY and checkpoint.kind == "state_dict":
        checkpoint.notes.append(
            f"AWD-LSTM's main.py trains vocabularies over {AWD_LSTM_SPLIT_VOCABULARY:,} words with a split softmax, "
            "which a state_dict does not show; if this model used one, the converted logits are not its probabilities."
        )
    if UNKNOWN_WORD not in vocabulary:
        checkpoint.notes.append(f"The vocabulary has no {UNKNOWN_WORD!r}: encoding a word outside it raises an error.")

    config = lstm_config(layout, vocabulary, **checkpoint.dropouts)
    model = LSTMForCausalLM(config).eval()
    model.load_state_dict(convert_state_dict(checkpoint.state_dict, checkpoint.source))
    configure_generation(model, tokenizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab_size, CHECK_SHAPE, generator=generator)
    with torch.no_grad():
        expected = source_logits(checkpoint.state_dict, checkpoint.source, ids)
    if not bool(torch.isfinite(expected).all()):
        raise CheckpointError(
            "the source model's own logits overflow float32 (its weights are too large), so the converted model's "
            "would too; it cannot be converted."
        )

    with staged_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging).eval()
        with torch.no_grad():
            difference = float((reloaded(ids).logits.float() - expected).abs().max())
        if not difference <= CHECK_TOLERANCE:  # also catches NaN
            raise RuntimeError(
                f"the converted model's logits differ from the source's by {difference:.3g} (> {CHECK_TOLERANCE}); "
                "this is a bug in lm-lstm's conversion, please report it."
            )
        result = ConversionResult(
            output_dir=output_dir, checkpoint=checkpoint, config=config, vocabulary_source=origin,
            max_logit_difference=difference, checked_tokens=math.prod(CHECK_SHAPE),
        )
        write_conversion_card(staging, model, tokenizer, ConversionSummary(
            model_name=output_dir.resolve().name,
            repo_id=str(output_dir),
            source_name=SOURCE_NAMES[checkpoint.source],
            source_url=SOURCE_URLS[checkpoint.source],
            checkpoint_file=checkpoint.path.name,
            checkpoint_sha256=file_digest(checkpoint.path, "sha256"),
            checkpoint_kind=checkpoint.kind,
            vocabulary_source=origin,
            dropouts_recorded=bool(checkpoint.dropouts),
            max_logit_difference=difference,
            checked_tokens=result.checked_tokens,
            notes=list(checkpoint.notes),
            awd_lstm=checkpoint.source == AWD_LSTM,
        ))
    return result


def convert_pytorch_example_checkpoint(
    checkpoint_path: str | Path, output_dir: str | Path, vocab_file: str | Path | None = None,
    train_files: Sequence[str | Path] | None = None, overwrite: bool = False,
) -> ConversionResult:
    """`convert_checkpoint` for a checkpoint of PyTorch's word_language_model example (a whole pickled `RNNModel`
    as its `main.py` saves it, or its `state_dict`); raises `CheckpointError` if it is not one."""
    return convert_checkpoint(checkpoint_path, output_dir, vocab_file, train_files, PYTORCH_EXAMPLE, overwrite)


def convert_awd_lstm_checkpoint(
    checkpoint_path: str | Path, output_dir: str | Path, vocab_file: str | Path | None = None,
    train_files: Sequence[str | Path] | None = None, overwrite: bool = False,
) -> ConversionResult:
    """`convert_checkpoint` for an AWD-LSTM checkpoint (`[model, criterion, optimizer]` as its `main.py` saves it, a
    whole pickled `RNNModel`, or its `state_dict`); raises `CheckpointError` if it is not one."""
    return convert_checkpoint(checkpoint_path, output_dir, vocab_file, train_files, AWD_LSTM, overwrite)


__all__ = [
    "SOURCES", "CheckpointError", "ConversionResult", "SourceCheckpoint", "StandIn", "convert_awd_lstm_checkpoint",
    "convert_checkpoint", "convert_pytorch_example_checkpoint", "convert_state_dict", "corpus_vocabulary",
    "detect_source", "load_checkpoint", "load_torch_file", "lstm_config", "read_layout", "read_vocabulary",
    "source_logits",
]
