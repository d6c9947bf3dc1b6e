"""InstanceNormalization: per sample and per channel, normalize over the spatial axes.

x has shape (N, C, D1, ..., Dk) with k >= 1, i.e. rank >= 3, as ONNX InstanceNormalization
defines it (onnxruntime refuses rank 2) and as torch's InstanceNorm1d/2d/3d see it. Each block
is one (n, c) pair and holds the D1·…·Dk values of that sample's channel:

    y[n, c] = γ[c]·(x[n, c] − μ[n, c])/√(σ²[n, c] + ε) + β[c]

A single spatial position (D1·…·Dk = 1) is allowed, as in ONNX: σ² = 0, x − μ = 0, so y = β
(torch refuses it in training mode). The backward is the shared closed form of
``bnfold.reference._standardize`` over the spatial axes; dscale and dbias sum over N and space.
"""

from __future__ import annotations

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

_LAYOUT = "(N, C, D1, ...) with channels on axis 1 and at least one spatial axis"


def _prepare(x, scale):
    x64 = as_float64("x", x)
    check_min_rank("x", x64, 3, _LAYOUT)
    scale64 = as_float64("scale", scale)
    check_channel_vector("scale", scale64, x64.shape[1])
    return x64, scale64, tuple(range(2, x64.ndim))


def instance_norm(x, scale, bias, epsilon: float = 1e-5, *, dtype=None) -> np.ndarray:
    """InstanceNormalization (ONNX, torch.nn.functional.instance_norm without running stats).

    Args:
        x: input of shape (N, C, D1, ...), rank >= 3.
        scale: γ, shape (C,).
        bias: β, shape (C,).
        epsilon: added to the variance inside the square root.
        dtype: result dtype; default x's float dtype (float64 for integer x).

    Returns:
        y, shape of x.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, scale64, axes = _prepare(x, scale)
    bias64 = as_float64("bias", bias)
    check_channel_vector("bias", bias64, x64.shape[1])
    x_hat, _, _, _ = standardize(x64, axes, check_epsilon(epsilon), "instance")
    shape = channel_shape(x64.ndim)
    return (x_hat * scale64.reshape(shape) + bias64.reshape(shape)).astype(out_dtype)


def instance_norm_backward(dy, x, scale, epsilon: float = 1e-5, *, dtype=None):
    """Gradients of ``instance_norm``.

    Args:
        dy: upstream gradient ∂L/∂y, shape of x.
        x: the forward input, shape (N, C, D1, ...).
        scale: γ, shape (C,).
        epsilon: the forward's epsilon.
        dtype: dtype of the results; default x's float dtype (float64 for integer x).

    Returns:
        ``(dx, dscale, dbias)`` with shapes x.shape, (C,), (C,).
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, scale64, axes = _prepare(x, scale)
    dy64 = as_float64("dy", dy)
    check_same_shape("dy", dy64, "x", x64)
    x_hat, _, _, inv_std = standardize(x64, axes, check_epsilon(epsilon), "instance")
    dx = standardize_backward(dy64 * scale64.reshape(channel_shape(x64.ndim)), x_hat, inv_std, axes)
    batch_and_space = (0,) + axes
    dscale = (dy64 * x_hat).sum(axis=batch_and_space)
    dbias = dy64.sum(axis=batch_and_space)
    return dx.astype(out_dtype), dscale.astype(out_dtype), dbias.astype(out_dtype)
