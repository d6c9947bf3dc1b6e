"""GroupNormalization: split the channels into G groups, normalize each group per sample.

x has shape (N, C, D1, ..., Dk), k >= 0 (rank >= 2, as torch.nn.functional.group_norm), and G
must divide C. Viewing x as (N, G, C/G, D1, ..., Dk), each block is one (n, g) pair and holds
the (C/G)·D1·…·Dk values of that sample's group; the affine parameters are PER CHANNEL:

    y[n, c] = γ[c]·(x[n, c] − μ[n, g(c)])/√(σ²[n, g(c)] + ε) + β[c],   g(c) = c // (C/G)

This is torch's GroupNorm and ONNX GroupNormalization-21. ONNX GroupNormalization-18 took
per-GROUP scale and bias of shape (G,), which is the special case γ = repeat(γ_G, C/G); pass
``np.repeat(scale_g, C // G)`` to reproduce it. G = 1 is LayerNorm over (C, D1, ...) with
per-channel parameters; G = C is InstanceNorm. The backward is the shared closed form of
``bnfold.reference._standardize`` over each group's axes.
"""

from __future__ import annotations

import numbers

import numpy as np

from bnfold.reference._checks import (
    as_float64,
    channel_shape,
    check_channel_vector,
    check_epsilon,
    check_min_rank,
    check_same_shape,
    result_dtype,
)
from bnfold.reference._standardize import standardize, standardize_backward

_LAYOUT = "(N, C, ...) with channels on axis 1"


def _check_num_groups(num_groups, num_channels: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r}, expected a positive integer")
    if num_channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide the number of channels of x (axis 1) = {num_channels}"
        )
    return int(num_groups)


def _prepare(x, scale, num_groups):
    """x as float64 grouped to (N, G, C/G, ...), the per-channel scale, the group axes."""
    x64 = as_float64("x", x)
    check_min_rank("x", x64, 2, _LAYOUT)
    n, c = x64.shape[:2]
    g = _check_num_groups(num_groups, c)
    scale64 = as_float64("scale", scale)
    check_channel_vector("scale", scale64, c)
    grouped = x64.reshape((n, g, c // g) + x64.shape[2:])
    return x64, grouped, scale64, tuple(range(2, grouped.ndim))


def group_norm(x, scale, bias, num_groups: int, epsilon: float = 1e-5, *, dtype=None) -> np.ndarray:
    """GroupNormalization with per-channel affine (torch group_norm, ONNX opset 21).

    Args:
        x: input of shape (N, C, ...), rank >= 2.
        scale: γ, shape (C,).
        bias: β, shape (C,).
        num_groups: G, a positive divisor of C.
        epsilon: added to the variance inside the square root.
        dtype: result dtype; default x's float dtype (float64 for integer x).

    Returns:
        y, shape of x.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, grouped, scale64, axes = _prepare(x, scale, num_groups)
    bias64 = as_float64("bias", bias)
    check_channel_vector("bias", bias64, x64.shape[1])
    x_hat, _, _, _ = standardize(grouped, axes, check_epsilon(epsilon), "group")
    shape = channel_shape(x64.ndim)
    y = x_hat.reshape(x64.shape) * scale64.reshape(shape) + bias64.reshape(shape)
    return y.astype(out_dtype)


def group_norm_backward(dy, x, scale, num_groups: int, epsilon: float = 1e-5, *, dtype=None):
    """Gradients of ``group_norm``.

    Args:
        dy: upstream gradient ∂L/∂y, shape of x.
        x: the forward input, shape (N, C, ...).
        scale: γ, shape (C,).
        num_groups: the forward's G.
        epsilon: the forward's epsilon.
        dtype: dtype of the results; default x's float dtype (float64 for integer x).

    Returns:
        ``(dx, dscale, dbias)`` with shapes x.shape, (C,), (C,).
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, grouped, scale64, axes = _prepare(x, scale, num_groups)
    dy64 = as_float64("dy", dy)
    check_same_shape("dy", dy64, "x", x64)
    x_hat, _, _, inv_std = standardize(grouped, axes, check_epsilon(epsilon), "group")
    g = (dy64 * scale64.reshape(channel_shape(x64.ndim))).reshape(grouped.shape)
    dx = standardize_backward(g, x_hat, inv_std, axes).reshape(x64.shape)
    batch_and_space = (0,) + tuple(range(2, x64.ndim))
    dscale = (dy64 * x_hat.reshape(x64.shape)).sum(axis=batch_and_space)
    dbias = dy64.sum(axis=batch_and_space)
    return dx.astype(out_dtype), dscale.astype(out_dtype), dbias.astype(out_dtype)
