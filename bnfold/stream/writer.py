"""Write a streamed fold: the small proto re-serialized, every payload copied or spliced in.

Two layouts, as ``modelio.save_model`` writes them:

* **one file** (:func:`write_inline`, the source had no external data): the edited skeleton
  is serialized (kilobytes), then walked with :mod:`.wire`; each placeholder initializer of
  the main graph is written back as an ordinary TensorProto whose ``raw_data`` — in field
  order, where ``onnx.save`` puts it — is either copied from the source file with
  ``os.copy_file_range`` (untouched tensors: byte for byte, without passing through Python)
  or written from the folded array the store kept. The enclosing messages' lengths are
  recomputed from the pieces, so nothing large is ever assembled in memory.
* **external data** (:func:`write_external`): every external tensor's payload is copied into
  ``<model>.data`` (folded ones were appended while folding), every other initializer whose
  ``raw_data`` is 1 KB or more moves there too (onnx's ``size_threshold=1024`` rule), and the
  proto, now small, is serialized.

``progress(n)``, when given, is called with the number of payload bytes each step wrote.
"""

from __future__ import annotations

import errno
import os
import sys

import numpy as np
import onnx
from onnx.external_data_helper import _get_all_tensors, _get_initializer_tensors

from bnfold.stream import wire
from bnfold.stream.source import PLACEHOLDER_KEY, external_info
from bnfold.stream.store import TensorStore, Writeback, write_all

_SIZE_THRESHOLD = 1024  # as modelio.save_model passes to convert_model_to_external_data


class TooLarge(Exception):
    """The one-file layout would exceed protobuf's limit; the caller writes external data."""


