"""Values known before run time: initializers, Constant nodes and small constant expressions.

A tensor is converted to NumPy only when a pass asks for it. Constant expressions are the
shapes exporters emit around weights — Identity, Cast, Reshape, Unsqueeze, Squeeze,
Transpose, ConstantOfShape of constants — evaluated here in NumPy, nothing else: an op not
in this whitelist makes its output "computed", i.e. not a constant.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def make_tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    """A raw-data TensorProto of a float array (one copy: ``tobytes``, little-endian)."""
    value = np.asarray(value)
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        return numpy_helper.from_array(value, name)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    tensor.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    return tensor


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (value / value_float(s) / value_int(s)); None otherwise."""
    for attr in node.attribute:
        if attr.name == "value":
            return tensor_value(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value / value_string(s): not a dense numeric constant


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _axes(node: onnx.NodeProto, inputs: list[np.ndarray]) -> list[int] | None:
    if len(inputs) > 1:
        return [int(a) for a in inputs[1].reshape(-1)]
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _reshape(x: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    target = [int(d) for d in shape.reshape(-1)]
    if not allowzero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _unsqueeze(x: np.ndarray, axes: list[int]) -> np.ndarray:
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def evaluate(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray | None:
    """The output of one whitelisted op on constant inputs; None when not evaluable here."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not inputs:
        return None
    x = inputs[0]
    if op == "Identity":
        return x
    if op == "Cast":
        to = _attr(node, "to")
        return None if to is None else x.astype(helper.tensor_dtype_to_np_dtype(to))
    if op == "Reshape" and len(inputs) >= 2:
        return _reshape(x, inputs[1], _attr(node, "allowzero", 0))
    if op == "Unsqueeze":
        axes = _axes(node, inputs)
        return None if axes is None else _unsqueeze(x, axes)
    if op == "Squeeze":
        axes = _axes(node, inputs)
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    if op == "Transpose":
        perm = _attr(node, "perm")
        return np.transpose(x, None if perm is None else list(perm))
    if op == "ConstantOfShape":
        fill = _attr(node, "value")
        value = np.zeros(1, dtype=np.float32) if fill is None else numpy_helper.to_array(fill).reshape(-1)
        return np.full([int(d) for d in x.reshape(-1)], value[0], dtype=value.dtype)
    return None


EVALUABLE_OPS = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "ConstantOfShape"})
