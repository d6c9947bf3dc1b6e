"""Small models for the validation tests, and their folded twins computed by hand in NumPy
(float64 fold, one rounding), so these tests do not depend on bnfold's converter."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from tests.ortutil import make_model

EPS = 1e-5


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(xp, (3, 3), axis=(2, 3))  # N, C, H, W, 3, 3
    return np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]


def resnet_stack(layers: int = 50, channels: int = 8, size: int = 8, seed: int = 0):
    """Parameters of a ResNet-style stack: ``layers`` Conv+BN (3×3, pad 1), ReLU after each,
    a residual Add every second layer, BN statistics calibrated on data (as trained nets are)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, channels, size, size))
    skip, params = x, []
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))
        b = rng.standard_normal(channels) * 0.1
        gamma = rng.uniform(0.5, 1.5, channels) if i % 2 == 0 else rng.uniform(0.1, 0.5, channels)
        beta = rng.standard_normal(channels) * 0.1
        c = _conv3x3(x, w, b)
        mean, var = c.mean(axis=(0, 2, 3)), c.var(axis=(0, 2, 3), ddof=1)
        s = gamma / np.sqrt(var + EPS)
        y = c * s[None, :, None, None] + (beta - s * mean)[None, :, None, None]
        x = np.maximum(y if i % 2 == 0 else y + skip, 0)
        if i % 2 == 1:
            skip = x
        params.append((w, b, gamma, beta, mean, var))
    return params


def fold_conv_bn(w, b, gamma, beta, mean, var, dtype=np.float32):
    """W' = s·W, b' = s·(b − E) + β with s = γ/√(Var + ε), in float64, rounded once."""
    s = gamma / np.sqrt(var + EPS)
    return (w * s[:, None, None, None]).astype(dtype), (s * (b - mean) + beta).astype(dtype)


def stack_model(params, *, folded: bool, channels: int = 8, size: int = 8, dtype=np.float32,
                perturb=None, dynamic_batch: bool = False):
    """The stack as an ONNX model; ``perturb(layer, weight_array)`` may edit a folded weight."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, x, skip = [], [], "x", "x"
    for i, (w, b, gamma, beta, mean, var) in enumerate(params):
        if folded:
            wf, bf = fold_conv_bn(w, b, gamma, beta, mean, var, dtype)
            if perturb is not None:
                perturb(i, wf)
            inits += [numpy_helper.from_array(wf, f"W{i}"), numpy_helper.from_array(bf, f"B{i}")]
            nodes.append(helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
            y = f"c{i}"
        else:
            for name, a in zip(("W", "B", "g", "beta", "m", "v"), (w, b, gamma, beta, mean, var)):
                inits.append(numpy_helper.from_array(a.astype(dtype), f"{name}{i}"))
            nodes.append(helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"beta{i}", f"m{i}", f"v{i}"],
                                          [f"n{i}"], epsilon=EPS))
            y = f"n{i}"
        if i % 2 == 1:
            nodes.append(helper.make_node("Add", [y, skip], [f"a{i}"]))
            y = f"a{i}"
        nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
        x = f"r{i}"
        if i % 2 == 1:
            skip = x
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    batch = "batch" if dynamic_batch else 1
    return make_model(nodes, [helper.make_tensor_value_info("x", elem, [batch, channels, size, size])],
                      [helper.make_tensor_value_info("y", elem, [batch, channels, size, size])], inits)


def scale_weight(layer: int, factor: float, index=(3, 5, 1, 1)):
    """A ``perturb`` that multiplies one weight of one layer by ``factor``."""
    def perturb(i, w):
        if i == layer:
            w[index] = w[index] * w.dtype.type(factor)
    return perturb


def nudge_weight_ulps(layer: int, ulps: int, index=(3, 5, 1, 1)):
    """A ``perturb`` that moves one weight of one layer by ``ulps`` units in the last place."""
    def perturb(i, w):
        if i == layer:
            for _ in range(ulps):
                w[index] = np.nextafter(w[index], w.dtype.type(np.inf))
    return perturb


def conv_bn(*, folded: bool, dynamic: bool = False, channels: int = 4, seed: int = 0,
            bn_scale: float = 1.0):
    """One Conv (3×3, pad 1) + BN, or its folded Conv; ``bn_scale`` multiplies γ in the
    folded copy only (1.0: exact fold). Input ``x`` [N, 3, H, W]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    mean = rng.standard_normal(channels).astype(np.float32)
    var = rng.uniform(0.5, 2, channels).astype(np.float32)
    shape_in = ["N", 3, "H", "W"] if dynamic else [1, 3, 6, 6]
    shape_out = ["N", channels, "H", "W"] if dynamic else [1, channels, 6, 6]
    if folded:
        wf, bf = fold_conv_bn(w.astype(np.float64), b.astype(np.float64), gamma.astype(np.float64) * bn_scale,
                              beta.astype(np.float64), mean.astype(np.float64), var.astype(np.float64))
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])]
        inits = [numpy_helper.from_array(wf, "W"), numpy_helper.from_array(bf, "B")]
    else:
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["y"], epsilon=EPS)]
        inits = [numpy_helper.from_array(a, n) for n, a in
                 zip(("W", "B", "g", "beta", "m", "v"), (w, b, gamma, beta, mean, var))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], inits)


def gather_mask_model(*, broken: bool = False):
    """Int64 indices + bool mask inputs, two outputs: ``rows`` (float) and ``kept`` (int64).

    ``rows = Where(mask, Gather(table, idx), 0) · k`` with k = 1 (or 1.5 when ``broken``:
    only ``rows`` changes); ``kept = Cast(mask)`` row sums, the same in both."""
    table = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    k = np.array(1.5 if broken else 1.0, dtype=np.float32)
    zero = np.array(0.0, dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),          # [B, 3]
        helper.make_node("Unsqueeze", ["mask", "axes"], ["m2"]),              # [B, 1]
        helper.make_node("Where", ["m2", "g", "zero"], ["w"]),
        helper.make_node("Mul", ["w", "k"], ["rows"]),
        helper.make_node("Cast", ["mask"], ["kept"], to=TensorProto.INT64),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(k, "k"),
             numpy_helper.from_array(zero, "zero"), numpy_helper.from_array(np.array([1], np.int64), "axes")]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("kept", TensorProto.INT64, ["B"])],
        inits,
    )


def sqrt_model(*, offset: float = 0.0):
    """``y = Sqrt(x + offset)``: NaN exactly where x + offset < 0 (tests NaN handling)."""
    nodes = [helper.make_node("Add", ["x", "o"], ["s"]), helper.make_node("Sqrt", ["s"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                      [numpy_helper.from_array(np.array(offset, np.float32), "o")])
