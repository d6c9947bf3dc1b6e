"""bnfold.numerics against direct float64 evaluation: the folded layer computes s·L(x) + t."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from bnfold import numerics as nx
from tests.converter._passutil import BF16, ref_conv, ref_conv_transpose


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def affine(rng, c):
    return rng.normal(1, 0.5, c), rng.normal(0, 0.5, c)


def test_bn_affine_matches_the_definition(rng):
    scale, bias, mean, var = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 2, 5)
    s, t = nx.bn_affine(scale.astype(np.float32), bias, mean, var, epsilon=0.01)
    x = rng.normal(size=(3, 5))
    direct = (x - mean) / np.sqrt(var + 0.01) * scale.astype(np.float32) + bias
    np.testing.assert_allclose(s * x + t, direct, rtol=1e-13, atol=1e-13)


def test_compose_is_function_composition(rng):
    first, then = affine(rng, 4), affine(rng, 4)
    x = rng.normal(size=4)
    s, t = nx.compose(first, then)
    np.testing.assert_allclose(s * x + t, then[0] * (first[0] * x + first[1]) + then[1], rtol=1e-14)


@pytest.mark.parametrize(("shape", "groups", "strides", "pads", "dilations"), [
    ((2, 4, 7), 1, [2], [1, 0], [1]),
    ((2, 4, 6, 5), 2, [1, 2], [1, 1, 0, 2], [2, 1]),
    ((1, 4, 5, 5), 4, [1, 1], [0, 0, 0, 0], [1, 1]),  # depthwise
    ((1, 2, 4, 4, 3), 1, [1, 1, 1], [1, 0, 0, 0, 1, 0], [1, 1, 1]),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_equals_bn_after_conv(rng, shape, groups, strides, pads, dilations, with_bias):
    c_in, nd, c_out = shape[1], len(shape) - 2, 6 if groups != shape[1] else shape[1]
    w = rng.normal(size=(c_out, c_in // groups) + (3,) * nd)
    b = rng.normal(size=c_out) if with_bias else None
    s, t = affine(rng, c_out)
    x = rng.normal(size=shape)
    kw = dict(strides=strides, pads=pads, dilations=dilations, groups=groups)
    expected = s.reshape((1, -1) + (1,) * nd) * ref_conv(x, w, b, **kw) + t.reshape((1, -1) + (1,) * nd)
    w2, b2 = nx.fold_conv(w, b, s, t)
    np.testing.assert_allclose(ref_conv(x, w2, b2, **kw), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("c_in", "c_out_g", "groups"), [(4, 3, 1), (4, 3, 2), (6, 1, 6), (6, 2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_transpose_grouped(rng, c_in, c_out_g, groups, with_bias):
    w = rng.normal(size=(c_in, c_out_g, 3, 2))
    c_out = c_out_g * groups
    b = rng.normal(size=c_out) if with_bias else None
    s, t = affine(rng, c_out)
    x = rng.normal(size=(2, c_in, 3, 4))
    kw = dict(strides=[2, 1], pads=[1, 0, 0, 1], output_padding=[1, 0], groups=groups)
    expected = s.reshape(1, -1, 1, 1) * ref_conv_transpose(x, w, b, **kw) + t.reshape(1, -1, 1, 1)
    w2, b2 = nx.fold_conv_transpose(w, b, s, t, groups=groups)
    np.testing.assert_allclose(ref_conv_transpose(x, w2, b2, **kw), expected, rtol=1e-12, atol=1e-12)


def test_conv_transpose_channel_map_is_not_the_ungrouped_one():
    # W [C_in=4, C_out/g=2], g=2: rows 0-1 feed channels 0-1, rows 2-3 feed channels 2-3.
    np.testing.assert_array_equal(nx.conv_transpose_channel_map((4, 2), 2), [[0, 1], [0, 1], [2, 3], [2, 3]])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 5), (3, 1)])
def test_fold_gemm(rng, trans_a, trans_b, alpha, beta, c_shape):
    a = rng.normal(size=(4, 3) if trans_a else (3, 4))
    b = rng.normal(size=(5, 4) if trans_b else (4, 5))
    c = None if c_shape is None else rng.normal(size=c_shape)
    s, t = affine(rng, 5)

    def gemm(b_, c_, beta_):
        y = alpha * (a.T if trans_a else a) @ (b_.T if trans_b else b_)
        return y if c_ is None else y + beta_ * c_

    b2, c2 = nx.fold_gemm(b, c, s, t, trans_b=bool(trans_b), beta=beta)
    np.testing.assert_allclose(gemm(b2, c2, 1.0), s * gemm(b, c, beta) + t, rtol=1e-12, atol=1e-12)
    assert c2.ndim <= 2 and c2.shape[-1] == 5


@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5)])
def test_fold_matmul(rng, bias_shape):
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    bias = None if bias_shape is None else rng.normal(size=bias_shape)
    s, t = affine(rng, 5)
    b2, bias2 = nx.fold_matmul(b, bias, s, t)
    y = a @ b + (0 if bias is None else bias)
    np.testing.assert_allclose(a @ b2 + bias2, s * y + t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(4, 6, 1), (4, 6, 2), (4, 4, 4)])
def test_fold_forward_conv_without_padding(rng, c_in, c_out, groups):
    w = rng.normal(size=(c_out, c_in // groups, 3, 3))
    b = rng.normal(size=c_out)
    s, t = affine(rng, c_in)
    x = rng.normal(size=(2, c_in, 6, 5))
    kw = dict(strides=[2, 1], dilations=[1, 2], groups=groups)
    expected = ref_conv(s.reshape(1, -1, 1, 1) * x + t.reshape(1, -1, 1, 1), w, b, **kw)
    w2, b2 = nx.fold_forward_conv(w, b, s, t, groups=groups)
    np.testing.assert_allclose(ref_conv(x, w2, b2, **kw), expected, rtol=1e-12, atol=1e-12)


def test_forward_fold_is_wrong_with_padding(rng):
    """Why padding refuses the forward fold: the border sees t where it should see 0."""
    w, s, t = rng.normal(size=(2, 2, 3, 3)), *affine(rng, 2)
    x = rng.normal(size=(1, 2, 4, 4))
    w2, b2 = nx.fold_forward_conv(w, None, s, t)
    folded = ref_conv(x, w2, b2, pads=[1, 1, 1, 1])
    exact = ref_conv(s.reshape(1, -1, 1, 1) * x + t.reshape(1, -1, 1, 1), w, None, pads=[1, 1, 1, 1])
    assert np.abs(folded - exact).max() > 1e-3
    np.testing.assert_allclose(folded[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], rtol=1e-12)


def _exact_round_bf16(x: float) -> float:
    """Round-to-nearest-even to bfloat16 (8 significant bits) with exact rational arithmetic."""
    f = Fraction(x)
    if f == 0:
        return 0.0
    e = abs(f).numerator.bit_length() - abs(f).denominator.bit_length()
    while Fraction(2) ** e > abs(f):
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(f):
        e += 1
    ulp = Fraction(2) ** (e - 7)
    q, r = divmod(f, ulp)
    if r > ulp / 2 or (r == ulp / 2 and q % 2 == 1):
        q += 1
    return float(q * ulp)


def test_bfloat16_rounds_once_not_twice():
    # 1 + 2^-8 is a bfloat16 tie; a hair above it must round UP. float64 → float32 → bfloat16
    # (what astype does) loses the hair in float32 and rounds the tie to even: down.
    x = np.array([1 + 2**-8 + 2**-30, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-30)])
    assert x.astype(BF16).astype(np.float64)[0] == 1.0  # the double-rounding trap exists
    np.testing.assert_array_equal(nx.round_once(x, BF16).astype(np.float64), [1 + 2**-7, 1.0, 1 + 2**-6, -(1 + 2**-7)])


def test_bfloat16_rounding_matches_exact_rational_rounding(rng):
    x = np.concatenate([rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, 2000),
                        # values within a few float32 ULPs of bfloat16 ties
                        (1 + (2 * rng.integers(0, 128, 500) + 1) * 2**-8) * (1 + rng.integers(-4, 5, 500) * 2**-40)])
    got = nx.round_once(x, BF16).astype(np.float64)
    np.testing.assert_array_equal(got, [_exact_round_bf16(v) for v in x])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float16_and_float32_round_once_to_nearest(rng, dtype):
    x = rng.normal(size=3000) * 10.0 ** rng.integers(-3, 4, 3000)
    got = nx.round_once(x, dtype)
    assert got.dtype == dtype
    # correctly rounded: no representable neighbour is closer to x
    up = np.nextafter(got, np.array(np.inf, dtype=dtype)).astype(np.float64)
    down = np.nextafter(got, np.array(-np.inf, dtype=dtype)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - x)
    assert np.all(err <= np.abs(up - x)) and np.all(err <= np.abs(down - x))


@pytest.mark.parametrize(("dtype", "name"), [(np.float16, "float16"), (BF16, "bfloat16"), (np.float32, "float32")])
def test_guard_refuses_overflow(dtype, name):
    big = float(np.finfo(np.float32).max) * 2 if dtype != np.float16 else 70000.0
    with pytest.raises(nx.PrecisionRefused, match=f"folded weights of X would overflow {name}"):
        nx.round_checked(np.array([[1.0, big]]), dtype, what="weights of X", rows=nx.conv_rows)


@pytest.mark.parametrize(("dtype", "tiny_value"), [(np.float16, 1e-6), (BF16, 1e-39), (np.float32, 1e-40)])
def test_guard_refuses_a_channel_flushed_to_subnormal(dtype, tiny_value):
    w = np.array([[1.0, 2.0], [tiny_value, -tiny_value / 2]])
    with pytest.raises(nx.PrecisionRefused, match="output channel 1 would flush to zero/subnormal"):
        nx.round_checked(w, dtype, what="weights of X", rows=nx.conv_rows)


def test_guard_allows_exact_zero_channels_and_single_subnormals():
    w = np.array([[0.0, 0.0], [1.0, 1e-6]])  # gamma = 0 channel; one subnormal next to a normal
    out = nx.round_checked(w, np.float16, what="w", rows=nx.conv_rows)
    np.testing.assert_array_equal(out, w.astype(np.float16))


def test_guard_refuses_nan():
    with pytest.raises(nx.PrecisionRefused, match="NaN or inf"):
        nx.round_checked(np.array([1.0, np.nan]), np.float32, what="bias of X")


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_round_checked_is_round_once(rng, dtype):
    x = rng.normal(size=(4, 9))
    np.testing.assert_array_equal(nx.round_checked(x, dtype, what="w", rows=nx.conv_rows), nx.round_once(x, dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, BF16])
def test_fused_conv_scaling_equals_round_checked(rng, dtype):
    w = rng.normal(size=(5, 3, 2, 2)).astype(dtype)
    s = rng.normal(size=5)
    expected = nx.round_checked(nx.fold_conv(w, None, s, np.zeros(5))[0], dtype, what="w", rows=nx.conv_rows)
    got = nx.scale_rows_checked(w, s, dtype, what="w")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))


@pytest.mark.parametrize(("scale", "match"), [
    (np.array([1.0, 1e6]), "would overflow float16"),
    (np.array([1.0, 1e-9]), "output channel 1 would flush to zero/subnormal in float16"),
    (np.array([1.0, np.nan]), "NaN or inf"),
])
def test_fused_conv_scaling_guard(scale, match):
    w = np.ones((2, 3), np.float16)
    with pytest.raises(nx.PrecisionRefused, match=match):
        nx.scale_rows_checked(w, scale, np.float16, what="w")
