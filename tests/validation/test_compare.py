"""The metrics of bnfold.validation.compare, on hand-made arrays with known answers."""

import math

import ml_dtypes
import numpy as np
import pytest

from bnfold.validation.compare import compare_output
from onnx import helper, numpy_helper

from bnfold.validation.tolerances import (
    EPS_MULTIPLIER, MIN_REDUCTION, UNKNOWN_REDUCTION, max_reduction_length, resolve_tolerance,
)

F32_EPS = float(np.finfo(np.float32).eps)


def test_figures_on_a_known_difference():
    a = np.array([[1.0, -2.0, 4.0, 0.0]], np.float32)
    b = np.array([[1.0, -2.0, 4.5, 0.25]], np.float32)
    o = compare_output("y", [a], [b], rtol=0.1, atol=0.1)
    assert o.max_abs_error == 0.5
    # element 3 has a == 0: measured against eps·max|a| = eps·4
    assert o.max_rel_error == pytest.approx(0.25 / (F32_EPS * 4))
    assert o.reference_max_abs == 4.0
    assert o.reference_rms == pytest.approx(math.sqrt((1 + 4 + 16) / 4))
    assert o.error_vs_rms == pytest.approx(0.5 / o.reference_rms)
    # 0.5 > 0.1 + 0.1·4 = 0.5? no (equal passes); 0.25 > 0.1 + 0 fails
    assert o.failing == 1 and o.failing_fraction == 0.25 and not o.passed
    assert o.needed_atol == pytest.approx(0.25)          # max(d − rtol·|a|)
    assert o.needed_rtol == math.inf                     # a == 0 element needs atol, not rtol
    assert o.worst.sample == 0 and o.worst.index == (0, 3)
    assert (o.worst.reference, o.worst.candidate) == (0.0, 0.25)


def test_needed_rtol_is_the_smallest_that_passes():
    a = np.array([2.0, 4.0], np.float64)
    b = np.array([2.2, 4.2], np.float64)
    o = compare_output("y", [a], [b], rtol=0.0, atol=0.0)
    assert o.needed_rtol == pytest.approx(0.1)
    assert compare_output("y", [a], [b], rtol=o.needed_rtol * 1.000001, atol=0.0).passed
    assert not compare_output("y", [a], [b], rtol=o.needed_rtol * 0.99, atol=0.0).passed


@pytest.mark.parametrize("ref, cand, passed, mismatches", [
    ([np.nan, 1.0], [np.nan, 1.0], True, 0),           # NaN in both at the same place: equal
    ([np.nan, 1.0], [1.0, 1.0], False, 1),             # NaN only in the reference
    ([1.0, 1.0], [1.0, np.nan], False, 1),             # NaN only in the candidate
    ([np.nan, 1.0], [1.0, np.nan], False, 2),          # NaN in both, other places
    ([np.inf, 1.0], [np.inf, 1.0], True, 0),           # same infinity
    ([np.inf, 1.0], [-np.inf, 1.0], False, 1),         # opposite infinities
    ([np.inf, 1.0], [3e38, 1.0], False, 1),            # inf against a finite value
])
def test_nonfinite_values(ref, cand, passed, mismatches):
    o = compare_output("y", [np.array(ref, np.float32)], [np.array(cand, np.float32)], rtol=1e3, atol=1e3)
    assert o.passed is passed
    assert o.nonfinite_mismatches == mismatches
    assert o.failing == mismatches
    if not passed:
        assert o.needed_atol == math.inf and o.worst is not None


def test_shape_and_dtype_mismatch_fail_with_a_message():
    a = np.zeros((2, 3), np.float32)
    o = compare_output("y", [a], [np.zeros((3, 2), np.float32)])
    assert not o.passed and o.message == "output 'y': shape differs: reference [2, 3], candidate [3, 2]"
    o = compare_output("y", [a], [np.zeros((2, 3), np.float16)])
    assert not o.passed and o.message == "output 'y': dtype differs: reference float32, candidate float16"


def test_float16_is_upcast_before_differencing():
    # 2048 and 2050 are adjacent float16 values: the difference must be 2, not rounded.
    a = np.array([2048.0], np.float16)
    b = np.array([2050.0], np.float16)
    o = compare_output("y", [a], [b], rtol=0.0, atol=1.9)
    assert o.max_abs_error == 2.0 and not o.passed


