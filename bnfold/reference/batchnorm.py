"""BatchNormalization: inference, training, backward, the folded affine map, running statistics.

Layout: x has shape (N, C, D1, ..., Dk), k >= 0; the channel axis is 1; every per-channel
vector (scale γ, bias β, mean, var) has shape (C,). One channel's statistics run over the
m = N·D1·…·Dk values of that channel.

Inference (ONNX BatchNormalization, training_mode=0; torch ``eval()``):

    y = γ·(x − E[x]) / √(Var[x] + ε) + β  =  s·x + t,   s = γ/√(Var[x] + ε),   t = β − s·E[x]

``fold_params`` returns (s, t) in float64 without rounding: it is the math source of the
converter, which rounds once to the model's dtype.

Training (ONNX training_mode=1; torch ``train()``): normalize with the batch's own mean μ_B and
BIASED variance σ²_B = (1/m)·Σ(x − μ_B)². The gradient is the closed form derived in
``bnfold.reference._standardize``. A batch with m = 1 value per channel is refused, as torch
does: its "statistics" are the value itself (y = β whatever x is) and m/(m − 1) is undefined.

Running statistics. Frameworks keep an exponential moving average, with two opposite
conventions that are easy to confuse, hence two functions with the convention in their names:

* torch (``update_running_stats_torch``): ``new = (1 − momentum)·old + momentum·current``,
  momentum 0.1 by default, and the current variance is UNBIASED: m/(m − 1)·σ²_B.
* ONNX BatchNormalization-15 training_mode=1 (``update_running_stats_onnx``):
  ``new = momentum·old + (1 − momentum)·current``, momentum 0.9 by default, and the current
  variance is BIASED: σ²_B. onnxruntime 1.31's CPU kernel computes exactly this (its
  running_var output matches the biased form to float32 rounding, the unbiased form is off).

Neither is the population estimate of Algorithm 2: see ``bnfold.reference.population``.
"""

from __future__ import annotations

import numpy as np

from bnfold.reference._checks import (
    CHANNEL_AXIS,
    all_but_channel,
    as_float64,
    channel_shape,
    check_batch_size,
    check_channel_vector,
    check_epsilon,
    check_min_rank,
    check_momentum,
    check_nonnegative,
    check_same_shape,
    result_dtype,
    values_per_channel,
)
from bnfold.reference._standardize import inverse_std, standardize, standardize_backward

_LAYOUT = "(N, C, ...) with channels on axis 1"


def _load_x(x, name: str = "x") -> tuple[np.ndarray, int]:
    x64 = as_float64(name, x)
    check_min_rank(name, x64, 2, _LAYOUT)
    return x64, x64.shape[CHANNEL_AXIS]


def _load_channel_vectors(num_channels: int, **vectors) -> list[np.ndarray]:
    out = []
    for name, value in vectors.items():
        v = as_float64(name, value)
        check_channel_vector(name, v, num_channels)
        out.append(v)
    return out


def _check_batch(x64: np.ndarray) -> None:
    check_batch_size(values_per_channel(x64.shape), x64.shape)


