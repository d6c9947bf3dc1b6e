"""How folded float64 weights become the model's dtype: ``nearest`` or ``compensated``.

**nearest** (the default, for every dtype) rounds each value once, to nearest, ties to even
(:func:`bnfold.numerics.round_once`): every weight within ½ ULP of its exact value.

**compensated** (float16 and bfloat16 only; float32/float64 always round to nearest) rounds
the weights feeding one output channel *together*, so that their rounding errors cancel in
that channel's dot product. A folded channel computes y = Σ_j w_j·x_j + b; with rounded
weights r_j = w_j + δ_j and bias error δ_b its error is e = Σ_j δ_j·x_j + δ_b. For inputs
with mean μ_j and variance σ_j² (independent),

    E[e²] = (Σ_j δ_j·μ_j + δ_b)² + Σ_j δ_j²·σ_j².

Round-to-nearest minimizes the second term and leaves the first to chance; it grows like
the second (K·ULP²/12 over a fan-in of K) and, unlike it, does not average out over the
positions of a feature map: the same offset is added everywhere, and a global average pool
keeps it whole. Compensated rounding keeps the second term and removes the first:

1. start from round-to-nearest: δ_j, and the residual R = Σ_j a_j·δ_j + δ_b, where a_j is
   the expected input μ_j and δ_b the folded bias's own round-to-nearest error
   (:class:`InputStats`, from the BN statistics of the graph: :mod:`bnfold.passes._moments`).
   When nothing is known of the inputs, a_j = 1 and δ_b is left out: R then cancels for any
   input whose mean is the same on every position of the fan-in;
2. flipping weight j to its other neighbour adds a_j·(other_j − r_j) to R and
   σ_j²·u_j·(u_j − 2|δ_j|) to Σ σ_j²δ_j² (u_j: the gap between the neighbours) — almost
   nothing for a weight that was close to a tie;
3. among the weights whose flip moves R toward 0, flip them cheapest first (cost per unit of
   R), stopping at the prefix that minimizes R² + the added cost. About √K weights of a
   row flip, all near ties: Σ δ_j² grows by ~0.2 % while |R| drops from ~√(K/12)·ULP·μ to
   below one weight step.

The bias itself is still rounded once, to nearest (½ ULP): its error is absorbed by the
weights rather than the weights' residual by the bias, because after step 3 that residual
is already far below the bias's own ½ ULP, which a second rounding would add back.

Bound (what the tests assert): every compensated weight is one of the two representable
neighbours of its exact value, so it is within 1 ULP of it (round-to-nearest: ½ ULP); a
value that is exactly representable is kept exactly; a flip never produces an infinity and
never turns a normal number into a subnormal. The algorithm is deterministic (a stable sort
on the cost, ties by position) and vectorized over all channels of a layer at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

NEAREST = "nearest"
COMPENSATED = "compensated"
STRATEGIES = (NEAREST, COMPENSATED)
DEFAULT = NEAREST

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_HALF_TYPES = (np.dtype(np.float16), _BFLOAT16)


def check_strategy(name: str) -> str:
    """``name`` if it is a rounding strategy, else ValueError naming the valid ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown rounding {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def applies(strategy: str, dtype) -> bool:
    """Whether ``strategy`` changes anything for ``dtype`` (compensated: float16/bfloat16)."""
    return strategy == COMPENSATED and np.dtype(dtype) in _HALF_TYPES


def _other_neighbour(exact: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """The representable neighbour of ``exact`` on the other side from ``nearest``.

    Half-precision formats are sign-magnitude, so ±1 on the bit pattern moves the magnitude
    by one ULP: +1 when the nearest value is below |exact| (also from ±0 to the smallest
    subnormal, keeping the sign of the zero, which is the sign of ``exact``), −1 when above.
    """
    bits = nearest.view(np.uint16).astype(np.int32)
    mag_exact = np.abs(exact)
    mag_near = np.abs(nearest.astype(np.float64))
    step = np.where(mag_near < mag_exact, 1, -1)
    return (bits + step).astype(np.uint16).view(nearest.dtype)


@dataclass(frozen=True)
class InputStats:
    """What is known about the inputs a layer's weights multiply, for compensated rounding.

    ``mean`` and ``var`` are float64 arrays broadcastable to the weight's shape: the expected
    value and variance of the input each weight multiplies (per input channel, in practice).
    ``offset`` is float64 [channels]: an error already made in each output channel, in output
    units — the round-to-nearest error of the folded bias — which the weights then cancel too.
    Without ``mean`` the inputs are taken to have the same mean on every position of the
    fan-in (a_j = 1, var 1) and ``offset`` is ignored: it is not in the units of R then.
    """

    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    offset: np.ndarray | None = None


def compensate_rows(exact: np.ndarray, nearest: np.ndarray, mean: np.ndarray | None = None,
                    var: np.ndarray | None = None, offset: np.ndarray | None = None) -> np.ndarray:
    """Compensated rounding of a [channels, fan_in] float64 matrix whose round-to-nearest is ``nearest``.

    Args:
        exact: float64 [C, K], the exact folded weights, one row per output channel.
        nearest: the same rounded to nearest in a half-precision dtype.
        mean: a_j, broadcastable to [C, K]: the expected input each weight multiplies
            (1 when None).
        var: σ_j², broadcastable to [C, K]: the variance of that input (1 when None).
        offset: float64 [C], an error already in each channel's output (0 when None).

    Returns:
        [C, K] in ``nearest``'s dtype: each value either ``nearest`` or its other neighbour;
        per row, the prefix of cheapest flips minimizing E[e²] = R² + Σ σ_j²·δ_j².
    """
    if exact.size == 0:
        return nearest.copy()
    shape = exact.shape
    near64 = nearest.astype(np.float64)
    delta = near64 - exact
    other = _other_neighbour(exact, nearest)
    other64 = other.astype(np.float64)
    a = np.ones(shape) if mean is None else np.broadcast_to(np.asarray(mean, np.float64), shape)
    v = np.ones(shape) if var is None else np.broadcast_to(np.asarray(var, np.float64), shape)
    residual = (a * delta).sum(axis=1)
    if offset is not None:
        residual = residual + np.asarray(offset, np.float64)
    tiny = float(ml_dtypes.finfo(nearest.dtype).smallest_normal)
    with np.errstate(invalid="ignore", over="ignore"):
        change = a * (other64 - near64)                    # what a flip adds to R
        gap = np.abs(other64 - near64)
        usable = (delta != 0) & np.isfinite(other64) & (change * residual[:, None] < 0)
        usable &= ~((np.abs(other64) < tiny) & (np.abs(near64) >= tiny))
        cost = np.where(usable, v * gap * (gap - 2 * np.abs(delta)), 0.0)   # added to Σ σ²δ²
        step = np.where(usable, np.abs(change), 0.0)
        order = np.argsort(np.where(usable, cost / np.where(usable, step, 1.0), np.inf), axis=1, kind="stable")
    step_sorted = np.take_along_axis(step, order, axis=1)
    cost_sorted = np.take_along_axis(cost, order, axis=1)
    zeros = np.zeros((shape[0], 1))
    # E[e²] after the first k flips, k = 0 … K; the best k per row
    remaining = np.abs(residual)[:, None] - np.concatenate([zeros, np.cumsum(step_sorted, axis=1)], axis=1)
    objective = remaining ** 2 + np.concatenate([zeros, np.cumsum(cost_sorted, axis=1)], axis=1)
    k = np.argmin(objective, axis=1)
    flip_sorted = np.arange(shape[1])[None, :] < k[:, None]
    flip = np.empty_like(flip_sorted)
    np.put_along_axis(flip, order, flip_sorted, axis=1)
    return np.where(flip, other, nearest)


def round_rows(
    exact: np.ndarray, nearest: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], strategy: str,
    stats: InputStats | None = None,
) -> np.ndarray:
    """``nearest`` (already guarded by numerics) re-rounded with ``strategy`` along ``rows``.

    ``rows`` maps an array of the weight's shape to [channels, fan_in] (a view or a copy);
    the result is written back through the same map applied to the flat indices.
    """
    if not applies(strategy, nearest.dtype) or nearest.size == 0:
        return nearest
    index = rows(np.arange(nearest.size).reshape(nearest.shape))

    def per_weight(a):
        return None if a is None else np.broadcast_to(np.asarray(a, np.float64), nearest.shape).reshape(-1)[index]

    mean = var = offset = None
    if stats is not None and stats.mean is not None:
        mean, var = per_weight(stats.mean), per_weight(stats.var)
        offset = None if stats.offset is None else np.asarray(stats.offset, np.float64).reshape(-1)
    out = nearest.copy()
    out.reshape(-1)[index] = compensate_rows(exact.reshape(-1)[index], nearest.reshape(-1)[index], mean, var, offset)
    return out