def test_bfloat16_compares_with_its_own_default():
    a = np.array([1.0, 2.0], ml_dtypes.bfloat16)
    b = np.array([1.0, 2.0078125], ml_dtypes.bfloat16)   # one bfloat16 ulp at 2
    o = compare_output("y", [a], [b], reduction=16)
    assert o.dtype == "bfloat16" and o.passed
    assert o.tolerance.rtol == pytest.approx(EPS_MULTIPLIER["bfloat16"] * 4 * 2.0 ** -7)


def test_integers_are_exact_even_beyond_2_to_the_53():
    a = np.array([2**60, 5], np.int64)
    b = np.array([2**60 + 1, 5], np.int64)   # equal after a float64 upcast
    o = compare_output("idx", [a], [b])
    assert o.tolerance.source == "exact" and o.failing == 1 and not o.passed


def test_samples_are_pooled_and_the_worst_is_located_in_its_sample():
    ref = [np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32)]
    cand = [np.zeros((2, 2), np.float32), np.array([[0, 0], [0, 1e-3]], np.float32)]
    o = compare_output("y", ref, cand, rtol=0.0, atol=1e-4)
    assert o.elements == 8 and o.failing == 1 and o.failing_fraction == 1 / 8
    assert (o.worst.sample, o.worst.index) == (1, (1, 1))


@pytest.mark.parametrize("dtype, c, eps", [
    (np.float64, 16, 2.0 ** -52), (np.float32, 16, 2.0 ** -23), (np.float16, 2, 2.0 ** -10),
    (ml_dtypes.bfloat16, 2, 2.0 ** -7),
])
@pytest.mark.parametrize("reduction, root", [(4608, 4608 ** 0.5), (100, 10.0), (3, 4.0)])   # K ≥ 16
def test_default_tolerance_table(dtype, c, eps, reduction, root):
    tol = resolve_tolerance(np.dtype(dtype), 3.0, reduction=reduction)
    k = c * root
    assert tol.eps_multiple == pytest.approx(k) and tol.source == "default"
    assert tol.rtol == pytest.approx(k * eps) and tol.atol == pytest.approx(k * eps * 3.0)
    assert resolve_tolerance(np.dtype(dtype), 0.0, reduction=reduction).atol == pytest.approx(k * eps)  # all zero


def test_user_tolerances_override_one_by_one():
    tol = resolve_tolerance(np.dtype(np.float32), 10.0, reduction=64, rtol=1e-3)
    assert tol.rtol == 1e-3 and tol.atol == pytest.approx(16 * 8 * F32_EPS * 10.0) and tol.source == "user"
    tol = resolve_tolerance(np.dtype(np.int32), 10.0, atol=1)
    assert (tol.rtol, tol.atol) == (0.0, 1.0)


def _linear_model(nodes, inits):
    graph = helper.make_graph(nodes, "g", [], [], inits)
    return helper.make_model(graph)


def _w(name, *dims):
    return numpy_helper.from_array(np.zeros(dims, np.float32), name)


@pytest.mark.parametrize("nodes, inits, expected", [
    ([helper.make_node("Conv", ["x", "W"], ["y"])], [_w("W", 64, 32, 3, 3)], 32 * 9),
    ([helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2)], [_w("W", 64, 8, 2, 2)], 32 * 4),
    ([helper.make_node("Gemm", ["x", "B"], ["y"])], [_w("B", 300, 10)], 300),
    ([helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)], [_w("B", 10, 300)], 300),
    ([helper.make_node("MatMul", ["x", "B"], ["y"])], [_w("B", 5, 200, 7)], 200),
    ([helper.make_node("MatMul", ["x", "z"], ["y"])], [], UNKNOWN_REDUCTION),   # weight not known
    ([helper.make_node("Relu", ["x"], ["y"])], [], MIN_REDUCTION),              # no dot product
    ([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Gemm", ["c", "B"], ["y"])],
     [_w("W", 8, 4, 1, 1), _w("B", 2048, 10)], 2048),
])
def test_max_reduction_length(nodes, inits, expected):
    assert max_reduction_length(_linear_model(nodes, inits)) == expected
