"""Orbax checkpoints of param trees (nested dicts of arrays), on Orbax's v1 API (orbax-checkpoint >= 0.12).

    save_params(path, params)                        # atomic (Orbax writes a tmp dir, then renames)
    params = load_params(path)                       # numpy arrays
    params = load_params(path, shardings)            # jax.Arrays straight into their shards
    meta = params_metadata(path)                     # jax.ShapeDtypeStruct leaves, nothing read
    for key_path, array in iter_params(path): ...    # one leaf at a time (export)

    with ParamsWriter(path) as w:                    # streaming: one leaf at a time (the converter)
        for key_path, array in leaves:
            w.write(key_path, array)                 # written and released before the next one

A checkpoint is a plain Orbax PyTree checkpoint (`path/state/…`, OCDBT + zarr3): whatever wrote it (save_params
or ParamsWriter), `ocp.v1.load(path)` reads it too.

Streaming (`ParamsWriter`) uses Orbax partial saving (`ocp.v1.partial.save` per leaf, then
`ocp.v1.partial.finalize`): every call writes its leaves into a pending directory next to the target, and
finalize merges them and renames the result to `path` in one step (the data files are moved, not copied), so
the checkpoint appears atomically and is never held in memory as a whole. Host-memory notes, measured with
orbax-checkpoint 0.12.8 (bench/convert_memory.py, docs/convert.md):
* Orbax deep-copies numpy leaves before writing unless `deepcopy_host_arrays=False`; the writer does not need
  the copy (each save is synchronous), so it is off.
* A numpy leaf written as ONE uncompressed chunk is handed to tensorstore without a copy. Splitting it into
  chunks (explicitly, or implicitly because it exceeds OCDBT's default 2 GB target data-file size) or
  compressing it costs a second leaf-sized buffer. The writer therefore defaults to compression off and no
  data-file size limit (`ocdbt_target_data_file_size=0`): the peak is the leaf itself.
* Loading concurrently reads every leaf (tensorstore holds a chunk buffer per leaf being read), so
  `load_params` reads in batches of at most `batch_bytes`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from omni_jax.tree_utils import flatten_params, unflatten_params

__all__ = ["save_params", "load_params", "params_metadata", "iter_params", "ParamsWriter",
           "resolve_params_dir", "PARAMS_SUBDIR"]

PARAMS_SUBDIR = "params"  # inside an omni_jax checkpoint directory (next to config.json, omni_jax.json)
_DEFAULT_BATCH_BYTES = 4 << 30  # load_params: bytes read concurrently
_WRITE_BUFFER_BYTES = 256 << 20  # ParamsWriter: small leaves grouped into one save
_ITER_BATCH_BYTES = 256 << 20  # iter_params: small leaves restored together


def _ocp():
    from orbax.checkpoint import v1 as ocp  # deferred: importing Orbax takes a second

    return ocp


def resolve_params_dir(path: str) -> str:
    """An omni_jax checkpoint dir (with params/) or the params dir itself -> absolute params dir."""
    path = os.path.abspath(os.fspath(path))
    sub = os.path.join(path, PARAMS_SUBDIR)
    if os.path.isdir(sub) and not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        return sub
    return path


def _unbox(params):
    try:
        import flax.linen as nn

        return nn.meta.unbox(params)
    except ImportError:  # pragma: no cover
        return params


# ================================================================================================ saving

def save_params(path: str, params: Mapping, *, compress: bool = True, overwrite: bool = False) -> None:
    """Save a param tree (numpy arrays or jax.Arrays, sharded or not) as an Orbax checkpoint, atomically.

    compress: zstd (Orbax's default; smaller files, one extra buffer per leaf while writing).
    overwrite: replace an existing checkpoint at `path` (otherwise that is an error).
    """
    ocp = _ocp()
    path = os.path.abspath(os.fspath(path))
    ctx = ocp.Context()
    ctx.array.saving.use_compression = compress
    ctx.memory.deepcopy_host_arrays = False  # the call blocks until written: no copy needed
    with ctx:
        ocp.save(path, _unbox(params), overwrite=overwrite)


class ParamsWriter:
    """Writes an Orbax param checkpoint one leaf (or subtree) at a time; see the module docstring.

    Nothing is visible at `path` until `finalize()` (called by the `with` block on success); on an error the
    pending data is removed. The result is the same kind of checkpoint `save_params` writes.

    chunk_bytes: None (default) stores every leaf as one uncompressed chunk: writing costs no memory beyond
      the leaf, restoring a leaf costs one extra leaf-sized buffer. A value (e.g. one layer's bytes) splits
      leaves into chunks along the layers axis: writing then buffers a second copy of the leaf (OCDBT commits
      all chunks of a save together), restoring streams chunk by chunk. See docs/convert.md.
    """

    def __init__(self, path: str, *, compress: bool = False, overwrite: bool = False,
                 chunk_bytes: Optional[int] = None, buffer_bytes: int = _WRITE_BUFFER_BYTES):
        self.path = os.path.abspath(os.fspath(path))
        self.buffer_bytes = buffer_bytes  # small leaves are grouped into one save call up to this size
        self._buffer: dict[tuple, Any] = {}
        self._buffered = 0
        self._ocp = _ocp()
        if os.path.exists(self.path):
            if not overwrite:
                raise FileExistsError(f"{self.path} already exists (pass overwrite=True to replace it)")
            shutil.rmtree(self.path)
        self._pending = self.path + ".partial_save"  # Orbax's session directory (removed on abort)
        if os.path.exists(self._pending):  # left over from an interrupted run of ours
            shutil.rmtree(self._pending)
        ctx = self._ocp.Context()
        ctx.array.saving.use_compression = compress
        ctx.array.saving.ocdbt_target_data_file_size = 0  # one chunk per leaf: no copy (module doc)
        if chunk_bytes:  # chunks of <= chunk_bytes, split along the leading (layers) axis first
            ctx.array.saving.storage_options.chunk_byte_size = int(chunk_bytes)
            ctx.array.saving.storage_options.shard_axes = (0,)
        ctx.memory.deepcopy_host_arrays = False
        self._ctx = ctx
        self._written: set[tuple] = set()
        self._done = False

    def write(self, key_path: Sequence[str] | str, value) -> None:
        """Write one leaf; `key_path` is a tuple of dict keys or a '/'-joined string.

        A leaf of at least `buffer_bytes` is written before this returns (the caller may then drop it);
        smaller ones are grouped (the writer keeps a reference until the group is written)."""
        if self._done:
            raise RuntimeError(f"{self.path}: writer already finalized")
        key = tuple(key_path.split("/")) if isinstance(key_path, str) else tuple(key_path)
        if key in self._written:
            raise ValueError(f"{self.path}: leaf {'/'.join(key)} written twice")
        self._written.add(key)
        nbytes = int(getattr(value, "nbytes", 0))
        if nbytes >= self.buffer_bytes:
            self.flush()
            self._save({key: value})
            return
        if self._buffer and self._buffered + nbytes > self.buffer_bytes:
            self.flush()
        self._buffer[key] = value
        self._buffered += nbytes

    def write_tree(self, tree: Mapping) -> None:
        """Write every leaf of a subtree (see `write`)."""
        for key, value in flatten_params(_unbox(tree)).items():
            self.write(key, value)

    def flush(self) -> None:
        """Write the grouped small leaves now."""
        if self._buffer:
            buffer, self._buffer, self._buffered = self._buffer, {}, 0
            self._save(buffer)

    def _save(self, flat: Mapping[tuple, Any]) -> None:
        with self._ctx:
            self._ocp.partial.save(self.path, unflatten_params(flat))

    def finalize(self) -> None:
        if self._done:
            return
        if not self._written:
            raise ValueError(f"{self.path}: nothing was written")
        self.flush()
        with self._ctx:
            self._ocp.partial.finalize(self.path)
        self._done = True

    def abort(self) -> None:
        self._done = True
        self._buffer.clear()
        if os.path.exists(self._pending):
            shutil.rmtree(self._pending)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


# ================================================================================================ loading

@dataclasses.dataclass
class _HostArray:
    """Abstract leaf (shape, dtype, no sharding): Orbax restores it as a numpy array."""

    shape: tuple
    dtype: np.dtype


def _raw_metadata(path: str) -> dict:
    ocp = _ocp()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    return ocp.metadata(path).metadata


def _cast_dtype(stored, dtype):
    if dtype is None:
        return np.dtype(stored)
    from omni_jax.weights.safetensors_io import dtype_from_name

    stored = np.dtype(stored)
    # only floating leaves are cast (ints / bools keep their type)
    return dtype_from_name(dtype) if jax.numpy.issubdtype(stored, jax.numpy.floating) else stored


def params_metadata(path: str) -> dict:
    """Nested dict of jax.ShapeDtypeStruct (shape, stored dtype) for every leaf; no array data is read."""
    path = resolve_params_dir(path)
    return unflatten_params({k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
                       for k, m in flatten_params(_raw_metadata(path)).items()})


def _load_flat(path: str, abstract: Mapping[tuple, Any], batch_bytes: int) -> dict[tuple, Any]:
    """Restore the leaves of `abstract` ({key path: abstract leaf}) in batches of <= batch_bytes."""
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    out: dict[tuple, Any] = {}
    batch: dict[tuple, Any] = {}
    size = 0

    def flush():
        nonlocal batch, size
        if batch:
            with ctx:
                restored = ocp.load(path, unflatten_params(batch))
            out.update(flatten_params(restored))
            batch, size = {}, 0

    for key, leaf in abstract.items():
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        if batch and size + nbytes > batch_bytes:
            flush()
        batch[key] = leaf
        size += nbytes
    flush()
    return out


def load_params(path: str, shardings=None, *, dtype=None, batch_bytes: int = _DEFAULT_BATCH_BYTES) -> dict:
    """Restore a param checkpoint (an omni_jax checkpoint dir or its params/ dir).

    shardings: None -> numpy arrays on the host. A pytree of `jax.sharding.Sharding` (e.g. NamedSharding),
      with the structure of the params or of a subset of them (only that subset is read), -> jax.Arrays
      created directly in their shards (each host reads only what its devices hold). A single Sharding
      applies to every leaf.
    dtype: cast floating leaves on restore (e.g. "bfloat16").
    batch_bytes: at most this many bytes are read concurrently (bounds host memory in transit).
    """
    path = resolve_params_dir(path)
    meta = flatten_params(_raw_metadata(path))
    if shardings is None:
        abstract = {k: _HostArray(tuple(m.shape), _cast_dtype(m.dtype, dtype)) for k, m in meta.items()}
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            wanted = {k: shardings for k in meta}
        else:
            wanted = flatten_params(shardings) if isinstance(shardings, Mapping) else {
                tuple(getattr(k, "key", str(k)) for k in kp): s
                for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        unknown = sorted("/".join(k) for k in wanted if k not in meta)
        if unknown:
            raise KeyError(f"{path}: shardings name leaves the checkpoint does not have: {unknown[:20]}"
                           + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""))
        abstract = {}
        for k, s in wanted.items():
            m = meta[k]
            dt = _cast_dtype(m.dtype, dtype)
            abstract[k] = (_HostArray(tuple(m.shape), dt) if s is None
                           else jax.ShapeDtypeStruct(tuple(m.shape), dt, sharding=s))
    return unflatten_params(_load_flat(path, abstract, batch_bytes))


def iter_params(path: str, *, keys: Optional[Sequence[Sequence[str]]] = None, dtype=None,
                batch_bytes: int = _ITER_BATCH_BYTES) -> Iterator[tuple[tuple, np.ndarray]]:
    """(key path, numpy array) for each leaf (or each of `keys`, in that order), restored lazily: small
    leaves in groups of up to `batch_bytes`, a larger leaf on its own, each dropped once consumed."""
    path = resolve_params_dir(path)
    meta = flatten_params(_raw_metadata(path))
    order = [tuple(k) for k in keys] if keys is not None else list(meta)
    unknown = ["/".join(k) for k in order if k not in meta]
    if unknown:
        raise KeyError(f"{path}: no leaves {unknown[:20]}")
    batch: dict[tuple, Any] = {}
    size = 0

    def load(batch):
        restored = _load_flat(path, batch, batch_bytes)
        for k in batch:
            yield k, restored.pop(k)

    for key in order:
        m = meta[key]
        leaf = _HostArray(tuple(m.shape), _cast_dtype(m.dtype, dtype))
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
        if batch and size + nbytes > batch_bytes:
            yield from load(batch)
            batch, size = {}, 0
        batch[key] = leaf
        size += nbytes
    if batch:
        yield from load(batch)
