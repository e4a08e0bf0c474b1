"""Streaming safetensors I/O with numpy + ml_dtypes: one tensor at a time, no torch, bf16 included.

Why not `safetensors.safe_open(..., framework="numpy")`? numpy has no bfloat16, and safetensors' numpy
backend raises `TypeError: data type 'bfloat16' not understood` on every BF16 tensor (the released
Qwen2.5-Omni weights are all BF16). framework="flax" would put every tensor on a JAX device first and
framework="pt" needs torch, which is only a test dependency here. The format is simple (8-byte little-endian
header length, a JSON header with dtype / shape / data_offsets, then the raw little-endian bytes), so we
parse the header ourselves and `readinto` each tensor's byte range straight into a preallocated numpy array
of the right `ml_dtypes` dtype: exactly one copy, and nothing else of the file is touched.

The writer is the mirror image: the header (all names, dtypes, shapes) is written first, then the tensors
are appended one by one in header order, so a multi-GB shard never has to be held in memory. Files are
written to `<name>.tmp` and renamed when complete. `{"format": "pt"}` metadata is what transformers checks
before loading a file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

__all__ = ["TensorInfo", "SafetensorsFile", "TensorReader", "read_tensor", "SafetensorsWriter",
           "write_safetensors", "index_hf_dir", "dtype_from_name", "ST_TO_NUMPY", "numpy_to_st"]

ST_TO_NUMPY = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NUMPY_TO_ST = {v: k for k, v in ST_TO_NUMPY.items()}

_READ_BLOCK = 1 << 28  # 256 MiB per read call (Linux caps one read() at ~2 GiB)
_MAX_HEADER = 100_000_000  # the safetensors spec's limit


def numpy_to_st(dtype) -> str:
    dt = np.dtype(dtype)
    try:
        return _NUMPY_TO_ST[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} cannot be stored in safetensors") from None


def dtype_from_name(name) -> np.dtype:
    """'bfloat16' / 'bf16' / 'float32' / np.float16 / ml_dtypes.bfloat16 / 'BF16' -> np.dtype."""
    if isinstance(name, str):
        key = name.strip()
        if key in ST_TO_NUMPY:
            return ST_TO_NUMPY[key]
        key = key.lower().removeprefix("torch.").removeprefix("jnp.").removeprefix("np.")
        aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                   "half": "float16", "float": "float32"}
        key = aliases.get(key, key)
        if key == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        if hasattr(ml_dtypes, key):
            return np.dtype(getattr(ml_dtypes, key))
        return np.dtype(key)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: where its bytes are and what they hold."""

    name: str  # the name inside the file
    file: str  # absolute path of the .safetensors file
    dtype: np.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """Header of one .safetensors file plus random access to its tensors (`read(name)`)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"{self.path}: not a safetensors file (header length {n} is implausible)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from None
        size = os.path.getsize(self.path)
        base = 8 + n
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            st_dtype = entry["dtype"]
            if st_dtype not in ST_TO_NUMPY:
                raise ValueError(f"{self.path}: tensor {name} has dtype {st_dtype}, which this reader does not "
                                 f"support ({sorted(ST_TO_NUMPY)})")
            dtype = ST_TO_NUMPY[st_dtype]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
            if stop - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + stop > size:
                raise ValueError(f"{self.path}: tensor {name} ({st_dtype} {list(shape)}) has inconsistent "
                                 f"data_offsets {[begin, stop]} (file size {size})")
            self.tensors[name] = TensorInfo(name, self.path, dtype, shape, base + begin, base + stop)

    def keys(self):
        return self.tensors.keys()

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.tensors[name])


def read_tensor(info: TensorInfo, fileobj=None) -> np.ndarray:
    """The tensor's bytes, read into a fresh C-contiguous numpy array (one copy, nothing else touched)."""
    out = np.empty(info.shape, info.dtype)
    buf = out.reshape(-1).view(np.uint8)
    own = fileobj is None
    f = open(info.file, "rb", buffering=0) if own else fileobj
    try:
        f.seek(info.start)
        done = 0
        while done < info.nbytes:
            got = f.readinto(memoryview(buf[done:done + _READ_BLOCK]))
            if not got:
                raise IOError(f"{info.file}: unexpected end of file reading {info.name}")
            done += got
    finally:
        if own:
            f.close()
    return out


class TensorReader:
    """Reads many tensors, keeping one open handle per file (use as a context manager)."""

    def __init__(self):
        self._files: dict[str, object] = {}

    def read(self, info: TensorInfo) -> np.ndarray:
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb", buffering=0)
        return read_tensor(info, f)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def index_hf_dir(hf_dir: str) -> dict[str, TensorInfo]:
    """All tensors of an HF checkpoint directory, by name, from the headers only (no data is read).

    Uses `model.safetensors.index.json` when present (only the files it names), else every `*.safetensors`.
    """
    index_file = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map: Mapping[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (and no model.safetensors.index.json)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{index_file} names {name}, which does not exist")
        for key, info in SafetensorsFile(path).tensors.items():
            if key in tensors:
                raise ValueError(f"{hf_dir}: tensor {key} is stored twice ({os.path.basename(tensors[key].file)} "
                                 f"and {name})")
            tensors[key] = info
    if weight_map is not None:
        # The index is the contract; a tensor it names must be in the file it names.
        lost = [k for k, fn in weight_map.items() if k not in tensors or os.path.basename(tensors[k].file) != fn]
        if lost:
            raise ValueError(f"{index_file}: {len(lost)} tensors are not where the index says, e.g. "
                             f"{lost[:5]}")
    return tensors


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order of `specs` = [(name, dtype, shape), ...].

        with SafetensorsWriter(path, specs) as w:
            for name, array in produce():
                w.write(name, array)
    """

    def __init__(self, path: str, specs: Sequence[tuple[str, object, Sequence[int]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = path
        self._tmp = path + ".tmp"
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order: list[tuple[str, np.dtype, tuple]] = []
        offset = 0
        for name, dtype, shape in specs:
            dt, shp = np.dtype(dtype), tuple(int(d) for d in shape)
            n = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
            if name in header:
                raise ValueError(f"{path}: tensor {name} listed twice")
            header[name] = {"dtype": numpy_to_st(dt), "shape": list(shp), "data_offsets": [offset, offset + n]}
            self._order.append((name, dt, shp))
            offset += n
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, array) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        want_name, dt, shp = self._order[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name} next, got {name}")
        arr = np.ascontiguousarray(array)
        if arr.dtype != dt or arr.shape != shp:
            raise ValueError(f"{self.path}: tensor {name} is {arr.dtype} {list(arr.shape)}, "
                             f"declared {dt} {list(shp)}")
        if arr.size:
            self._f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        if self._f is None:
            return
        try:
            if self._next != len(self._order):
                raise ValueError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
            self._f = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Small helper: write in-memory tensors (tests, tools)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    with SafetensorsWriter(path, [(k, np.asarray(v).dtype, np.shape(v)) for k, v in items], metadata) as w:
        for k, v in items:
            w.write(k, v)
