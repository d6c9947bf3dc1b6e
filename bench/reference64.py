"""A float64 evaluation of an ONNX model: the "exact" function its stored tensors define.

onnxruntime's CPU provider has no float64 Conv, ConvTranspose or GlobalAveragePool, so the
model is interpreted node by node with torch's float64 CPU kernels: every stored tensor
(float16/bfloat16/float32 alike) is upcast exactly to float64 and every op computes in float64.
The result is the function the *stored* weights define, to ~1e-16 relative. The bench uses it
twice: on the unfolded model (the answer every output is measured against) and on each tool's
output ("fold error": what the fold did to the function, free of any runtime's rounding).

What the tools emit is covered: Conv (with bias), ConvTranspose, Gemm, MatMul, the element-wise
arithmetic onnxoptimizer leaves (Add/Sub/Mul/Div/Sqrt/Unsqueeze/Cast), onnxruntime's fused
contrib ops (``com.microsoft`` FusedConv / FusedGemm with their activation) and the rest of the
workloads' ops. ``Cast`` between floating types is the identity here (onnxruntime inserts
float16 → float32 casts to run an fp16 model in float32; upcasts are exact, and the evaluation
is of the stored function, not of a runtime's precision). Any other op raises
``NotImplementedError`` naming it (the table then says why the cell is empty).

Several input samples are evaluated in lockstep, so each weight is converted once.
torch is the project's ``torch`` extra; without it the float64 columns are "n/a".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


def _conv(ins: list, a: dict):
    import torch.nn.functional as F

    x, w = ins[0], ins[1]
    dims = w.dim() - 2
    if _text(a.get("auto_pad", "NOTSET")) != "NOTSET":
        raise NotImplementedError("float64 reference: Conv auto_pad is not supported")
    x, pad = _conv_pads(x, a.get("pads", [0] * 2 * dims), dims)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1] * dims),
              padding=pad, dilation=a.get("dilations", [1] * dims), groups=a.get("group", 1))


def _gemm(ins: list, a: dict):
    A, B = ins[0], ins[1]
    if a.get("transA", 0):
        A = A.T
    if a.get("transB", 0):
        B = B.T
    y = a.get("alpha", 1.0) * (A @ B)
    return y + a.get("beta", 1.0) * ins[2] if len(ins) > 2 and ins[2] is not None else y


def _activation(y, a: dict):
    """onnxruntime's fused activations (FusedConv, FusedGemm): ``activation`` + ``activation_params``."""
    import torch

    name = _text(a.get("activation", "Identity"))
    params = list(a.get("activation_params", []))
    if name in ("", "Identity"):
        return y
    if name == "Relu":
        return torch.relu(y)
    if name == "Clip":
        return torch.clamp(y, params[0], params[1])
    if name == "Sigmoid":
        return torch.sigmoid(y)
    if name == "Tanh":
        return torch.tanh(y)
    if name == "LeakyRelu":
        return torch.nn.functional.leaky_relu(y, params[0] if params else 0.01)
    if name == "HardSigmoid":
        alpha, beta = params if params else (0.2, 0.5)
        return torch.clamp(alpha * y + beta, 0.0, 1.0)
    raise NotImplementedError(f"float64 reference: fused activation {name} is not supported")


def _axes(ins: list, a: dict) -> list[int]:
    if len(ins) > 1 and ins[1] is not None:
        return [int(v) for v in ins[1].reshape(-1).tolist()]
    return list(a.get("axes", []))


