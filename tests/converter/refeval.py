"""A float64 NumPy evaluator for the small graphs the converter tests build.

It is the oracle for the cases onnxruntime CPU cannot run (Conv/ConvTranspose in float64,
everything in bfloat16) and the float64 ground truth the converter's float error is measured
against. Every tensor is upcast to float64 on entry, so the only rounding it sees is the one
already present in the stored parameters: ``evaluate(model)`` is the exact function the
model's stored numbers define.

Semantics follow the ONNX operator specs:

* Conv: ``y[n, o, p] = b[o] + sum_{c, k} w[o, c, k] * xpad[n, g(o)*C_in/g + c, p*s + k*d]``
  with explicit ``pads`` (begin..., end...) or ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID
  (SAME: total padding ``max(0, (ceil(L/s) - 1)*s + (k - 1)*d + 1 - L)``, the odd unit at the
  end for SAME_UPPER, at the beginning for SAME_LOWER).
* ConvTranspose: every input position ``i`` scatters ``w[c, j, k]`` to full-output position
  ``i*s + k*d``; the full output (length ``(L - 1)*s + (k - 1)*d + 1 + output_padding``) is
  cropped by ``pads``; weight layout ``[C_in, C_out/g, k...]``.
* BatchNormalization: inference form ``(x - mean) / sqrt(var + eps) * scale + B`` with the
  parameters on axis 1 (``spatial=0`` of opset 7: parameters shaped ``[C, D1, ...]`` per
  activation); ``training_mode=1``: batch statistics (biased variance) over all axes but 1,
  plus the two running-statistics outputs ``momentum*running + (1 - momentum)*current``.
* Gemm: ``alpha * A' @ B' + beta * C``.

Only what the converter tests need is implemented; anything else raises NotImplementedError
so a test can never silently evaluate a graph wrongly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["evaluate", "conv", "conv_transpose", "to_float64"]


def to_float64(array) -> np.ndarray:
    """Exact upcast (float16/bfloat16/float32 values are all representable in float64)."""
    return np.asarray(array).astype(np.float32).astype(np.float64) if np.asarray(array).dtype.name == "bfloat16" \
        else np.asarray(array, dtype=np.float64)


def _same_pads(size: int, k: int, s: int, d: int, upper: bool) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _conv_pads(attrs: dict, spatial: list[int], kernel: list[int], strides, dilations) -> list[int]:
    dims = len(spatial)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(spatial[i], kernel[i], strides[i], dilations[i], auto_pad == "SAME_UPPER")
                 for i in range(dims)]
        return [p[0] for p in pairs] + [p[1] for p in pairs]
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    return list(attrs.get("pads", [0] * (2 * dims)))


def conv(x, w, b=None, *, strides=None, dilations=None, pads=None, group=1, auto_pad="NOTSET"):
    """ONNX Conv in float64 (any number of spatial dims)."""
    x, w = to_float64(x), to_float64(w)
    n, c_in = x.shape[:2]
    spatial = list(x.shape[2:])
    c_out, c_per_group = w.shape[:2]
    kernel = list(w.shape[2:])
    dims = len(kernel)
    strides = list(strides or [1] * dims)
    dilations = list(dilations or [1] * dims)
    pads = _conv_pads({"pads": pads or [0] * (2 * dims), "auto_pad": auto_pad}, spatial, kernel,
                      strides, dilations)
    assert c_in == c_per_group * group, (c_in, c_per_group, group)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    out = [(spatial[i] + pads[i] + pads[i + dims] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(dims)]
    xg = xp.reshape(n, group, c_per_group, *xp.shape[2:])
    wg = w.reshape(group, c_out // group, c_per_group, *kernel)
    y = np.zeros((n, group, c_out // group, *out))
    for idx in itertools.product(*[range(k) for k in kernel]):
        window = tuple(slice(idx[i] * dilations[i], idx[i] * dilations[i] + strides[i] * (out[i] - 1) + 1,
                             strides[i]) for i in range(dims))
        patch = xg[(Ellipsis, *window)]  # [n, g, c, *out]
        y += np.einsum("ngc...,goc->ngo...", patch, wg[(Ellipsis, *idx)])
    y = y.reshape(n, c_out, *out)
    if b is not None:
        y = y + to_float64(b).reshape(1, c_out, *[1] * dims)
    return y


def conv_transpose(x, w, b=None, *, strides=None, dilations=None, pads=None, group=1, output_padding=None):
    """ONNX ConvTranspose in float64 (explicit pads; no auto_pad / output_shape)."""
    x, w = to_float64(x), to_float64(w)
    n, c_in = x.shape[:2]
    spatial = list(x.shape[2:])
    kernel = list(w.shape[2:])
    dims = len(kernel)
    c_out = w.shape[1] * group
    strides = list(strides or [1] * dims)
    dilations = list(dilations or [1] * dims)
    pads = list(pads or [0] * (2 * dims))
    output_padding = list(output_padding or [0] * dims)
    full = [(spatial[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i]
            for i in range(dims)]
    xg = x.reshape(n, group, c_in // group, *spatial)
    wg = w.reshape(group, c_in // group, c_out // group, *kernel)
    y = np.zeros((n, group, c_out // group, *full))
    for idx in itertools.product(*[range(k) for k in kernel]):
        window = tuple(slice(idx[i] * dilations[i], idx[i] * dilations[i] + strides[i] * (spatial[i] - 1) + 1,
                             strides[i]) for i in range(dims))
        y[(Ellipsis, *window)] += np.einsum("ngc...,gco->ngo...", xg, wg[(Ellipsis, *idx)])
    crop = tuple(slice(pads[i], full[i] - pads[i + dims]) for i in range(dims))
    y = y[(Ellipsis, *crop)].reshape(n, c_out, *[full[i] - pads[i] - pads[i + dims] for i in range(dims)])
    if b is not None:
        y = y + to_float64(b).reshape(1, c_out, *[1] * dims)
    return y


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _batch_norm(node, inputs, attrs, opset):
    x, scale, bias, mean, var = inputs
    eps = attrs.get("epsilon", 1e-5)
    if opset < 9 and attrs.get("spatial", 1) == 0:
        shape = (1, *scale.shape)  # per-activation parameters [C, D1, ...]
    else:
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if attrs.get("training_mode", 0):
        axes = tuple(i for i in range(x.ndim) if i != 1)
        cur_mean, cur_var = x.mean(axis=axes), x.var(axis=axes)
        y = (x - cur_mean.reshape(shape)) / np.sqrt(cur_var.reshape(shape) + eps) * scale.reshape(shape) \
            + bias.reshape(shape)
        mom = attrs.get("momentum", 0.9)
        return [y, mom * mean + (1 - mom) * cur_mean, mom * var + (1 - mom) * cur_var][: len(node.output)]
    return [(x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape)
            + bias.reshape(shape)]


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


def _run_node(node: onnx.NodeProto, inputs: list, opset: int) -> list:
    op, attrs = node.op_type, _attrs(node)
    if op == "Conv":
        return [conv(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None,
                     strides=attrs.get("strides"), dilations=attrs.get("dilations"), pads=attrs.get("pads"),
                     group=attrs.get("group", 1), auto_pad=attrs.get("auto_pad", b"NOTSET"))]
    if op == "ConvTranspose":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in attrs:
            raise NotImplementedError("ConvTranspose auto_pad/output_shape")
        return [conv_transpose(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None,
                               strides=attrs.get("strides"), dilations=attrs.get("dilations"),
                               pads=attrs.get("pads"), group=attrs.get("group", 1),
                               output_padding=attrs.get("output_padding"))]
    if op == "BatchNormalization":
        return _batch_norm(node, inputs, attrs, opset)
    if op == "Gemm":
        return [_gemm(*inputs, alpha=attrs.get("alpha", 1.0), beta=attrs.get("beta", 1.0),
                      transA=attrs.get("transA", 0), transB=attrs.get("transB", 0))]
    simple = {
        "MatMul": lambda a, b: a @ b,
        "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Sum": lambda *a: sum(a),
        "Relu": lambda a: np.maximum(a, 0.0),
        "Identity": lambda a: a,
        "Sqrt": np.sqrt,
    }
    if op in simple:
        return [simple[op](*inputs)]
    if op == "Reshape":
        shape = [int(v) for v in (inputs[1] if len(inputs) > 1 else attrs["shape"])]
        shape = [inputs[0].shape[i] if v == 0 and not attrs.get("allowzero", 0) else v for i, v in enumerate(shape)]
        return [inputs[0].reshape(shape)]
    if op == "Transpose":
        return [np.transpose(inputs[0], attrs.get("perm"))]
    if op == "Concat":
        return [np.concatenate(inputs, axis=attrs["axis"])]
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        return [inputs[0].reshape(int(np.prod(inputs[0].shape[:axis])), -1)]
    if op == "Unsqueeze":
        axes = [int(a) for a in (inputs[1] if len(inputs) > 1 else attrs["axes"])]
        y = inputs[0]
        rank = y.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            y = np.expand_dims(y, a)
        return [y]
    if op == "Constant":
        if "value" in attrs:
            return [_tensor(attrs["value"])]
        if "value_float" in attrs:
            return [np.array(attrs["value_float"], dtype=np.float64)]
        if "value_floats" in attrs:
            return [np.array(attrs["value_floats"], dtype=np.float64)]
        if "value_ints" in attrs:
            return [np.array(attrs["value_ints"], dtype=np.int64)]
        raise NotImplementedError(f"Constant with {sorted(attrs)}")
    if op == "ConstantOfShape":
        value = _tensor(attrs["value"]).reshape(()) if "value" in attrs else np.float64(0.0)
        return [np.full([int(v) for v in inputs[0]], value)]
    raise NotImplementedError(f"refeval has no {op}")


def _tensor(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    return a if a.dtype.kind in "iub" else to_float64(a)


def evaluate(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
             outputs: list[str] | None = None) -> list[np.ndarray]:
    """All graph outputs (or the named tensors) of ``model`` on ``feeds``, in float64.

    Graph inputs that also have an initializer take the fed value when fed, else the
    initializer (onnxruntime's rule for overridable initializers).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    values: dict[str, np.ndarray] = {t.name: _tensor(t) for t in model.graph.initializer}
    for name, value in feeds.items():
        a = np.asarray(value)
        values[name] = a if a.dtype.kind in "iub" else to_float64(a)
    for node in model.graph.node:
        inputs = [values[i] if i else None for i in node.input]
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        results = _run_node(node, inputs, opset)
        for name, value in zip(node.output, results):
            values[name] = value
    wanted = outputs if outputs is not None else [o.name for o in model.graph.output]
    return [values[name] for name in wanted]


# --- dtype-aware comparisons ---------------------------------------------------------------------

# Significand bits p and smallest normal exponent of each float dtype: ulp(v) = 2**(floor(log2|v|) - p).
_FLOAT_FORMAT = {"float64": (52, -1022), "float32": (23, -126), "float16": (10, -14), "bfloat16": (7, -126)}


def ulp(values, dtype) -> np.ndarray:
    """The spacing of ``dtype`` at each float64 value (subnormal spacing below the normal range)."""
    p, emin = _FLOAT_FORMAT[np.dtype(dtype).name]
    v = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    e = np.where(v > 0, np.maximum(e, emin), emin)
    return np.exp2(e - p)


def rounding_error_in_ulp(stored, exact, dtype) -> float:
    """max |stored - exact| / ulp(exact): 0.5 or less means ``stored`` is ``exact`` rounded once."""
    stored64, exact64 = to_float64(stored), np.asarray(exact, dtype=np.float64)
    assert stored64.shape == exact64.shape, (stored64.shape, exact64.shape)
    return float(np.max(np.abs(stored64 - exact64) / ulp(exact64, dtype), initial=0.0))
