"""A checkpoint's tensors as numpy arrays, without PyTorch and without running its code.

A `.pth` is a pickle, and unpickling runs whatever callables the pickle names: `torch.load`
of an untrusted file executes code. Here the pickle goes through an unpickler that resolves
only the names a state dict is made of (`collections.OrderedDict`, torch's tensor rebuild
functions, the float32/float16/bfloat16 and int64 storage types); any other name stops the
read with one line naming it, before anything could call it. The callables it does resolve
are stand-ins that only record their arguments; tensors are cut from the raw storage bytes
with numpy afterwards.

Formats: torch.save's zip (`<name>/data.pkl`, `<name>/data/<storage key>`,
`<name>/byteorder`), the legacy format of PyTorch < 1.6 (pickles one after another, then
each storage's bytes), and `.safetensors` (the `safetensors` package reads it into numpy).
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

StateDict = dict[str, np.ndarray]

# storage types a state dict uses -> numpy dtype ("bfloat16" is widened to float32 on read)
_STORAGES = {"FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
_REBUILDS = ("_rebuild_tensor_v2", "_rebuild_parameter")
_CODES = {"float32": "f4", "float16": "f2", "int64": "i8"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py's MAGIC_NUMBER


class CheckpointError(Exception):
    """The checkpoint cannot be read (or was refused); the message names the file and why."""


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` and its siblings resolve to: a dtype, not a callable."""

    name: str
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


class _TensorRecord:
    """What a tensor rebuild resolves to: its arguments, nothing run."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("refused: state set on a tensor")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRecord:
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a state dict is made of; storages come from `storages`."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in _REBUILDS:
            return _rebuild_tensor if name == "_rebuild_tensor_v2" else _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        raise CheckpointError(f"refused {module}.{name}: a state dict holds only tensors "
                              "(nothing in it was run)")

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds a view's metadata
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise CheckpointError(f"refused persistent id {str(pid)[:80]}: not a tensor storage")
        storage = _Storage(pid[1].dtype, str(pid[2]), pid[4])
        self.storages.setdefault(storage.key, storage)
        return storage


def read_state_dict(path: Path) -> StateDict:
    """`path`'s tensors by name (float arrays as float32, int64 kept), read without running
    anything it names. Raises CheckpointError with one line naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if path.suffix == ".safetensors":
            tensors = _read_safetensors(path)
        elif head.startswith(b"PK"):  # a zip, whole or not
            tensors = _read_zip(path)
        elif head.startswith(b"\x80"):  # a pickle's PROTO opcode
            tensors = _read_legacy(path)
        else:
            raise CheckpointError("neither a torch.save zip, a legacy torch file, nor "
                                  ".safetensors")
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            KeyError, IndexError, struct.error, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None
    return _strip_common_prefix(tensors)


def _read_zip(path: Path) -> StateDict:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError("a zip without one <name>/data.pkl: not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        order = "little"
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode(errors="replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"unknown byte order {order!r}")
        storages: dict[str, _Storage] = {}
        root = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()

        def data(storage: _Storage) -> bytes:
            name = f"{prefix}data/{storage.key}"
            if name not in names:
                raise CheckpointError(f"storage {storage.key} is missing from the archive")
            # read no more than the tensors need: a deflated member cannot inflate past it
            with archive.open(name) as member:
                return member.read(storage.numel * _ITEMSIZE[storage.dtype])

        return _tensors(root, {k: _array(s, data(s), order) for k, s in storages.items()})


def _read_legacy(path: Path) -> StateDict:
    with open(path, "rb") as f:
        no_names: dict[str, _Storage] = {}
        if _StateDictUnpickler(f, no_names).load() != _LEGACY_MAGIC:
            raise CheckpointError("not a torch checkpoint (no magic number)")
        _StateDictUnpickler(f, no_names).load()   # protocol version
        _StateDictUnpickler(f, no_names).load()   # sys_info
        storages: dict[str, _Storage] = {}
        root = _StateDictUnpickler(f, storages).load()
        keys = _StateDictUnpickler(f, no_names).load()
        if not isinstance(keys, list):
            raise CheckpointError("legacy storage list is missing")
        arrays = {}
        for key in keys:
            storage = storages.get(str(key))
            (numel,) = struct.unpack("<q", f.read(8))
            if storage is None or numel != storage.numel:
                raise CheckpointError(f"legacy storage {key} does not match its tensors")
            data = f.read(numel * _ITEMSIZE[storage.dtype])
            arrays[storage.key] = _array(storage, data, "little")
        return _tensors(root, arrays)


def _array(storage: _Storage, data: bytes, order: str) -> np.ndarray:
    """A storage's flat values in native order: float32 for every float type, or int64."""
    need = storage.numel * _ITEMSIZE[storage.dtype]
    if storage.numel < 0 or len(data) < need:
        raise CheckpointError(f"storage {storage.key} holds {len(data)} bytes, its tensors need "
                              f"{need} (truncated?)")
    end = "<" if order == "little" else ">"
    if storage.dtype == "bfloat16":  # bfloat16 is the upper half of a float32
        upper = np.frombuffer(data, f"{end}u2", storage.numel).astype(np.uint32)
        return (upper << 16).view(np.float32)
    values = np.frombuffer(data, f"{end}{_CODES[storage.dtype]}", storage.numel)
    return values.astype(np.int64 if storage.dtype == "int64" else np.float32)


def _tensors(root: Any, storages: dict[str, np.ndarray]) -> StateDict:
    """The top-level mapping's tensors as arrays."""
    if not isinstance(root, dict):
        raise CheckpointError(f"holds a {type(root).__name__}, not a state dict")
    out: StateDict = {}
    for key, value in root.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRecord):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor: "
                                  "not a state dict")
        out[key] = _cut(key, value, storages)
    return out


def _cut(key: str, record: _TensorRecord, storages: dict[str, np.ndarray]) -> np.ndarray:
    """The tensor `record` describes, copied out of its storage (bounds checked)."""
    storage, offset, size, stride = record.storage, record.offset, record.size, record.stride
    ok = (isinstance(storage, _Storage) and isinstance(offset, int) and offset >= 0
          and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
          and all(isinstance(v, int) and v >= 0 for v in (*size, *stride)))
    if not ok:
        raise CheckpointError(f"tensor {key!r} is malformed")
    flat = storages[storage.key]
    if 0 in size:
        return np.zeros(size, flat.dtype)
    if not size:  # a scalar (num_batches_tracked): as_strided would not keep it 0-d
        if offset >= len(flat):
            raise CheckpointError(f"tensor {key!r} reaches past its storage (truncated?)")
        return np.array(flat[offset])
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= len(flat):
        raise CheckpointError(f"tensor {key!r} reaches past its storage (truncated?)")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False)
    return np.array(view)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"not a readable .safetensors file: {exc}") from None
    return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in tensors.items()}


def _strip_common_prefix(tensors: StateDict) -> StateDict:
    """Keys saved from a DataParallel wrapper ("module.inc...") as the model names them."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors
