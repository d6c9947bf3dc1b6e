"""A float64 evaluation of an ONNX model: the "exact" answer the error columns are measured against.

onnxruntime's CPU provider has no float64 Conv, ConvTranspose or GlobalAveragePool, so the
model is interpreted node by node with torch's float64 CPU kernels: every stored tensor
(float16/bfloat16/float32 alike) is upcast exactly to float64 and every op computes in float64.
The result is the function the *stored* unfolded weights define, to ~1e-16 relative, which is
what a perfect fold would compute. Only the ops the bench workloads use are supported; any
other op raises ``NotImplementedError`` naming it (the table then shows "n/a").

torch is the project's ``torch`` extra; without it the float64 columns are "n/a".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_pads(x, pads, dims):
    """ONNX pads [b1, b2, …, e1, e2, …] → symmetric torch padding or an explicit F.pad."""
    import torch.nn.functional as F

    begin, end = list(pads[:dims]), list(pads[dims:])
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat), [0] * dims


def _run_node(op: str, ins: list, a: dict):
    import torch
    import torch.nn.functional as F

    if op == "Conv":
        x, w = ins[0], ins[1]
        dims = w.dim() - 2
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("Conv auto_pad")
        x, pad = _conv_pads(x, a.get("pads", [0] * 2 * dims), dims)
        fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return fn(x, w, ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1] * dims),
                  padding=pad, dilation=a.get("dilations", [1] * dims), groups=a.get("group", 1))
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        dims = w.dim() - 2
        pads = a.get("pads", [0] * 2 * dims)
        if pads[:dims] != pads[dims:] or "output_shape" in a:
            raise NotImplementedError("ConvTranspose with asymmetric pads or output_shape")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(x, w, ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1] * dims),
                  padding=pads[:dims], output_padding=a.get("output_padding", [0] * dims),
                  groups=a.get("group", 1), dilation=a.get("dilations", [1] * dims))
    if op == "BatchNormalization":
        x, g, b, m, v = ins
        shape = [1, -1] + [1] * (x.dim() - 2)
        s = g / torch.sqrt(v + a.get("epsilon", 1e-5))
        return (x - m.reshape(shape)) * s.reshape(shape) + b.reshape(shape)
    if op == "Gemm":
        A, B = ins[0], ins[1]
        if a.get("transA", 0):
            A = A.T
        if a.get("transB", 0):
            B = B.T
        y = a.get("alpha", 1.0) * (A @ B)
        return y + a.get("beta", 1.0) * ins[2] if len(ins) > 2 else y
    if op == "MaxPool":
        dims = ins[0].dim() - 2
        pads = a.get("pads", [0] * 2 * dims)
        if pads[:dims] != pads[dims:] or a.get("ceil_mode", 0):
            raise NotImplementedError("MaxPool with asymmetric pads or ceil_mode")
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        # Both ONNX and torch pad MaxPool with -inf.
        return fn(ins[0], a["kernel_shape"], stride=a.get("strides", [1] * dims), padding=pads[:dims],
                  dilation=a.get("dilations", [1] * dims))
    if op == "GlobalAveragePool":
        return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)
    if op == "Flatten":
        axis = a.get("axis", 1)
        return ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
        return torch.clamp(ins[0], lo, hi)
    simple = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Identity": lambda x: x,
              "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
              "MatMul": torch.matmul}
    if op in simple:
        return simple[op](*ins)
    raise NotImplementedError(f"float64 reference: op {op} is not supported")


def evaluate_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` (external data loaded) on ``feeds``, computed in float64.

    Raises:
        ImportError: torch is not installed.
        NotImplementedError: the model uses an op this evaluator does not know.
    """
    import torch

    if model.functions or any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        raise NotImplementedError("float64 reference: functions and subgraphs are not supported")
    # Tensors are converted when first used and dropped after their last use, so a model of
    # N bytes needs about N (the loaded model) plus one float64 layer, not 3 N.
    inits = {t.name: t for t in model.graph.initializer}
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    env = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in feeds.items()}
    outputs = {o.name for o in model.graph.output}
    with torch.no_grad():
        for i, node in enumerate(model.graph.node):
            ins = []
            for name in node.input:
                if not name:
                    ins.append(None)
                elif name in env:
                    ins.append(env[name])
                elif name in inits:
                    array = numpy_helper.to_array(inits[name])
                    ins.append(torch.from_numpy(array.astype(np.float64 if array.dtype.kind == "f" else array.dtype)))
                else:
                    raise NotImplementedError(f"float64 reference: input {name!r} of {node.name} is unknown")
            env[node.output[0]] = _run_node(node.op_type, ins, _attrs(node))
            for name in node.input:
                if last_use.get(name) == i and name not in outputs and name in env:
                    del env[name]
    return [env[o.name].numpy() for o in model.graph.output]
