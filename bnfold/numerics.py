"""The arithmetic of folding, in pure NumPy: float64 inside, one rounding to the model's dtype.

Every BatchNormalization in inference mode is a per-channel affine map (SPEC §2)

    BN(x) = s·x + t,   s = γ/√(Var + ε),   t = β − s·E        (:func:`bn_affine`)

and so is a per-channel Mul (s = c, t = 0) or Add (s = 1, t = c). Two of them in a row
compose as (s₂·s₁, s₂·t₁ + t₂) (:func:`compose`), so a whole chain BN → Mul → Add is folded
with a single rounding. Folding y = s·(L x) + t into a linear node L:

* Conv, W [C_out, C_in/g, k…]:   W'[o] = s[o]·W[o],  b' = s·b + t  (= s·(b − E) + β).
* ConvTranspose, W [C_in, C_out/g, k…]: W[i, j] feeds output channel
  o = (i // (C_in/g))·(C_out/g) + j, so W'[i, j] = s[o]·W[i, j];  b' = s·b + t.
* Gemm, Y = α·A·B̃ + β_g·C: columns f of B̃ (rows of B when transB=1) are scaled by s[f];
  the new C is s·(β_g·C) + t broadcast like C against [F] (absent → [F], scalar → [F],
  [F], [1,F], [M,1] → [M,F], [M,F]) and β_g becomes 1.
* MatMul (+ bias), Y = A·B (+ b), B [K, F]:  B' = B·s (columns), b' = s·b + t.
* A following Conv (BN → Conv, no padding): conv(s·x + t) has W'[o, j] = W[o, j]·s[c] and
  b'[o] = b[o] + Σ_{j,k} W[o, j, k]·t[c], c = (o // (C_out/g))·(C_in/g) + j.

All of it is computed in float64 from the stored values and rounded once
(:func:`round_once`). On request (``rounding="compensated"``) the float16/bfloat16 weights of
each output channel are then re-rounded together, each to one of its two neighbours, so that
their errors cancel in the channel's dot product (:mod:`bnfold.rounding`).

Rounding float64 → bfloat16 through float32 would round twice (a value
just above a bfloat16 tie becomes the tie in float32, then rounds to even: wrong by one ULP),
so bfloat16 goes through float32 with *round-to-odd*, which makes the second rounding the
correctly rounded one (float32 has 24 ≥ 8 + 2 significand bits; Boldo & Melquiond 2008).

Precision guard (:func:`round_checked`), the same rule for every float dtype:

1. overflow: a finite float64 result whose rounded value is ±inf (|x| ≥ max + ½ULP) refuses
   the fold — the folded layer would output inf where the original was finite;
2. flush: an output channel whose exact folded weights are not all zero but whose rounded
   weights are all zero or subnormal (|w| < smallest normal) refuses the fold — the channel
   would lose its signal (or all of its precision); a channel whose exact weights are zero
   (γ = 0) is exact and allowed;
3. non-finite: a NaN/inf in the float64 result (NaN statistics, ε = 0 with zero variance).

A refusal raises :class:`PrecisionRefused` whose message is the human reason the report keeps.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import ml_dtypes
import numpy as np

from bnfold import rounding as rounding_
from bnfold.reference import fold_params

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))


class PrecisionRefused(ValueError):
    """A folded value cannot be represented in the model's dtype; the message is the reason."""


Affine = tuple[np.ndarray, np.ndarray]


def f64(x) -> np.ndarray:
    """A fresh float64 copy (callers may modify it in place)."""
    return np.asarray(x).astype(np.float64)


def bn_affine(scale, bias, mean, var, epsilon: float = 1e-5) -> Affine:
    """(s, t) of an inference BatchNormalization, float64, unrounded (SPEC §2)."""
    return fold_params(f64(scale), f64(bias), f64(mean), f64(var), epsilon)


def compose(first: Affine, then: Affine) -> Affine:
    """The affine map ``then ∘ first``: (s₂·s₁, s₂·t₁ + t₂)."""
    (s1, t1), (s2, t2) = first, then
    return s2 * s1, s2 * t1 + t2


