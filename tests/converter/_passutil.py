"""Helpers for the converter's pass tests: tiny model builders, NumPy reference convolutions
(float64, explicit loops over kernel offsets), dtype-aware comparison."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold
from tests.ortutil import make_model, run

BF16 = np.dtype(ml_dtypes.bfloat16)
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.float64): TensorProto.DOUBLE, BF16: TensorProto.BFLOAT16}
# Relative tolerance (of the output's range) for folded vs unfolded, both run in `dtype`.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2, np.dtype(np.float64): 1e-12, BF16: 2e-2}


def tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def vi(name: str, dtype, shape) -> onnx.ValueInfoProto:
    """A tensor value info; an int ``shape`` is a rank (symbolic dims)."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, ONNX_TYPE[np.dtype(dtype)], shape)


def bn_params(rng, c: int, dtype, prefix: str = "bn") -> tuple[list[str], list[onnx.TensorProto]]:
    """Non-trivial BN parameters: small variances, so a wrong ε shows up."""
    values = [rng.normal(1.0, 0.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c), rng.uniform(0.01, 0.5, c)]
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return names, [tensor(n, v.astype(dtype)) for n, v in zip(names, values)]


def bn_node(x: str, y: str, params: list[str], *, name: str = "bn", epsilon: float = 1e-3, **attrs):
    return helper.make_node("BatchNormalization", [x, *params], [y], name=name, epsilon=epsilon, **attrs)


def bn_reference(y: np.ndarray, inits: dict[str, np.ndarray], params: list[str], epsilon: float) -> np.ndarray:
    scale, bias, mean, var = (inits[p].astype(np.float64) for p in params)
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) + bias.reshape(shape)


def assert_close(ref: np.ndarray, got: np.ndarray, dtype) -> None:
    ref64, got64 = np.asarray(ref).astype(np.float64), np.asarray(got).astype(np.float64)
    assert ref64.shape == got64.shape
    scale = max(1.0, float(np.abs(ref64).max()))
    err = float(np.abs(ref64 - got64).max())
    assert err <= RTOL[np.dtype(dtype)] * scale, f"max abs error {err:.3g} > {RTOL[np.dtype(dtype)] * scale:.3g}"


def fold_and_compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], dtype, **options):
    """Fold, check_model(full_check), and compare every output in onnxruntime (ORT_DISABLE_ALL)."""
    before = model.SerializeToString()
    result = fold(model, **options)
    assert model.SerializeToString() == before, "fold mutated its input model"
    onnx.checker.check_model(result.model, full_check=True)
    for ref, got in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert_close(ref, got, dtype)
    return result


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def entry(result, name: str):
    return next(e for e in result.report.entries if e.node == name)


def _out_size(size, k, stride, dilation, pad_begin, pad_end):
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def ref_conv(x, w, b=None, *, strides=None, pads=None, dilations=None, groups=1) -> np.ndarray:
    """N-D convolution (ONNX Conv semantics), float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = pads or [0] * (2 * nd)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out_sp = [_out_size(x.shape[2 + i], w.shape[2 + i], strides[i], dilations[i], pads[i], pads[i + nd]) for i in range(nd)]
    c_out, c_in_g = w.shape[0], w.shape[1]
    c_out_g = c_out // groups
    y = np.zeros((x.shape[0], c_out, *out_sp))
    for k in itertools.product(*[range(d) for d in w.shape[2:]]):
        sl = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + strides[i] * (out_sp[i] - 1) + 1, strides[i])
                   for i in range(nd))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            wk = w[(slice(g * c_out_g, (g + 1) * c_out_g), slice(None)) + k]
            y[:, g * c_out_g:(g + 1) * c_out_g] += np.einsum("nc...,oc->no...", patch[:, g * c_in_g:(g + 1) * c_in_g], wk)
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return y


def ref_conv_transpose(x, w, b=None, *, strides=None, pads=None, dilations=None, output_padding=None, groups=1):
    """N-D transposed convolution (ONNX ConvTranspose semantics, explicit pads), float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = pads or [0] * (2 * nd)
    output_padding = output_padding or [0] * nd
    c_in, c_out_g = w.shape[0], w.shape[1]
    c_in_g = c_in // groups
    full = [strides[i] * (x.shape[2 + i] - 1) + (w.shape[2 + i] - 1) * dilations[i] + 1 + output_padding[i]
            for i in range(nd)]
    y = np.zeros((x.shape[0], c_out_g * groups, *full))
    for k in itertools.product(*[range(d) for d in w.shape[2:]]):
        sl = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + strides[i] * (x.shape[2 + i] - 1) + 1, strides[i])
                   for i in range(nd))
        for g in range(groups):
            wk = w[(slice(g * c_in_g, (g + 1) * c_in_g), slice(None)) + k]
            contrib = np.einsum("nc...,co->no...", x[:, g * c_in_g:(g + 1) * c_in_g], wk)
            y[(slice(None), slice(g * c_out_g, (g + 1) * c_out_g)) + sl] += contrib
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return y


__all__ = ["make_model", "run", "helper", "TensorProto"]