def _unsqueeze(x, axes: list[int]):
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _run_node(op: str, ins: list, a: dict, domain: str = ""):
    import torch
    import torch.nn.functional as F

    if domain not in ("", "ai.onnx"):
        if domain == "com.microsoft" and op == "FusedConv":
            y = _conv(ins[:3], a)
            if len(ins) > 3 and ins[3] is not None:  # Conv + Add (+ activation): the sum comes first
                y = y + ins[3]
            return _activation(y, a)
        if domain == "com.microsoft" and op == "FusedGemm":
            return _activation(_gemm(ins, a), a)
        raise NotImplementedError(f"float64 reference: op {domain}.{op} is not supported")
    if op == "Conv":
        return _conv(ins, a)
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        dims = w.dim() - 2
        pads = a.get("pads", [0] * 2 * dims)
        if pads[:dims] != pads[dims:] or "output_shape" in a:
            raise NotImplementedError("float64 reference: ConvTranspose with asymmetric pads or output_shape")
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
        return _gemm(ins, a)
    if op == "MaxPool":
        dims = ins[0].dim() - 2
        pads = a.get("pads", [0] * 2 * dims)
        if pads[:dims] != pads[dims:] or a.get("ceil_mode", 0):
            raise NotImplementedError("float64 reference: MaxPool with asymmetric pads or ceil_mode")
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
    if op == "Cast":
        if a["to"] in _FLOAT_TYPES:
            return ins[0] if ins[0].is_floating_point() else ins[0].to(torch.float64)
        return torch.from_numpy(ins[0].numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"])))
    if op == "Unsqueeze":
        return _unsqueeze(ins[0], _axes(ins, a))
    if op == "Squeeze":
        axes = _axes(ins, a)
        x = ins[0]
        for ax in sorted((ax % x.dim() for ax in axes), reverse=True) if axes else ():
            x = x.squeeze(ax)
        return x if axes else x.squeeze()
    if op == "Reshape":
        shape = [int(v) for v in ins[1].tolist()]
        if not a.get("allowzero", 0):
            shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return ins[0].reshape(shape)
    if op == "Transpose":
        perm = a.get("perm", list(reversed(range(ins[0].dim()))))
        return ins[0].permute(*perm)
    if op == "Concat":
        return torch.cat(ins, dim=a["axis"])
    if op == "LeakyRelu":
        return F.leaky_relu(ins[0], a.get("alpha", 0.01))
    simple = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Identity": lambda x: x,
              "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
              "Sqrt": torch.sqrt, "Neg": torch.neg, "Reciprocal": torch.reciprocal, "MatMul": torch.matmul}
    if op in simple:
        return simple[op](*ins)
    raise NotImplementedError(f"float64 reference: op {op} is not supported")


def _to_torch(array: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(array, dtype=np.float64 if array.dtype.kind == "f" else array.dtype))


def evaluate_float64_samples(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
                             names: list[str] | None = None) -> list[list[np.ndarray]]:
    """The outputs ``names`` (default: all, in graph order) of ``model`` on each feed dict of
    ``samples``, computed in float64; one list of arrays per sample.

    ``model`` must have its external data loaded. Each stored tensor is converted to float64
    when first used and dropped after its last use, for all samples at once, so a model of N
    bytes needs about N (the loaded model) plus one float64 layer, not 3 N.

    Raises:
        ImportError: torch is not installed.
        NotImplementedError: the model uses an op (or a feature) this evaluator does not know.
    """
    import torch

    if model.functions or any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        raise NotImplementedError("float64 reference: functions and subgraphs are not supported")
    inits = {t.name: t for t in model.graph.initializer}
    names = names or [o.name for o in model.graph.output]
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    envs = [{k: _to_torch(v) for k, v in feeds.items()} for feeds in samples]
    keep = set(names)
    with torch.no_grad():
        for i, node in enumerate(model.graph.node):
            attrs = _attrs(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                if "value" not in attrs:
                    raise NotImplementedError("float64 reference: Constant without a tensor value")
                value = _to_torch(numpy_helper.to_array(attrs["value"]))
                for env in envs:
                    env[node.output[0]] = value
                continue
            shared = {}
            for name in node.input:
                if name and name not in envs[0] and name not in shared:
                    if name not in inits:
                        raise NotImplementedError(f"float64 reference: input {name!r} of {node.name} is unknown")
                    shared[name] = _to_torch(numpy_helper.to_array(inits[name]))
            for env in envs:
                ins = [None if not name else env[name] if name in env else shared[name] for name in node.input]
                env[node.output[0]] = _run_node(node.op_type, ins, attrs, node.domain)
                for name in node.input:
                    if last_use.get(name) == i and name not in keep and name in env:
                        del env[name]
    missing = [n for n in names if n not in envs[0]]
    if missing:
        raise NotImplementedError(f"float64 reference: output {missing[0]!r} is not computed by the graph")
    return [[env[n].numpy() for n in names] for env in envs]


def evaluate_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` (external data loaded) on one feed dict, computed in float64.

    Raises:
        ImportError: torch is not installed.
        NotImplementedError: the model uses an op this evaluator does not know.
    """
    return evaluate_float64_samples(model, [feeds])[0]