def _bias64(bias, channels: int) -> np.ndarray:
    return np.zeros(channels) if bias is None else f64(bias).reshape(channels)


def _per_axis0(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def fold_bias(bias, s, t) -> np.ndarray:
    """b' = s·b + t (b absent: t), float64."""
    return s * _bias64(bias, s.shape[0]) + t


def fold_conv(weight, bias, s, t) -> Affine:
    """Conv W [C_out, C_in/g, k…] followed by s·y + t → (W', b'), float64."""
    w = np.asarray(weight)
    if w.dtype == BFLOAT16:
        w = w.astype(np.float32)  # exact; numpy has no bfloat16 × float64 loop
    # one pass: the product is formed in float64 straight from the stored values
    w_new = np.multiply(w, _per_axis0(s, w.ndim), dtype=np.float64)
    return w_new, s * _bias64(bias, w.shape[0]) + t


def conv_transpose_channel_map(weight_shape, groups: int) -> np.ndarray:
    """Output channel o of each (i, j) of a ConvTranspose weight [C_in, C_out/g, …]."""
    c_in, c_out_g = weight_shape[0], weight_shape[1]
    i = np.arange(c_in)[:, None]
    j = np.arange(c_out_g)[None, :]
    return (i // (c_in // groups)) * c_out_g + j


def fold_conv_transpose(weight, bias, s, t, groups: int = 1) -> Affine:
    """ConvTranspose W [C_in, C_out/g, k…] followed by s·y + t → (W', b'), float64."""
    w = f64(weight)
    scale = s[conv_transpose_channel_map(w.shape, groups)]
    c_out = w.shape[1] * groups
    return w * scale.reshape(scale.shape + (1,) * (w.ndim - 2)), s * _bias64(bias, c_out) + t


def conv_transpose_rows(weight: np.ndarray, groups: int) -> np.ndarray:
    """The weights feeding each output channel, one row per channel: [C_out, -1]."""
    c_in, c_out_g = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_in // groups, c_out_g, -1).transpose(0, 2, 1, 3)
    return w.reshape(groups * c_out_g, -1)


def fold_gemm(b_matrix, c, s, t, *, trans_b: bool, beta: float = 1.0) -> Affine:
    """Gemm (B [K,F], or [F,K] with transB) followed by s·y + t → (B', C'), float64.

    C' = s·(β·C) + t broadcast like C against [F]; the node's β must become 1.
    """
    b = f64(b_matrix)
    b_new = b * s[:, None] if trans_b else b * s[None, :]
    features = s.shape[0]
    if c is None:
        return b_new, t.copy()
    c64 = f64(c) * beta
    shape = np.broadcast_shapes(c64.shape, (features,))
    return b_new, s * np.broadcast_to(c64, shape) + t


def fold_matmul(b_matrix, bias, s, t) -> Affine:
    """MatMul (B [K, F]) and optional bias [F] followed by s·y + t → (B', b'), float64."""
    b = f64(b_matrix)
    features = b.shape[1]
    bias64 = np.zeros(features) if bias is None else f64(bias)
    shape = np.broadcast_shapes(bias64.shape, (features,))
    return b * s[None, :], s * np.broadcast_to(bias64, shape) + t


def forward_channel_map(weight_shape, groups: int) -> np.ndarray:
    """Global input channel c of each (o, j) of a Conv weight [C_out, C_in/g, …]."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    o = np.arange(c_out)[:, None]
    j = np.arange(c_in_g)[None, :]
    return (o // (c_out // groups)) * c_in_g + j


def fold_forward_conv(weight, bias, s, t, groups: int = 1) -> Affine:
    """s·x + t followed by a Conv without padding → (W', b'), float64."""
    w = f64(weight)
    c = forward_channel_map(w.shape, groups)
    extra = (1,) * (w.ndim - 2)
    w_new = w * s[c].reshape(c.shape + extra)
    shift = (w * t[c].reshape(c.shape + extra)).reshape(w.shape[0], -1).sum(axis=1)
    return w_new, _bias64(bias, w.shape[0]) + shift


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    f = x.astype(np.float32)
    back = f.astype(np.float64)
    with np.errstate(invalid="ignore"):
        inexact = (back != x) & ~np.isnan(x)
        too_far = inexact & (np.abs(back) > np.abs(x))
    f = np.where(too_far, np.nextafter(f, np.float32(0)), f)  # truncate toward zero ...
    bits = f.view(np.uint32)
    return np.where(inexact, bits | np.uint32(1), bits).view(np.float32)  # ... and make it odd


def round_once(x, dtype) -> np.ndarray:
    """Round float64 values to ``dtype`` once, to nearest, ties to even."""
    dtype = np.dtype(dtype)
    x = np.asarray(x, dtype=np.float64)  # no copy when already float64
    with np.errstate(over="ignore"):
        if dtype == BFLOAT16:
            return _round_to_odd_float32(x).astype(BFLOAT16)
        return x.astype(dtype)


def round_checked(
    x, dtype, *, what: str, rows: Callable[[np.ndarray], np.ndarray] | None = None,
    rounding: str = rounding_.NEAREST, stats: rounding_.InputStats | None = None,
) -> np.ndarray:
    """:func:`round_once` under the precision guard of the module docstring.

    ``rows`` maps an array of x's shape to [channels, -1] (one row per output channel) for
    the flush rule; without it the flush rule is not applied (biases). With ``rows`` and
    ``rounding="compensated"``, float16/bfloat16 weights are then re-rounded along those rows
    (:mod:`bnfold.rounding`: each value stays one of its two neighbours), steered by
    ``stats`` (what is known of the inputs; None: equal means along each row).
    """
    dtype = np.dtype(dtype)
    x = np.asarray(x, dtype=np.float64)  # no copy when already float64
    name = "bfloat16" if dtype == BFLOAT16 else dtype.name
    if x.size == 0:
        return round_once(x, dtype)
    finfo = ml_dtypes.finfo(dtype)
    # Row maxima and minima, two reductions without temporaries: NaN and inf show up in them,
    # and they give every row's largest magnitude for the overflow and flush rules.
    r = rows(x) if rows is not None else x.reshape(1, -1)
    hi, lo = r.max(axis=1), r.min(axis=1)
    if not (np.isfinite(hi).all() and np.isfinite(lo).all()):
        raise PrecisionRefused(f"folded {what} would contain NaN or inf")
    row_max = np.maximum(hi, -lo)
    big = float(row_max.max())
    rounded = round_once(x, dtype)
    # |x| below max + ½ULP rounds to a finite value; only near the top is the rounding consulted.
    if big >= float(finfo.max) and not np.isfinite(rounded.astype(np.float32) if dtype == BFLOAT16 else rounded).all():
        raise PrecisionRefused(f"folded {what} would overflow {name} (|value| up to {big:.6g} > max {float(finfo.max):.6g})")
    if rows is not None:
        tiny = float(finfo.smallest_normal)
        # A row whose exact max is >= 2·tiny keeps a normal value after rounding: only the
        # (rare) rows below that need their rounded values looked at.
        for c in np.flatnonzero((row_max > 0) & (row_max < 2 * tiny)):
            if np.abs(rows(rounded.astype(np.float64))[c]).max() < tiny:
                raise PrecisionRefused(
                    f"folded {what} of output channel {int(c)} would flush to zero/subnormal in {name} "
                    f"(largest |value| {float(row_max[c]):.3g} < smallest normal {tiny:.3g})"
                )
        rounded = rounding_.round_rows(x, rounded, rows, rounding, stats)
    return rounded


def scale_rows_checked(weight, row_scale, dtype, *, what: str, rounding: str = rounding_.NEAREST,
                       stats: rounding_.InputStats | None = None) -> np.ndarray:
    """round_checked(weight · row_scale[axis 0]) for float16/32/64, fused and without a float64 copy.

    The product is formed in float64 and cast to ``dtype`` inside one buffered ufunc call —
    the same single rounding as :func:`round_once` (numpy's float64 → float16/32 cast is
    round-to-nearest-even), chunk by chunk in cache. The guard needs each row's largest
    exact |value|: rounding is monotonic, so it is |s|·max|w| over the row, from the
    stored weights' row extremes. bfloat16 (round-to-odd first) takes the generic path.
    """
    dtype = np.dtype(dtype)
    w = np.asarray(weight)
    if dtype == BFLOAT16 or w.dtype == BFLOAT16 or w.size == 0 or rounding_.applies(rounding, dtype):
        # compensated rounding needs the exact float64 product anyway
        return round_checked(fold_conv(w, None, row_scale, np.zeros_like(row_scale))[0], dtype, what=what,
                             rows=conv_rows, rounding=rounding, stats=stats)
    rows = w.reshape(w.shape[0], -1)
    out = np.empty(w.shape, dtype=dtype)
    dst = out.reshape(w.shape[0], -1)
    hi, lo = np.empty(rows.shape[0]), np.empty(rows.shape[0])
    step = max(1, (1 << 15) // max(1, rows.shape[1]))

    def fold_rows(start: int, stop: int) -> None:
        # Blocks of rows (~256 KB of float64), each read once while in cache: its extremes, then
        # the product in float64 and one cast — the same bits as one buffered mixed-dtype ufunc
        # call (same product, same rounding), in a third of the memory traffic.
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(start, stop, step):
                j = min(i + step, stop)
                block = rows[i:j].astype(np.float64)
                # float16 reductions have no SIMD path in NumPy (~8× slower): reduce the float64 copy
                ext = rows[i:j] if rows.dtype.itemsize >= 4 else block
                hi[i:j], lo[i:j] = ext.max(axis=1), ext.min(axis=1)
                block *= row_scale[i:j, None]
                dst[i:j] = block

    split_rows(fold_rows, rows.shape[0], rows.size)
    with np.errstate(invalid="ignore", over="ignore"):
        ends = np.stack([row_scale * hi, row_scale * lo])
    if not np.isfinite(ends).all():
        raise PrecisionRefused(f"folded {what} would contain NaN or inf")
    row_max = np.abs(ends).max(axis=0)
    finfo = ml_dtypes.finfo(dtype)
    big = float(row_max.max())
    if big >= float(finfo.max) and not np.isfinite(out).all():
        raise PrecisionRefused(f"folded {what} would overflow {dtype.name} (|value| up to {big:.6g} > max {float(finfo.max):.6g})")
    tiny = float(finfo.smallest_normal)
    for c in np.flatnonzero((row_max > 0) & (row_max < 2 * tiny)):
        if np.abs(out.reshape(w.shape[0], -1)[c].astype(np.float64)).max() < tiny:
            raise PrecisionRefused(
                f"folded {what} of output channel {int(c)} would flush to zero/subnormal in {dtype.name} "
                f"(largest |value| {float(row_max[c]):.3g} < smallest normal {tiny:.3g})"
            )
    return out


#: Weights of at least this many elements are folded by two threads (NumPy releases the GIL).
PARALLEL_MIN_ELEMENTS = 1 << 18


def split_rows(work: Callable[[int, int], None], n_rows: int, size: int, *, align: int = 1) -> None:
    """``work(0, n_rows)``, as two halves in two threads for big weights on a multi-core machine
    (the split falls on a multiple of ``align`` rows)."""
    half = (n_rows // 2) // align * align
    if size < PARALLEL_MIN_ELEMENTS or half < 1 or (os.cpu_count() or 1) < 2:
        work(0, n_rows)
        return
    failed: list[BaseException] = []

    def second() -> None:
        try:
            work(half, n_rows)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=second, name="bnfold-fold")
    thread.start()
    try:
        work(0, half)
    finally:
        thread.join()
    if failed:
        raise failed[0]


def conv_rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def column_rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).T
