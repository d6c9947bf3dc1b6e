"""Is an input model well-formed enough to fold? Cheap checks, one error line each.

``fold_file`` (and so ``bnfold fold``) runs these on the file it is given, before any
folding, so a broken model is refused with one line instead of being "folded" into another
broken model:

* :func:`check_structure` — ``onnx.checker`` without ``full_check`` (no shape inference),
  run on the bytes already read (the C++ checker parses them itself: ~0.03 s for a 100 MB
  model, against ~0.3 s for ``onnx.checker.check_model(ModelProto)``, which serializes the
  model first). A model with external data is checked through its path, so the checker
  resolves data locations in the model's folder; its protobuf is small.
* :func:`check_foldable` — what folding itself needs beyond the checker: a default-domain
  opset of at least 7 (BatchNormalization-7; the older ones carry ``is_test``/``spatial``
  semantics bnfold does not write), and every node's domain one onnxruntime implements or a
  model-local function declares (a custom-op domain is not something a fold can be proven
  equivalent on); graph inputs and outputs of known element types; and every stored tensor
  readable as what it claims to be (a known data type, a shape NumPy can hold, as many bytes
  or values as the shape needs, external data included) — the checker without
  ``full_check`` looks at none of these (a 100 MB model: ~0.03 s, one copy of raw_data).

``load_model(path, check=True)`` runs :func:`check_foldable` first (its opset message says
more than the checker's complaint about an old model), then :func:`check_structure`.

``onnx.checker`` is stricter than onnxruntime in a few places (e.g. a graph output must
declare a ``shape`` field, even an empty one). bnfold follows the checker: a release
pipeline should not ship what the format's own checker rejects.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import helper
from onnx.onnx_cpp2py_export import checker as _c_checker

from bnfold.errors import ModelLoadError, UnsupportedModelError
from bnfold.graph import subgraphs
from bnfold.stream.source import PLACEHOLDER_KEY

# Operator domains onnxruntime 1.x implements (CPU/CUDA kernels and contrib ops).
ORT_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training",
    "com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc",
    "com.microsoft.dml", "org.pytorch.aten",
})
MIN_OPSET = 7  # BatchNormalization-7
_MAX_MESSAGE = 240


def check_structure(data: bytes, path: str | Path, *, external: bool) -> None:
    """``onnx.checker`` (no full check) on the serialized model; ModelLoadError if it fails."""
    try:
        if external:
            _c_checker.check_model_path(str(path), False, False, False)
        else:
            _c_checker.check_model(data, False, False, False)
    except (_c_checker.ValidationError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "…"
        raise ModelLoadError(f"{path}: fails onnx.checker: {message}") from exc


def check_foldable(model: onnx.ModelProto, name: str) -> None:
    """UnsupportedModelError when the model's opsets or operator domains rule out a fold."""
    versions = {o.domain: o.version for o in model.opset_import}
    default = versions.get("", versions.get("ai.onnx"))
    if default is None:
        raise UnsupportedModelError(f"{name}: imports no default-domain (ai.onnx) opset")
    if default < MIN_OPSET:
        raise UnsupportedModelError(
            f"{name}: opset {default} is older than BatchNormalization-7 (opset {MIN_OPSET}); "
            "convert it first (onnx.version_converter.convert_version)"
        )
    check_tensors(model, name, base_dir=Path(name).parent)
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.type.WhichOneof("value") == "tensor_type" and not _known_type(v.type.tensor_type.elem_type):
                raise UnsupportedModelError(f"{name}: graph {kind} {v.name!r} has unknown element type "
                                            f"{v.type.tensor_type.elem_type}")
    functions = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model):
        if node.domain in ORT_DOMAINS or (node.domain, node.op_type) in functions:
            continue
        where = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
        raise UnsupportedModelError(
            f"{name}: {where} uses operator domain {node.domain!r}, which onnxruntime does not implement "
            "and the model does not define as a function"
        )


_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    _PACKED_4BIT.add(onnx.TensorProto.FLOAT4E2M1)


def _known_type(elem_type: int) -> bool:
    try:
        helper.tensor_dtype_to_np_dtype(elem_type)
        return True
    except (KeyError, ValueError):
        return False


def check_tensors(model: onnx.ModelProto, name: str, *, base_dir: Path | None = None) -> None:
    """UnsupportedModelError for a stored tensor whose type, shape and data disagree.

    External data is measured by its ``length`` entry, or without one by the bytes from
    ``offset`` to the end of its file in ``base_dir`` (locations are checked for safety before).
    """
    for t in onnx.external_data_helper._get_all_tensors(model):
        label = f"{name}: tensor {t.name!r}"
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, ValueError):
            raise UnsupportedModelError(f"{label} has unknown data type {t.data_type}") from None
        if any(d < 0 for d in t.dims):
            raise UnsupportedModelError(f"{label} has a negative dimension {list(t.dims)}")
        # even an empty tensor (a 0 among the dims) must have a shape NumPy can represent
        if len(t.dims) > 32 or math.prod(max(d, 1) for d in t.dims) >= 2**62:
            raise UnsupportedModelError(f"{label} has an impossible shape of rank {len(t.dims)} "
                                        f"({math.prod(max(d, 1) for d in t.dims):.3g} elements)")
        count = math.prod(t.dims)
        packed = t.data_type in _PACKED_4BIT
        need = (count + 1) // 2 if packed else count * dtype.itemsize
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            length = info.get("length", "")
            if not length and base_dir is not None and str(info.get("offset", "0") or "0").isdigit():
                target = base_dir / str(info.get("location", ""))
                if target.is_file():
                    length = str(max(0, target.stat().st_size - int(info.get("offset", "0") or "0")))
            if isinstance(length, str) and length.isdigit() and int(length) != need:
                # a streamed fold's placeholder is raw_data inside the model file: say what the file holds
                where = "data" if PLACEHOLDER_KEY in info else "external data"
                raise UnsupportedModelError(f"{label} has {length} bytes of {where}, its shape "
                                            f"{list(t.dims)} {dtype} needs {need}")
            continue
        if t.HasField("raw_data"):
            got = len(t.raw_data)
            if got != need:
                raise UnsupportedModelError(f"{label} has {got} bytes of data, its shape {list(t.dims)} "
                                            f"{dtype} needs {need}")
            continue
        if packed or t.data_type == onnx.TensorProto.STRING:
            continue
        field = helper.tensor_dtype_to_field(t.data_type)
        got = len(getattr(t, field))
        want = 2 * count if dtype.kind == "c" else count
        if got != want:
            raise UnsupportedModelError(f"{label} has {got} values, its shape {list(t.dims)} needs {want}")


def _all_nodes(model: onnx.ModelProto):
    stack = [list(model.graph.node)] + [list(f.node) for f in model.functions]
    while stack:
        for node in stack.pop():
            yield node
            stack.extend(list(g.node) for _, g in subgraphs(node))