def batch_norm_inference(x, scale, bias, mean, var, epsilon: float = 1e-5, *, dtype=None) -> np.ndarray:
    """BatchNormalization with stored statistics (ONNX training_mode=0, torch eval()).

    Args:
        x: input of shape (N, C, ...), rank >= 2.
        scale: γ, shape (C,).
        bias: β, shape (C,).
        mean: population mean E[x], shape (C,).
        var: population variance Var[x], shape (C,), non-negative.
        epsilon: added to the variance inside the square root.
        dtype: result dtype; default x's float dtype (float64 for integer x).

    Returns:
        y = γ·(x − mean)/√(var + ε) + β, computed in float64, shape of x.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, c = _load_x(x)
    scale64, bias64, mean64, var64 = _load_channel_vectors(c, scale=scale, bias=bias, mean=mean, var=var)
    check_nonnegative("var", var64)
    inv_std = inverse_std(var64, check_epsilon(epsilon), "var")
    shape = channel_shape(x64.ndim)
    y = (x64 - mean64.reshape(shape)) * (scale64 * inv_std).reshape(shape) + bias64.reshape(shape)
    return y.astype(out_dtype)


def batch_norm_training(x, scale, bias, epsilon: float = 1e-5, *, dtype=None):
    """BatchNormalization with the batch's own statistics (ONNX training_mode=1, torch train()).

    Args:
        x: input of shape (N, C, ...), rank >= 2, with m >= 2 values per channel.
        scale: γ, shape (C,).
        bias: β, shape (C,).
        epsilon: added to the variance inside the square root.
        dtype: dtype of all three results; default x's float dtype (float64 for integer x).

    Returns:
        ``(y, batch_mean, batch_var)``: the normalized output, and the per-channel batch mean and
        BIASED batch variance (divided by m), which the running-statistics helpers and
        ``PopulationStats.update_moments`` take.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, c = _load_x(x)
    _check_batch(x64)
    scale64, bias64 = _load_channel_vectors(c, scale=scale, bias=bias)
    axes = all_but_channel(x64.ndim)
    x_hat, mean, var, _ = standardize(x64, axes, check_epsilon(epsilon), "batch")
    shape = channel_shape(x64.ndim)
    y = x_hat * scale64.reshape(shape) + bias64.reshape(shape)
    return y.astype(out_dtype), mean.reshape(c).astype(out_dtype), var.reshape(c).astype(out_dtype)


def batch_norm_backward(dy, x, scale, epsilon: float = 1e-5, *, dtype=None):
    """Gradients of training-mode BatchNormalization (batch statistics are differentiated too).

    Args:
        dy: upstream gradient ∂L/∂y, shape of x.
        x: the forward input, shape (N, C, ...), m >= 2 values per channel.
        scale: γ, shape (C,).
        epsilon: the forward's epsilon.
        dtype: dtype of the results; default x's float dtype (float64 for integer x).

    Returns:
        ``(dx, dscale, dbias)`` with shapes x.shape, (C,), (C,).
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, c = _load_x(x)
    _check_batch(x64)
    dy64 = as_float64("dy", dy)
    check_same_shape("dy", dy64, "x", x64)
    (scale64,) = _load_channel_vectors(c, scale=scale)
    axes = all_but_channel(x64.ndim)
    x_hat, _, _, inv_std = standardize(x64, axes, check_epsilon(epsilon), "batch")
    dx = standardize_backward(dy64 * scale64.reshape(channel_shape(x64.ndim)), x_hat, inv_std, axes)
    dscale = (dy64 * x_hat).sum(axis=axes)
    dbias = dy64.sum(axis=axes)
    return dx.astype(out_dtype), dscale.astype(out_dtype), dbias.astype(out_dtype)


def fold_params(scale, bias, mean, var, epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine map (s, t) with BN_inference(x) = s·x + t, in float64, unrounded.

    Args:
        scale: γ, 1-D of length C.
        bias: β, shape of scale.
        mean: E[x], shape of scale.
        var: Var[x], shape of scale, non-negative.
        epsilon: added to the variance inside the square root.

    Returns:
        ``(s, t)``, float64 arrays of shape (C,): s = γ/√(var + ε), t = β − s·mean. They are
        NOT rounded to the inputs' dtype: the caller rounds once, after its own float64 math.
    """
    scale64 = as_float64("scale", scale)
    if scale64.ndim != 1:
        raise ValueError(f"scale has shape {tuple(scale64.shape)}, expected a 1-D per-channel vector (C,)")
    bias64, mean64, var64 = (as_float64(n, v) for n, v in (("bias", bias), ("mean", mean), ("var", var)))
    for name, v in (("bias", bias64), ("mean", mean64), ("var", var64)):
        check_same_shape(name, v, "scale", scale64)
    check_nonnegative("var", var64)
    s = scale64 * inverse_std(var64, check_epsilon(epsilon), "var")
    return s, bias64 - s * mean64


