"""Test helpers shared by the whole suite: build small ONNX models, run them in onnxruntime
with graph optimizations disabled (so the runtime never folds BN for us)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 rejects.
_IR_FOR_OPSET = [(17, 8), (20, 9), (99, 10)]


def ir_version_for(opset: int) -> int:
    for max_opset, ir in _IR_FOR_OPSET:
        if opset <= max_opset:
            return ir
    raise AssertionError("unreachable")


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, name: str = "test",
               functions=(), extra_opsets=()) -> onnx.ModelProto:
    """A checked model from onnx.helper parts with a pinned, onnxruntime-loadable IR version."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version_for(opset),
                              functions=list(functions))
    onnx.checker.check_model(model, full_check=True)
    return model


def bfloat16_scale_model(k: float, shape: list[int], *, k_shape: list[int] | None = None) -> onnx.ModelProto:
    """y = bfloat16(float(x) · k) for a bfloat16 x of ``shape``: bfloat16 in and out, float32 inside
    (``k`` a float32 constant of ``k_shape``, a scalar by default)."""
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "k"], ["yf"]),
             helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, shape)],
                      [numpy_helper.from_array(np.full(k_shape or [], k, np.float32), "k")])


def session(model: onnx.ModelProto, *, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` on ``feeds``, onnxruntime CPU, ORT_DISABLE_ALL."""
    return session(model).run(None, feeds)
