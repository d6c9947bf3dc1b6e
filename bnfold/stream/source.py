"""An ONNX file opened for folding without reading its weights: a skeleton and a memory map.

:func:`open_model` maps the file and walks its protobuf wire format (:mod:`.wire`) down to the
main graph's initializers. Every initializer that stores ``raw_data`` of at least
:data:`MIN_PLACEHOLDER_BYTES` becomes a *placeholder* in the skeleton that is parsed into
the ``ModelProto``: its metadata (name, dims, data type, doc string) is kept and its payload
is described as external data pointing at the bytes inside the ``.onnx`` file itself
(``location`` = the file's name, ``offset``, ``length``, plus the entry
``bnfold.placeholder`` = ``file``). Everything else — nodes, small tensors, subgraphs,
functions, metadata — is parsed as usual, from the original bytes.

Tensors that really are stored in external data stay as they are. Placeholders and external
tensors are read the same way, through :meth:`SourceModel.array`: a read-only NumPy view of a
memory map of the file that holds them, so only the tensors a fold touches are ever read, and
:meth:`SourceModel.release` hands their pages back to the page cache (peak memory stays far
below the model's size). The writer (:mod:`.writer`) copies untouched payloads from the same
files byte for byte.

The checks are those of ``modelio.load_model(check=True)``; any file the walk cannot read
is passed to ``load_model`` for the same one-line error it would give.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import ModelLoadError
from bnfold.graph.constants import tensor_value
from bnfold.stream import wire

#: Smaller initializers are parsed as usual (splicing them would cost more than it saves).
MIN_PLACEHOLDER_BYTES = 1024

#: external_data key that marks a tensor whose payload bnfold keeps outside the proto; its
#: value says where: ``file`` (location/offset/length of a source file), ``memory`` (an array
#: held by the store; offset = its key), ``output`` (already in the output's data file).
PLACEHOLDER_KEY = "bnfold.placeholder"

# data types read as a zero-copy view (little-endian IEEE); others go through onnx.numpy_helper
_VIEW_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
}


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_placeholder(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == PLACEHOLDER_KEY for e in tensor.external_data)


class SourceModel:
    """The skeleton ``model`` of one ``.onnx`` file and read access to its payloads.

    ``model`` is the caller's to edit (it is the working copy); :meth:`pristine` parses a
    fresh copy of the unedited skeleton. ``external`` tells whether the file uses real
    external data (then the output does too).
    """

    def __init__(self, path: Path, fd: int, mapped: mmap.mmap, skeleton: bytes, model: onnx.ModelProto,
                 placeholders: int):
        self.path = path
        self.folder = path.parent
        self.fd = fd
        self.skeleton = skeleton
        self.model = model
        self.placeholders = placeholders
        self.external = any(
            onnx.external_data_helper.uses_external_data(t) and not is_placeholder(t)
            for t in onnx.external_data_helper._get_all_tensors(model))
        self._maps: dict[str, tuple[int, mmap.mmap | None]] = {path.name: (fd, mapped)}
        self._extra_fds: list[int] = []

    # ---- the model -------------------------------------------------------------------
    def pristine(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.ParseFromString(self.skeleton)
        return model

    def bytes_on_disk(self) -> int:
        """The model file plus every distinct external-data file it references."""
        total = self.path.stat().st_size
        seen = {self.path.resolve()}
        for t in onnx.external_data_helper._get_all_tensors(self.model):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = external_info(t).get("location", "")
            target = (self.folder / location).resolve()
            if location and target not in seen and target.is_file():
                seen.add(target)
                total += target.stat().st_size
        return total

    def payload_bytes(self) -> int:
        """Bytes of every placeholder and external tensor (what a write copies or rewrites)."""
        return sum(int(external_info(t).get("length") or 0) for t in onnx.external_data_helper._get_all_tensors(self.model)
                   if t.data_location == onnx.TensorProto.EXTERNAL)

    # ---- payloads --------------------------------------------------------------------
    def file_of(self, location: str) -> tuple[int, mmap.mmap | None]:
        """(file descriptor, memory map or None when empty) of a file in the model's folder."""
        found = self._maps.get(location)
        if found is None:
            fd = os.open(self.folder / location, os.O_RDONLY)
            self._extra_fds.append(fd)
            size = os.fstat(fd).st_size
            found = (fd, mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None)
            self._maps[location] = found
        return found

    def file_range(self, tensor: onnx.TensorProto) -> tuple[int, mmap.mmap | None, int, int]:
        """(fd, map, offset, length) of a placeholder's or external tensor's payload."""
        info = external_info(tensor)
        fd, mapped = self.file_of(info["location"])
        offset = int(info.get("offset") or 0)
        if info.get("length"):
            length = int(info["length"])
        else:
            length = (os.fstat(fd).st_size - offset)
        return fd, mapped, offset, length

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of a tensor whose payload lies in a file (read-only where it is a view)."""
        _, mapped, offset, length = self.file_range(tensor)
        dims = tuple(tensor.dims)
        count = math.prod(dims)
        dtype = _VIEW_DTYPES.get(tensor.data_type)
        if dtype is not None and length == count * dtype.itemsize:
            if count == 0 or mapped is None:
                return np.zeros(dims, dtype=dtype)
            return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(dims)
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        inline.ClearField("external_data")
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = mapped[offset:offset + length] if mapped is not None else b""
        return tensor_value(inline)

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache; a later read
        faults them back in). Keeps the resident size of a big fold to the tensors at hand."""
        for _, mapped in self._maps.values():
            if mapped is not None and hasattr(mapped, "madvise"):
                try:
                    mapped.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        for _, mapped in self._maps.values():
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:
                    pass  # a NumPy view still uses it: the garbage collector closes it later
        for fd in [self.fd, *self._extra_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._maps.clear()
        self._extra_fds.clear()

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_model(path: str | os.PathLike, *, check: bool = True) -> SourceModel:
    """Open ``path`` as a :class:`SourceModel`; ModelLoadError / UnsupportedModelError as
    ``modelio.load_model(path, load_external_data=False, check=check)`` would raise."""
    from bnfold import modelio

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        modelio.load_model(path, load_external_data=False, check=check)
        raise ModelLoadError(f"{path}: cannot read") from None
    try:
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        if mapped is None:
            raise ValueError("empty")
        skeleton, probe, placeholders = build_skeleton(mapped, path.name)
    except (OSError, ValueError):  # WireError is a ValueError
        os.close(fd)
        modelio.load_model(path, load_external_data=False, check=check)  # raises its usual line
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf parse failed)") from None
    try:
        model = modelio.parse_model(skeleton, name=str(path))
        source = SourceModel(path, fd, mapped, skeleton, model, placeholders)
        if source.external:  # placeholders point inside this very file, in range by construction
            modelio.check_external_data(model, path.parent, name=str(path))
        if check:
            from bnfold import inputcheck

            inputcheck.check_foldable(model, str(path))
            inputcheck.check_structure(probe, path, external=source.external)
    except BaseException:
        mapped.close()
        os.close(fd)
        raise
    return source


