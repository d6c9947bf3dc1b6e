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
   (:class:`InputStats`: from the BN statistics, or propagated through the weights when the
   statistics do not describe the activations: :mod:`bnfold.passes._moments`).
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
    out = nearest.copy()
    if exact.size == 0:
        return out
    c, k = exact.shape
    # Only the cheapest few flips of a row are ever taken (about √K, see the module doc);
    # ranking the cheapest 4√K + 32 keeps the sort small. Rows go in chunks that fit in cache.
    keep = min(k, 4 * int(np.ceil(np.sqrt(k))) + 32)
    chunk = max(1, (1 << 16) // k)
    mean = None if mean is None else np.broadcast_to(np.asarray(mean, np.float64), exact.shape)
    var = None if var is None else np.broadcast_to(np.asarray(var, np.float64), exact.shape)
    offset = None if offset is None else np.asarray(offset, np.float64).reshape(c)

    def work(start: int, stop: int) -> None:
        for lo in range(start, stop, chunk):
            rows = slice(lo, min(stop, lo + chunk))
            out[rows] = _compensate_chunk(exact[rows], nearest[rows], None if mean is None else mean[rows],
                                          None if var is None else var[rows],
                                          None if offset is None else offset[rows], keep)

    # Rows are independent: two threads (NumPy releases the GIL in its loops), each on whole
    # chunks of its half, give the same result as one. (Imported here: numerics imports this
    # module.)
    from bnfold.numerics import split_rows

    split_rows(work, c, exact.size, align=chunk)
    return out


# Bit patterns (magnitude, sign bit cleared) of the smallest normal and of +inf.
_LIMITS = {np.dtype(np.float16): (0x0400, 0x7C00), _BFLOAT16: (0x0080, 0x7F80)}
_VALUES: dict[np.dtype, np.ndarray] = {}


def _as_float32(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The half-precision values with these bit patterns, as float32 (exact): ``np.take`` from
    the table of all 65,536 values, ~2× faster than NumPy's float16 → float32 cast (82 vs
    182 µs for 64 K values; plain fancy indexing is no faster than the cast)."""
    table = _VALUES.get(dtype)
    if table is None:
        table = _VALUES.setdefault(dtype, np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
                                   .astype(np.float32))
    return np.take(table, bits)


def _compensate_chunk(exact, nearest, a, v, offset, keep: int) -> np.ndarray:
    smallest_normal, infinity = _LIMITS[nearest.dtype]
    near32 = _as_float32(nearest.view(np.uint16), nearest.dtype)
    near64 = near32.astype(np.float64)
    delta = near64 - exact
    # The other neighbour, on the bit patterns: half-precision formats are sign-magnitude, so
    # ±1 moves the magnitude by one ULP (from ±0 to the smallest subnormal of the zero's sign,
    # which is the sign of the exact value); +1 goes toward the exact value when nearest is
    # below it in magnitude: delta < 0 for a positive value, delta > 0 for a negative one.
    bits = nearest.view(np.uint16)
    up = (delta < 0) != (bits >= 0x8000)
    other_bits = bits - np.uint16(1)  # −1 mod 2^16, then +2 where the step is up
    other_bits += up
    other_bits += up
    other = other_bits.view(nearest.dtype)
    magnitude = bits & np.uint16(0x7FFF)
    # never to ±inf, never from the smallest normal down to a subnormal, never move an exact value
    allowed = ((other_bits & np.uint16(0x7FFF)) < infinity) & ~((magnitude == smallest_normal) & ~up) & (delta != 0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = _as_float32(other_bits, nearest.dtype) - near32  # exact: both are half-precision values
        change = diff if a is None else (a * diff).astype(np.float32)  # a flip's change of R
        residual = (delta if a is None else a * delta).sum(axis=1)
        if offset is not None:
            residual += offset
        usable = allowed & (change * residual[:, None].astype(np.float32) < 0)
        per_unit = np.abs(diff) - 2 * np.abs(delta).astype(np.float32)  # σ²·u(u − 2|δ|) / (|a|·u)
        if v is not None:
            per_unit *= v
        if a is not None:
            per_unit /= np.abs(a)
        np.copyto(per_unit, np.inf, where=~usable)
    if keep < exact.shape[1]:
        cand = np.argpartition(per_unit, keep - 1, axis=1)[:, :keep]
    else:
        cand = np.broadcast_to(np.arange(exact.shape[1]), exact.shape)
    order = np.argsort(np.take_along_axis(per_unit, cand, axis=1), axis=1, kind="stable")
    cand = np.take_along_axis(cand, order, axis=1)
    ok = np.isfinite(np.take_along_axis(per_unit, cand, axis=1))
    step = np.where(ok, np.abs(np.take_along_axis(change, cand, axis=1)).astype(np.float64), 0.0)
    g = np.abs(np.take_along_axis(diff, cand, axis=1)).astype(np.float64)
    cost = g * (g - 2 * np.abs(np.take_along_axis(delta, cand, axis=1)))
    if v is not None:
        cost *= np.take_along_axis(v, cand, axis=1)
    cost = np.where(ok, cost, 0.0)
    zeros = np.zeros((exact.shape[0], 1))
    # E[e²] after the first n flips, n = 0 … keep; the best n per row
    remaining = np.abs(residual)[:, None] - np.concatenate([zeros, np.cumsum(step, axis=1)], axis=1)
    objective = remaining ** 2 + np.concatenate([zeros, np.cumsum(cost, axis=1)], axis=1)
    n = np.argmin(objective, axis=1)
    out = nearest.copy()
    take = np.arange(cand.shape[1])[None, :] < n[:, None]
    rows = np.broadcast_to(np.arange(exact.shape[0])[:, None], cand.shape)
    out[rows[take], cand[take]] = other[rows[take], cand[take]]
    return out


def _row_stats(stats: InputStats | None, shape, row_shape, index: np.ndarray | None):
    """(mean, var, offset) laid out as the [channels, fan_in] rows (None where unknown)."""
    if stats is None or stats.mean is None:
        return None, None, None

    def per_weight(a):
        full = np.broadcast_to(np.asarray(a, np.float64), shape)
        return full.reshape(row_shape) if index is None else full.reshape(-1)[index]

    offset = None if stats.offset is None else np.asarray(stats.offset, np.float64).reshape(-1)
    return per_weight(stats.mean), per_weight(stats.var), offset


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
    base = np.arange(nearest.size).reshape(nearest.shape)
    index = rows(base)
    if index.flags.c_contiguous and np.shares_memory(index, base):  # a reshape (Conv): no gather
        out = compensate_rows(exact.reshape(index.shape), nearest.reshape(index.shape),
                              *_row_stats(stats, nearest.shape, index.shape, None))
        return out.reshape(nearest.shape)
    out = nearest.copy()
    out.reshape(-1)[index] = compensate_rows(exact.reshape(-1)[index], nearest.reshape(-1)[index],
                                             *_row_stats(stats, nearest.shape, index.shape, index))
    return out
