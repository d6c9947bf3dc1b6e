"""The computation every normalization shares: standardize a block of values, and its gradient.

BatchNorm, LayerNorm, InstanceNorm and GroupNorm differ only in *which* values form a block
(the reduction axes) and how the affine parameters broadcast. Over one block of m values:

    μ = (1/m) Σ x,   σ² = (1/m) Σ (x − μ)²   (biased),   r = 1/√(σ² + ε),   x̂ = (x − μ)·r

Backward. With g = ∂L/∂x̂ (the upstream gradient times the scale), differentiating through
μ and σ² (∂μ/∂x = 1/m, ∂σ²/∂x = 2(x − μ)/m, the cross term Σ(x − μ) = 0):

    ∂L/∂x = r · ( g − mean(g) − x̂ · mean(g · x̂) )

where the means run over the block. This is the closed form of Ioffe & Szegedy (2015), §3,
written once for all four layers.
"""

from __future__ import annotations

import numpy as np

from bnfold.reference._checks import check_positive_denominator


def moments(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and BIASED variance (divide by the count) over ``axes``, kept as size-1 axes.

    Two passes (mean, then mean of squared deviations) rather than E[x²] − E[x]²: the latter
    cancels catastrophically when |mean| ≫ std, and this runtime is the oracle.
    """
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return mean, var


def inverse_std(var: np.ndarray, epsilon: float, var_name: str) -> np.ndarray:
    """r = 1/√(var + ε): ε inside the square root, as ONNX and torch define every normalization."""
    var_plus_eps = var + epsilon
    check_positive_denominator(var_name, var_plus_eps, epsilon)
    return 1.0 / np.sqrt(var_plus_eps)


def standardize(x: np.ndarray, axes: tuple[int, ...], epsilon: float, what: str):
    """(x̂, μ, σ², r) for blocks over ``axes``; ``what`` names the statistics in errors."""
    mean, var = moments(x, axes)
    inv_std = inverse_std(var, epsilon, f"the {what} variance")
    return (x - mean) * inv_std, mean, var, inv_std


def standardize_backward(g: np.ndarray, x_hat: np.ndarray, inv_std: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """∂L/∂x from g = ∂L/∂x̂, see the module docstring."""
    return inv_std * (g - g.mean(axis=axes, keepdims=True) - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))