def build_skeleton(buf, name: str) -> tuple[bytes, bytes, int]:
    """The model in ``buf`` with big main-graph ``raw_data`` replaced by placeholders.

    Returns (skeleton, probe, number of placeholders). In ``probe`` each placeholder is instead
    a stand-in ``onnx.checker`` accepts (dims ``[0]``, empty raw_data): the checker would
    otherwise insist on reading the payload; the tensors' sizes are checked against their
    placeholders by :mod:`bnfold.inputcheck`. One walk builds both.
    """
    out, probe = bytearray(), bytearray()
    count = 0
    for f in wire.fields(buf):
        if f.number == wire.MODEL_GRAPH and f.wire_type == wire.LENGTH:
            graph, graph_probe, count = _graph(buf, f.value, f.end, name)
            out += wire.length_field(wire.MODEL_GRAPH, graph)
            probe += wire.length_field(wire.MODEL_GRAPH, graph_probe)
        else:
            out += buf[f.start:f.end]
            probe += buf[f.start:f.end]
    return bytes(out), bytes(probe), count


def _graph(buf, start: int, end: int, name: str) -> tuple[bytes, bytes, int]:
    out, probe = bytearray(), bytearray()
    count = 0
    for f in wire.fields(buf, start, end):
        if f.number == wire.GRAPH_INITIALIZER and f.wire_type == wire.LENGTH:
            tensor = _tensor(buf, f.value, f.end, name)
            if tensor is not None:
                out += wire.length_field(wire.GRAPH_INITIALIZER, tensor[0])
                probe += wire.length_field(wire.GRAPH_INITIALIZER, tensor[1])
                count += 1
                continue
        out += buf[f.start:f.end]
        probe += buf[f.start:f.end]
    return bytes(out), bytes(probe), count


def _tensor(buf, start: int, end: int, name: str) -> tuple[bytes, bytes] | None:
    """(placeholder, checker stand-in) for one TensorProto, or None to copy it as it is."""
    parts = list(wire.fields(buf, start, end))
    raw = [f for f in parts if f.number == wire.TENSOR_RAW_DATA and f.wire_type == wire.LENGTH]
    if len(raw) != 1 or raw[0].varint < MIN_PLACEHOLDER_BYTES:
        return None
    if any(f.number in (wire.TENSOR_EXTERNAL_DATA, wire.TENSOR_DATA_LOCATION) for f in parts):
        return None
    out, probe = bytearray(), bytearray()
    for f in parts:
        if f is not raw[0]:
            out += buf[f.start:f.end]
            if f.number != wire.TENSOR_DIMS:
                probe += buf[f.start:f.end]
    for key, value in (("location", name), ("offset", str(raw[0].value)), ("length", str(raw[0].varint)),
                       (PLACEHOLDER_KEY, "file")):
        out += wire.length_field(wire.TENSOR_EXTERNAL_DATA, wire.entry(key, value))
    out += wire.varint_field(wire.TENSOR_DATA_LOCATION, onnx.TensorProto.EXTERNAL)
    probe += wire.varint_field(wire.TENSOR_DIMS, 0) + wire.length_field(wire.TENSOR_RAW_DATA, b"")
    return bytes(out), bytes(probe)
