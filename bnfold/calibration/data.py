"""Batch sources for calibration: streamed, one batch in memory at a time.

A *batch* is a dict input name → array that the model takes as it is (batch axis first).
Sources, by what ``data`` is:

* a path to an ``.npz`` file: one array per input, keyed by input name. An array whose rank is
  the input's rank is a stream of samples along the batch axis, cut into batches of
  ``batch_size`` samples (the whole array is one batch without ``batch_size``; a final partial
  batch is used, weighted by its size). An array with one extra *leading* axis holds
  ready-made batches (``x[i]`` is batch ``i``); ``batch_size`` is then refused.
* a path to a folder: its ``*.npz`` files in name order, each read as above; only one file is
  open at a time.
* a mapping input name → array: as an ``.npz`` file.
* any other iterable (a list, a generator, a DataLoader-like object) of such dicts: each item
  is one batch, consumed lazily.

Bounded memory: nothing keeps a batch after it was run. Uncompressed ``.npz`` members
(``numpy.savez``) are memory-mapped, so cutting a large file into batches reads one batch at a
time; a compressed member (``savez_compressed``) is decompressed whole, so the peak then grows
with the largest *file*, never with the number of files or batches.

Whether a batch matches the model (names, dtype, rank, fixed dimensions) is checked by the
caller with :func:`bnfold.validation.inputs.check_inputs`, batch by batch, naming the batch.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import InputDataError, UsageError
from bnfold.validation.inputs import TensorSpec


@dataclass(frozen=True)
class Batch:
    label: str                       # where it came from, for error messages
    feed: dict[str, np.ndarray]


class BatchSource:
    """Iterate ``Batch`` objects; ``total`` is the number of batches when known cheaply."""

    def __init__(self, label: str, total: int | None, make_iter):
        self.label = label
        self.total = total
        self._make_iter = make_iter

    def __iter__(self) -> Iterator[Batch]:
        return self._make_iter()


def open_batches(data, specs: list[TensorSpec], *, batch_size: int | None = None) -> BatchSource:
    """A :class:`BatchSource` over ``data`` (see the module docstring)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise UsageError(f"batch_size={batch_size!r}: expected a positive integer")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            return _folder(path, specs, batch_size)
        if not path.exists():
            raise InputDataError(f"{path}: no such file or folder")
        arrays = _open_npz(path)
        plan = _plan(str(path), arrays, specs, batch_size)
        return BatchSource(str(path), plan.total, lambda: plan.iterate())
    if isinstance(data, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
        plan = _plan("data", arrays, specs, batch_size)
        return BatchSource("data", plan.total, lambda: plan.iterate())
    if isinstance(data, Iterable):
        if batch_size is not None:
            raise UsageError("batch_size applies to .npz data; an iterable of batches is used as it yields them")
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        return BatchSource("batches", total, lambda: _iterable(data))
    raise InputDataError(f"calibration data of type {type(data).__name__}: expected an .npz path, a folder "
                         "of .npz files, a mapping input name → array, or an iterable of such mappings")


def _iterable(data) -> Iterator[Batch]:
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise InputDataError(f"batch {i}: is a {type(item).__name__}, expected a dict input name → array")
        yield Batch(f"batch {i}", {str(k): np.asarray(v) for k, v in item.items()})


def _folder(path: Path, specs, batch_size) -> BatchSource:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise InputDataError(f"{path}: no .npz files in this folder")
    total: int | None = len(files)
    if batch_size is not None:
        # Counting needs each file's shapes: the .npy headers, not the data.
        total = sum(_plan(str(f), _open_npz(f), specs, batch_size).total for f in files)

    def iterate() -> Iterator[Batch]:
        for f in files:
            yield from _plan(str(f), _open_npz(f), specs, batch_size).iterate()

    return BatchSource(str(path), total, iterate)


@dataclass
class _Plan:
    label: str
    arrays: dict[str, np.ndarray]
    stacked: bool          # leading axis enumerates batches
    length: int            # batches (stacked) or samples
    batch_size: int | None

    @property
    def total(self) -> int:
        if self.stacked:
            return self.length
        if self.batch_size is None:
            return 1
        return -(-self.length // self.batch_size)

    def iterate(self) -> Iterator[Batch]:
        for i in range(self.total):
            if self.stacked:
                feed = {k: np.ascontiguousarray(a[i]) for k, a in self.arrays.items()}
            elif self.batch_size is None:
                feed = {k: np.ascontiguousarray(a) for k, a in self.arrays.items()}
            else:
                lo = i * self.batch_size
                feed = {k: np.ascontiguousarray(a[lo:lo + self.batch_size]) for k, a in self.arrays.items()}
            yield Batch(f"{self.label} (batch {i})" if self.total > 1 else self.label, feed)


def _plan(label: str, arrays: dict[str, np.ndarray], specs: list[TensorSpec], batch_size) -> _Plan:
    expected = [s.name for s in specs]
    for name in arrays:
        if name not in expected:
            raise InputDataError(f"{label}: {name!r} is not an input of the model (inputs: {', '.join(expected)})")
    for name in expected:
        if name not in arrays:
            raise InputDataError(f"{label}: no data for input {name!r} (given: {', '.join(arrays) or 'nothing'})")
    kinds = {}
    for spec in specs:
        a = arrays[spec.name]
        rank = a.ndim if spec.shape is None else len(spec.shape)
        if a.ndim == rank + 1:
            kinds[spec.name] = "stacked"
        elif a.ndim == rank and a.ndim >= 1:
            kinds[spec.name] = "samples"
        else:
            raise InputDataError(f"{label}: input {spec.name!r} expects {spec.describe()} "
                                 f"(or a leading axis of batches), got {a.dtype} {list(a.shape)}")
    if len(set(kinds.values())) > 1:
        raise InputDataError(f"{label}: some inputs have a leading axis of batches and some do not: {kinds}")
    stacked = next(iter(kinds.values())) == "stacked"
    if stacked and batch_size is not None:
        raise UsageError(f"{label}: the arrays already hold batches (a leading axis of batches); "
                         "batch_size applies to a stream of samples")
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise InputDataError(f"{label}: inputs have different leading lengths: {lengths}")
    length = next(iter(lengths.values()))
    if length == 0:
        raise InputDataError(f"{label}: the arrays are empty (leading axis of length 0)")
    return _Plan(label, arrays, stacked, length, batch_size)


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, memory-mapped where stored uncompressed, else read whole."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        arrays: dict[str, np.ndarray] = {}
        lazy = None
        for info in infos:
            key = info.filename[:-4]
            mapped = _memmap_member(path, info) if info.compress_type == zipfile.ZIP_STORED else None
            if mapped is None:
                if lazy is None:
                    lazy = np.load(path, allow_pickle=False)
                mapped = lazy[key]
            arrays[key] = mapped
        if lazy is not None:
            lazy.close()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, struct.error) as exc:
        raise InputDataError(f"{path}: cannot read as .npz: {' '.join(str(exc).split())}") from exc
    if not arrays:
        raise InputDataError(f"{path}: no arrays in this .npz file")
    return arrays


def _memmap_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject or int(np.prod(shape)) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)
