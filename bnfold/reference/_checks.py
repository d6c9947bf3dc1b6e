"""Argument validation and dtype handling shared by the reference runtime.

Every check raises ``ValueError`` with one line that names the argument, what it is and what
was expected, e.g. ``scale has shape (4,), expected (3,) = number of channels of x (axis 1)``.
The shape helpers at the bottom say how per-channel vectors broadcast along axis 1.
"""

from __future__ import annotations

import numbers

import numpy as np

CHANNEL_AXIS = 1


def result_dtype(x: np.ndarray, dtype) -> np.dtype:
    """The dtype a function returns: ``dtype`` if given, else x's float dtype, else float64.

    Integer and boolean inputs are computed (and returned) in float64. Non-NumPy float types
    that convert to float64 (ml_dtypes' bfloat16, float8...) are kept, like NumPy's floats.
    """
    if dtype is not None:
        out = np.dtype(dtype)
        if not _is_float(out):
            raise ValueError(f"dtype={out} is not a floating-point dtype")
        return out
    if _is_float(x.dtype):
        return x.dtype
    if x.dtype.kind in "biu":
        return np.dtype(np.float64)
    raise ValueError(f"x has dtype {x.dtype}, expected a real floating-point or integer dtype")


def _is_float(dt: np.dtype) -> bool:
    if dt.kind == "f":
        return True
    # ml_dtypes (an onnx dependency) registers bfloat16/float8 as kind 'V' scalar types.
    return dt.kind == "V" and getattr(dt.type, "__module__", "").startswith("ml_dtypes")


def as_float64(name: str, value) -> np.ndarray:
    """``value`` as a float64 array; complex or non-numeric values are refused by name."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" and not _is_float(arr.dtype):
        raise ValueError(f"{name} has dtype {arr.dtype}, expected a real floating-point or integer dtype")
    return arr.astype(np.float64)


def check_min_rank(name: str, x: np.ndarray, min_rank: int, layout: str) -> None:
    if x.ndim < min_rank:
        raise ValueError(f"{name} has shape {tuple(x.shape)} (rank {x.ndim}), expected rank >= {min_rank} ({layout})")


def check_channel_vector(name: str, v: np.ndarray, num_channels: int) -> None:
    """``v`` must be a 1-D per-channel vector of length ``num_channels``."""
    if v.shape != (num_channels,):
        raise ValueError(
            f"{name} has shape {tuple(v.shape)}, expected ({num_channels},) = number of channels of x (axis 1)"
        )


def check_same_shape(name: str, value: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)} = shape of {ref_name}")


def check_nonnegative(name: str, var: np.ndarray) -> None:
    """Variances are never negative; NaN is left to propagate like any other arithmetic."""
    negative = var < 0
    if np.any(negative):
        idx = int(np.flatnonzero(negative)[0])
        raise ValueError(
            f"{name} has negative entries ({int(negative.sum())} of {var.size}, first {float(var.flat[idx])!r} "
            f"at index {idx}); a variance cannot be negative"
        )


def check_epsilon(epsilon) -> float:
    eps = float(epsilon)
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon={epsilon!r}, expected a finite number >= 0")
    return eps


def check_positive_denominator(var_name: str, var_plus_eps: np.ndarray, epsilon: float) -> None:
    """``var + epsilon`` is the square of a divisor; zero would divide by zero."""
    zero = var_plus_eps == 0
    if np.any(zero):
        idx = int(np.flatnonzero(zero)[0])
        raise ValueError(
            f"{var_name} + epsilon is 0 at index {idx} (epsilon={epsilon!r}); the normalization would divide by zero"
        )


def check_batch_size(m, shape: tuple[int, ...] | None = None) -> int:
    """m values per channel in one batch; batch statistics (and m/(m − 1)) need m >= 2.

    ``shape`` is x's shape when m was derived from it, so the message can show where m came from.
    """
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise ValueError(f"m={m!r}, expected an integer number of values per channel")
    if m < 2:
        if shape is None:
            where = f"m={m} value(s) per channel"
        else:
            where = f"x has shape {tuple(shape)}: {m} value(s) per channel (N × spatial)"
        raise ValueError(f"{where}, expected at least 2 for batch statistics (the unbiased variance divides by m - 1)")
    return int(m)


def check_momentum(momentum) -> float:
    mom = float(momentum)
    if not 0.0 <= mom <= 1.0:
        raise ValueError(f"momentum={momentum!r}, expected a number in [0, 1]")
    return mom


def normalize_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{name}={axis!r}, expected an integer")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for x of rank {ndim}, expected {-ndim} <= {name} < {ndim}")
    return int(axis) % ndim


def channel_shape(ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector of length C along axis 1: (C, 1, ..., 1)."""
    return (-1,) + (1,) * (ndim - 2)


def all_but_channel(ndim: int) -> tuple[int, ...]:
    return (0,) + tuple(range(2, ndim))


def values_per_channel(shape: tuple[int, ...]) -> int:
    """m = N·D1·…·Dk: how many values one channel's batch statistics run over."""
    return int(np.prod([shape[a] for a in all_but_channel(len(shape))], dtype=np.int64))