def copy_range(src_fd: int, mapped, offset: int, length: int, dst_fd: int) -> None:
    """Append ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (in-kernel when it can)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = 0
        if n == 0:  # not supported here (or the source is shorter than it claimed): plain copy
            chunk = min(length - done, 64 << 20)
            data = mapped[offset + done:offset + done + chunk] if mapped is not None else b""
            if len(data) != chunk:
                raise OSError(errno.EIO, "source file is shorter than its tensors claim")
            write_all(dst_fd, data)
            n = chunk
        done += n


class _Pieces:
    """A sequence of output pieces: bytes, (fd, map, offset, length) ranges, arrays."""

    def __init__(self):
        self.items: list = []
        self.size = 0

    def add_bytes(self, data: bytes) -> None:
        if data:
            self.items.append(bytes(data))
            self.size += len(data)

    def add_payload(self, payload, length: int) -> None:
        self.items.append(payload)
        self.size += length


def _payload(store: TensorStore, tensor_fields, skel: bytes):
    """(payload, length) of a placeholder TensorProto serialized in ``skel``."""
    info = {}
    for f in tensor_fields:
        if f.number == wire.TENSOR_EXTERNAL_DATA:
            entry = {e.number: bytes(skel[e.value:e.end]).decode() for e in wire.fields(skel, f.value, f.end)}
            info[entry.get(wire.ENTRY_KEY, "")] = entry.get(wire.ENTRY_VALUE, "")
    length = int(info["length"])
    kind = info.get(PLACEHOLDER_KEY, "file")
    if kind == "memory":
        return store.arrays[int(info["offset"])], length
    if kind != "file":
        raise ValueError(f"placeholder of kind {kind!r} in a one-file output")
    fd, mapped = store.source.file_of(info["location"])
    return (fd, mapped, int(info.get("offset") or 0), length), length


def _tensor_pieces(store: TensorStore, skel: bytes, start: int, end: int) -> _Pieces | None:
    parts = list(wire.fields(skel, start, end))
    if not any(f.number == wire.TENSOR_DATA_LOCATION and f.varint == onnx.TensorProto.EXTERNAL for f in parts):
        return None
    payload, length = _payload(store, parts, skel)
    kept = [f for f in parts if f.number not in (wire.TENSOR_EXTERNAL_DATA, wire.TENSOR_DATA_LOCATION)]
    out = _Pieces()
    out.add_bytes(b"".join(bytes(skel[f.start:f.end]) for f in kept if f.number < wire.TENSOR_RAW_DATA))
    out.add_bytes(wire.length_prefix(wire.TENSOR_RAW_DATA, length))
    out.add_payload(payload, length)
    out.add_bytes(b"".join(bytes(skel[f.start:f.end]) for f in kept if f.number > wire.TENSOR_RAW_DATA))
    return out


def _nest(number: int, inner: _Pieces, into: _Pieces) -> None:
    into.add_bytes(wire.length_prefix(number, inner.size))
    into.items.extend(inner.items)
    into.size += inner.size


def _layout(model: onnx.ModelProto, store: TensorStore) -> _Pieces:
    skel = model.SerializeToString()
    top = _Pieces()
    for f in wire.fields(skel):
        if f.number != wire.MODEL_GRAPH or f.wire_type != wire.LENGTH:
            top.add_bytes(skel[f.start:f.end])
            continue
        graph = _Pieces()
        pending = bytearray()  # runs of verbatim fields, joined into one piece
        for g in wire.fields(skel, f.value, f.end):
            tensor = None
            if g.number == wire.GRAPH_INITIALIZER and g.wire_type == wire.LENGTH:
                tensor = _tensor_pieces(store, skel, g.value, g.end)
            if tensor is None:
                pending += skel[g.start:g.end]
                continue
            graph.add_bytes(pending)
            pending = bytearray()
            _nest(wire.GRAPH_INITIALIZER, tensor, graph)
        graph.add_bytes(pending)
        _nest(wire.MODEL_GRAPH, graph, top)
    return top


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to ``length`` bytes at ``offset`` of ``location`` (as onnx writes it)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def write_inline(model: onnx.ModelProto, store: TensorStore, fd: int, *, limit: int, progress=None) -> int:
    """Write ``model`` (with placeholders) as one ``.onnx`` file to ``fd``; returns the file
    offsets of the spliced payloads, in initializer order (see :func:`point_into`).

    Raises TooLarge (before writing anything) when it would be ``limit`` bytes or more.
    """
    pieces = _layout(model, store)
    if pieces.size > limit:
        raise TooLarge(pieces.size)
    done = 0
    offsets = []
    writeback = Writeback(fd, every=32 << 20)  # the disk works while the rest is written
    for item in pieces.items:
        if isinstance(item, bytes):
            write_all(fd, item)
            done += len(item)
            continue
        offsets.append(done)
        if isinstance(item, np.ndarray):
            write_all(fd, item)
            done += item.nbytes
        else:
            src_fd, mapped, offset, length = item
            copy_range(src_fd, mapped, offset, length, fd)
            done += length
        writeback.wrote(done - offsets[-1])
        if progress is not None:
            progress(done - offsets[-1])
    writeback.close()
    return offsets


def point_into(model: onnx.ModelProto, location: str, offsets: list[int]) -> None:
    """After :func:`write_inline`: make the spliced placeholders of ``model`` external-data
    references to their ``raw_data`` bytes inside the written file ``location``."""
    spliced = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor, offset in zip(spliced, offsets, strict=True):
        _point(tensor, location, offset, int(external_info(tensor)["length"]))


def write_external(model: onnx.ModelProto, store: TensorStore, model_fd: int, data_fd: int, data_name: str,
                   *, progress=None) -> bool:
    """Write ``model`` to ``model_fd`` with every payload in ``data_fd`` (named ``data_name``,
    already holding the store's folded tensors if it was given one). ``model`` is edited: its
    tensors end up pointing at the data file. Returns whether the data file holds anything.
    """
    end = store.data_end if store.data_fd == data_fd else 0
    todo = [(t, store.nbytes(t)) for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    todo += [(t, len(t.raw_data)) for t in _get_initializer_tensors(model)
             if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data")
             and sys.getsizeof(t.raw_data) >= _SIZE_THRESHOLD]
    for tensor, length in todo:
        info = external_info(tensor) if tensor.data_location == onnx.TensorProto.EXTERNAL else {}
        kind = info.get(PLACEHOLDER_KEY, "file" if info else "inline")
        if kind == "output" and store.data_fd == data_fd:
            offset = int(info["offset"])
        else:
            offset = end
            if kind == "inline":
                write_all(data_fd, tensor.raw_data)
            elif kind == "memory" or kind == "output":
                write_all(data_fd, store.load(tensor))
            else:
                src_fd, mapped, src_offset, _ = store.source.file_range(tensor)
                copy_range(src_fd, mapped, src_offset, length, data_fd)
            end += length
        _point(tensor, data_name, offset, length)
        if not (kind == "output" and store.data_fd == data_fd):  # (the store counted its own appends)
            if store.data_fd == data_fd:
                store.appended(length)
            elif progress is not None:
                progress(length)
    write_all(model_fd, model.SerializeToString())
    return end > 0
