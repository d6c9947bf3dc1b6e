"""Where folded tensors go while a streamed fold runs, and how the passes read tensors back.

:class:`TensorStore` is the hook a :class:`~bnfold.graph.GraphIndex` of the main graph is
given: ``load(tensor)`` turns a placeholder or external tensor into NumPy (a view of the
source's memory map, see :mod:`.source`), and ``make(name, value)`` builds the TensorProto
for a folded value. A big float value does not go into the proto: it becomes a placeholder
(``bnfold.placeholder`` = ``memory``) for an array the store keeps, or, when a data file is
given (outputs with external data), its bytes are appended to that file at once
(``bnfold.placeholder`` = ``output``), so a fold of a model larger than memory never holds
more than the tensors at hand. Small and non-float values are ordinary tensors, built as
:func:`bnfold.graph.constants.make_tensor` builds them — the same bytes either way.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import onnx
from onnx import helper

from bnfold.graph.constants import make_tensor
from bnfold.stream import source as _source
from bnfold.stream.source import PLACEHOLDER_KEY, SourceModel, external_info


def write_all(fd: int, data) -> None:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # buffers refuse bfloat16
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Writeback:
    """Flush a file being appended to in the background, every ``every`` bytes written.

    The atomic write fsyncs every file before renaming it into place; for a 1.4 GB data file
    that flush is ~1 s of waiting at the end. Started early, in a thread (``fdatasync``
    releases the GIL), the disk works while the fold computes and the final fsync finds
    little left. Errors are left to that final fsync, which reports them.
    """

    def __init__(self, fd: int, every: int = 128 << 20):
        self.fd, self.every = fd, every
        self._pending = 0
        self._thread: threading.Thread | None = None

    def wrote(self, n: int) -> None:
        self._pending += n
        if self._pending >= self.every and (self._thread is None or not self._thread.is_alive()):
            self._pending = 0
            self._thread = threading.Thread(target=self._sync, name="bnfold-writeback", daemon=True)
            self._thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError:
            pass

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()


class TensorStore:
    """Folded tensors of one streamed fold (see module docstring).

    ``data_fd``/``data_name``: the output's external-data file, open for appending; without
    them folded arrays are kept in memory until the writer splices them in.
    """

    def __init__(self, source: SourceModel, *, data_fd: int | None = None, data_name: str | None = None,
                 progress=None):
        self.source = source
        self.data_fd = data_fd
        self.data_name = data_name
        self.data_end = 0
        self.arrays: list[np.ndarray] = []
        self.made = 0
        self.writeback = Writeback(data_fd) if data_fd is not None else None
        self._progress = progress  # progress(n): n payload bytes appended to the data file

    def load(self, tensor: onnx.TensorProto) -> np.ndarray:
        info = external_info(tensor)
        kind = info.get(PLACEHOLDER_KEY, "file")
        if kind == "memory":
            value = self.arrays[int(info["offset"])].view()
            value.flags.writeable = False
            return value
        if kind == "output":
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            data = os.pread(self.data_fd, int(info["length"]), int(info["offset"]))
            return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(
                tuple(tensor.dims))
        return self.source.array(tensor)

    def make(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        value = np.asarray(value)
        self.made += 1
        if (value.dtype.kind != "f" and value.dtype.name != "bfloat16") or value.nbytes < _source.MIN_PLACEHOLDER_BYTES:
            return make_tensor(name, value)
        data = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False))
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.dims.extend(value.shape)
        if self.data_fd is None:
            kind, location, offset = "memory", "", len(self.arrays)
            self.arrays.append(data)
        else:
            kind, location, offset = "output", self.data_name, self.data_end
            write_all(self.data_fd, data)
            self.data_end += data.nbytes
            self.appended(data.nbytes)
        for key, v in (("location", location), ("offset", str(offset)), ("length", str(data.nbytes)),
                       (PLACEHOLDER_KEY, kind)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, v
        tensor.data_location = onnx.TensorProto.EXTERNAL
        # The value is out of the proto; the source pages the fold read are no longer needed.
        self.source.release()
        return tensor

    def appended(self, n: int) -> None:
        """``n`` bytes were appended to the data file (by the store or the writer)."""
        if self.writeback is not None:
            self.writeback.wrote(n)
        if self._progress is not None:
            self._progress(n)

    def close(self) -> None:
        """Wait for background flushes (before the data file is closed)."""
        if self.writeback is not None:
            self.writeback.close()

    def nbytes(self, tensor: onnx.TensorProto) -> int:
        info = external_info(tensor)
        if info.get("length"):
            return int(info["length"])
        return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
