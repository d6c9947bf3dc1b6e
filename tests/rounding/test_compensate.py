"""bnfold.rounding on arrays: the one-neighbour bound, the cancelled residual, determinism."""

import ml_dtypes
import numpy as np
import pytest

from bnfold.numerics import round_once
from bnfold.rounding import InputStats, applies, compensate_rows, round_rows
from tests.converter.refeval import ulp

BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = [np.dtype(np.float16), BF16]


def _neighbours(exact: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(largest representable ≤ exact, smallest representable ≥ exact), found independently."""
    r = round_once(exact, dtype)
    r64 = r.astype(np.float64)
    with np.errstate(over="ignore"):
        up = np.nextafter(r, np.array(np.inf, dtype=dtype)).astype(np.float64)
        down = np.nextafter(r, np.array(-np.inf, dtype=dtype)).astype(np.float64)
    lo = np.where(r64 <= exact, r64, down)
    hi = np.where(r64 >= exact, r64, up)
    return lo, hi


def _rows(rng, dtype, c=64, k=300) -> np.ndarray:
    """Exact float64 rows spanning normal and subnormal magnitudes, with exact values, zeros
    and values next to the largest finite one."""
    finfo = ml_dtypes.finfo(dtype)
    scale = np.exp2(rng.uniform(-30, 10, (c, 1))) if dtype == BF16 else np.exp2(rng.uniform(-22, 10, (c, 1)))
    x = rng.standard_normal((c, k)) * scale
    x[:, :7] = round_once(x[:, :7], dtype).astype(np.float64)           # exactly representable
    x[:, 7] = 0.0
    x[0, 8:12] = float(finfo.max) * np.array([0.9999, -0.9999, 0.99, 1.0])  # at the top of the range
    x[1, 8:12] = float(finfo.smallest_normal) * np.array([1.0, 0.99, -1.01, 0.5])
    return x


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("stats", ["uniform", "mean", "mean+offset"])
def test_each_weight_is_one_of_its_two_neighbours(rng, dtype, stats):
    exact = _rows(rng, dtype)
    nearest = round_once(exact, dtype)
    mean = var = offset = None
    if stats != "uniform":
        mean = rng.uniform(-1, 2, (1, exact.shape[1]))
        var = rng.uniform(0.1, 1, (1, exact.shape[1]))
    if stats == "mean+offset":
        offset = rng.standard_normal(exact.shape[0]) * np.abs(exact).max(axis=1) * 0.01
    comp = compensate_rows(exact, nearest, mean, var, offset)
    c64 = comp.astype(np.float64)
    lo, hi = _neighbours(exact, dtype)
    assert comp.dtype == dtype
    assert np.all((c64 == lo) | (c64 == hi))
    # hence within 1 ULP of the exact value (nearest: 1/2 ULP)
    assert np.all(np.abs(c64 - exact) <= ulp(exact, dtype))
    exact_ones = lo == hi
    assert np.array_equal(c64[exact_ones], exact[exact_ones])
    assert np.isfinite(c64).all()
    tiny = float(ml_dtypes.finfo(dtype).smallest_normal)
    near64 = nearest.astype(np.float64)
    assert not np.any((np.abs(near64) >= tiny) & (np.abs(c64) < tiny))  # never normal -> subnormal
    assert (comp != nearest).sum() > exact.shape[0]  # it did flip weights


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_residual_along_each_row_is_cancelled(rng, dtype):
    k = 576
    exact = rng.standard_normal((128, k)) * np.sqrt(2 / k) * rng.uniform(0.5, 2, (128, 1))
    nearest = round_once(exact, dtype)
    mean = rng.uniform(0.2, 0.8, (1, k))
    bias = rng.standard_normal(128) * 0.1
    offset = round_once(bias, dtype).astype(np.float64) - bias  # the folded bias's rounding error
    for a, off in ((None, None), (mean, None), (mean, offset)):
        comp = compensate_rows(exact, nearest, a, None, off)
        w = np.ones((1, k)) if a is None else a
        extra = 0 if off is None else off

        def residual(r):
            return np.abs(((r.astype(np.float64) - exact) * w).sum(axis=1) + extra)

        step = (np.abs(exact) * w).max(axis=1) * float(ml_dtypes.finfo(dtype).eps)  # one ULP of the largest term
        assert np.all(residual(comp) <= step), "every row ends within one weight step of zero"
        assert np.median(residual(comp)) < np.median(residual(nearest)) / 8
        # the price: Σδ² grows by a few percent at most (the flipped weights were near ties)
        cost = ((comp.astype(np.float64) - exact) ** 2).sum() / ((nearest.astype(np.float64) - exact) ** 2).sum()
        assert cost < 1.05


def test_deterministic_and_vectorized_rows_are_independent(rng):
    exact = rng.standard_normal((16, 200)) * 0.05
    nearest = round_once(exact, np.float16)
    a = compensate_rows(exact, nearest)
    assert np.array_equal(a.view(np.uint16), compensate_rows(exact.copy(), nearest.copy()).view(np.uint16))
    # each row is rounded on its own: the same row alone gives the same bits
    assert np.array_equal(a[5], compensate_rows(exact[5:6], nearest[5:6])[0])


def test_only_half_precision_is_compensated(rng):
    exact = rng.standard_normal((8, 3, 3, 3))
    for dtype in (np.float32, np.float64):
        nearest = round_once(exact, dtype)
        assert not applies("compensated", dtype)
        out = round_rows(exact, nearest, lambda x: x.reshape(8, -1), "compensated", InputStats())
        assert out is nearest
    assert applies("compensated", np.float16) and applies("compensated", BF16)
    assert not applies("nearest", np.float16)


def test_round_rows_writes_back_through_a_transposing_map(rng):
    """rows() may be a copy (ConvTranspose, Gemm columns): the result goes back to the right places."""
    exact = rng.standard_normal((40, 30)) * 0.1
    nearest = round_once(exact, np.float16)
    by_columns = round_rows(exact, nearest, lambda x: x.T, "compensated")
    assert np.array_equal(by_columns.T, compensate_rows(exact.T, nearest.T))
