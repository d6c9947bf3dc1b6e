"""LayerNormalization: normalize over the trailing axes from ``axis``, then an elementwise affine.

x has any rank r >= 1. With ``axis`` = a (negative counts from the end, as in ONNX
LayerNormalization-17 and torch's ``normalized_shape = x.shape[a:]``), each block is one index
of the leading axes x.shape[:a] and holds the prod(x.shape[a:]) values of the trailing axes:

    y = γ·(x − μ)/√(σ² + ε) + β,   μ, σ² (biased) over the block

scale γ and bias β have exactly the normalized shape x.shape[a:] (torch's rule; ONNX allows
broadcasting, which a caller expresses with ``np.broadcast_to``). The backward is the shared
closed form of ``bnfold.reference._standardize``; dscale and dbias sum over the leading axes.
"""

from __future__ import annotations

import numpy as np

from bnfold.reference._checks import (
    as_float64,
    check_epsilon,
    check_min_rank,
    check_same_shape,
    normalize_axis,
    result_dtype,
)
from bnfold.reference._standardize import standardize, standardize_backward


def _prepare(x, scale, axis):
    x64 = as_float64("x", x)
    check_min_rank("x", x64, 1, "any rank, normalized over the axes from `axis` on")
    a = normalize_axis(axis, x64.ndim)
    normalized_shape = x64.shape[a:]
    scale64 = as_float64("scale", scale)
    if scale64.shape != normalized_shape:
        raise ValueError(
            f"scale has shape {tuple(scale64.shape)}, expected {normalized_shape} = x.shape[{axis}:] "
            "(the normalized axes)"
        )
    return x64, scale64, tuple(range(a, x64.ndim))


def layer_norm(x, scale, bias, axis: int = -1, epsilon: float = 1e-5, *, dtype=None) -> np.ndarray:
    """LayerNormalization (ONNX opset 17, torch.nn.functional.layer_norm).

    Args:
        x: input of any rank >= 1.
        scale: γ, shape x.shape[axis:].
        bias: β, shape x.shape[axis:].
        axis: first normalized axis; the normalized axes are axis, ..., rank − 1.
        epsilon: added to the variance inside the square root.
        dtype: result dtype; default x's float dtype (float64 for integer x).

    Returns:
        y, shape of x.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, scale64, axes = _prepare(x, scale, axis)
    bias64 = as_float64("bias", bias)
    check_same_shape("bias", bias64, "scale", scale64)
    x_hat, _, _, _ = standardize(x64, axes, check_epsilon(epsilon), "layer")
    return (x_hat * scale64 + bias64).astype(out_dtype)


def layer_norm_backward(dy, x, scale, axis: int = -1, epsilon: float = 1e-5, *, dtype=None):
    """Gradients of ``layer_norm``.

    Args:
        dy: upstream gradient ∂L/∂y, shape of x.
        x: the forward input.
        scale: γ, shape x.shape[axis:].
        axis: the forward's axis.
        epsilon: the forward's epsilon.
        dtype: dtype of the results; default x's float dtype (float64 for integer x).

    Returns:
        ``(dx, dscale, dbias)`` with shapes x.shape, scale.shape, scale.shape.
    """
    out_dtype = result_dtype(np.asarray(x), dtype)
    x64, scale64, axes = _prepare(x, scale, axis)
    dy64 = as_float64("dy", dy)
    check_same_shape("dy", dy64, "x", x64)
    x_hat, _, _, inv_std = standardize(x64, axes, check_epsilon(epsilon), "layer")
    dx = standardize_backward(dy64 * scale64, x_hat, inv_std, axes)
    leading = tuple(range(axes[0]))
    dscale = (dy64 * x_hat).sum(axis=leading)
    dbias = dy64.sum(axis=leading)
    return dx.astype(out_dtype), dscale.astype(out_dtype), dbias.astype(out_dtype)