def _load_running(running_mean, running_var, batch_mean, batch_var_biased) -> list[np.ndarray]:
    rm = as_float64("running_mean", running_mean)
    if rm.ndim != 1:
        raise ValueError(f"running_mean has shape {tuple(rm.shape)}, expected a 1-D per-channel vector (C,)")
    out = [rm]
    others = (("running_var", running_var), ("batch_mean", batch_mean), ("batch_var_biased", batch_var_biased))
    for name, value in others:
        v = as_float64(name, value)
        check_same_shape(name, v, "running_mean", rm)
        out.append(v)
    check_nonnegative("running_var", out[1])
    check_nonnegative("batch_var_biased", out[3])
    return out


def update_running_stats_torch(
    running_mean, running_var, batch_mean, batch_var_biased, m: int, momentum: float = 0.1, *, dtype=None
):
    """torch's moving average: momentum weighs the NEW value; the new variance is unbiased.

    ``new_mean = (1 − momentum)·running_mean + momentum·batch_mean``,
    ``new_var = (1 − momentum)·running_var + momentum·m/(m − 1)·batch_var_biased``, as
    ``torch.nn.functional.batch_norm(training=True)`` updates its buffers.

    Args:
        running_mean: current running mean, shape (C,).
        running_var: current running variance, shape (C,).
        batch_mean: this batch's per-channel mean, shape (C,).
        batch_var_biased: this batch's per-channel variance divided by m, shape (C,).
        m: values per channel in the batch (N·spatial), >= 2.
        momentum: weight of the new batch, in [0, 1]. torch's ``momentum=None`` (a cumulative
            average) is ``momentum=1/num_batches_tracked`` after the increment.
        dtype: result dtype; default running_mean's float dtype.

    Returns:
        ``(new_running_mean, new_running_var)``.
    """
    out_dtype = result_dtype(np.asarray(running_mean), dtype)
    rm, rv, bm, bv = _load_running(running_mean, running_var, batch_mean, batch_var_biased)
    m = check_batch_size(m)
    mom = check_momentum(momentum)
    new_mean = (1.0 - mom) * rm + mom * bm
    new_var = (1.0 - mom) * rv + mom * (m / (m - 1)) * bv
    return new_mean.astype(out_dtype), new_var.astype(out_dtype)


def update_running_stats_onnx(
    running_mean, running_var, batch_mean, batch_var_biased, momentum: float = 0.9, *, dtype=None
):
    """ONNX BatchNormalization-15 training_mode=1: momentum weighs the OLD value; variance biased.

    ``new_mean = momentum·running_mean + (1 − momentum)·batch_mean``,
    ``new_var = momentum·running_var + (1 − momentum)·batch_var_biased``, the op's
    running_mean / running_var outputs.

    Args:
        running_mean: the op's input_mean, shape (C,).
        running_var: the op's input_var, shape (C,).
        batch_mean: this batch's per-channel mean, shape (C,).
        batch_var_biased: this batch's per-channel variance divided by m, shape (C,).
        momentum: weight of the old value, in [0, 1] (the op's attribute, default 0.9).
        dtype: result dtype; default running_mean's float dtype.

    Returns:
        ``(new_running_mean, new_running_var)``.
    """
    out_dtype = result_dtype(np.asarray(running_mean), dtype)
    rm, rv, bm, bv = _load_running(running_mean, running_var, batch_mean, batch_var_biased)
    mom = check_momentum(momentum)
    new_mean = mom * rm + (1.0 - mom) * bm
    new_var = mom * rv + (1.0 - mom) * bv
    return new_mean.astype(out_dtype), new_var.astype(out_dtype)
