"""Tiny examples computed by hand (ε = 0 where the numbers stay exact), and dtype behaviour."""

import numpy as np
import pytest

from bnfold import reference as ref


def test_batch_norm_inference_by_hand():
    # channel 0: 2·(x − 2)/√1 + 0;  channel 1: 1·(x − 3)/√4 + 1
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = ref.batch_norm_inference(x, [2.0, 1.0], [0.0, 1.0], [2.0, 3.0], [1.0, 4.0], epsilon=0.0)
    np.testing.assert_array_equal(y, [[-2.0, 0.5], [2.0, 1.5]])


def test_epsilon_goes_inside_the_square_root():
    # var = 0, ε = 0.25: (x − μ)/√(0 + 0.25) = 2(x − μ); (x − μ)/(σ + ε) would give 4(x − μ).
    y = ref.batch_norm_inference([[1.0]], [1.0], [0.0], [0.0], [0.0], epsilon=0.25)
    np.testing.assert_array_equal(y, [[2.0]])


def test_fold_params_by_hand_and_equals_inference(rng):
    s, t = ref.fold_params([2.0, 1.0], [0.0, 1.0], [2.0, 3.0], [1.0, 4.0], epsilon=0.0)
    np.testing.assert_array_equal(s, [2.0, 0.5])
    np.testing.assert_array_equal(t, [-4.0, -0.5])  # β − s·mean
    assert s.dtype == t.dtype == np.float64
    x = rng.normal(size=(3, 2, 4))
    y = ref.batch_norm_inference(x, [2.0, 1.0], [0.0, 1.0], [2.0, 3.0], [1.0, 4.0], epsilon=0.0)
    np.testing.assert_allclose(s[:, None] * x + t[:, None], y, rtol=1e-14, atol=1e-14)


def test_fold_params_is_float64_and_unrounded_for_float16_parameters():
    scale, zeros, var = (np.array(v, np.float16) for v in ([1.0, 3.0], [0.0, 0.0], [2.0, 2.0]))
    s, _ = ref.fold_params(scale, zeros, zeros, var, 0.0)
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, [1 / np.sqrt(2.0), 3 / np.sqrt(2.0)])  # exact float64, not float16-rounded


def test_batch_norm_training_by_hand():
    # one channel, m = 2 (N = 1, spatial 2): x = [1, 3] → μ = 2, σ² = 1 (biased), x̂ = [−1, 1]
    y, mean, var = ref.batch_norm_training([[[1.0, 3.0]]], [3.0], [1.0], epsilon=0.0)
    np.testing.assert_array_equal(y, [[[-2.0, 4.0]]])
    np.testing.assert_array_equal(mean, [2.0])
    np.testing.assert_array_equal(var, [1.0])


def test_batch_norm_backward_by_hand():
    # m = 4: x = [−1, −1, 1, 1] → μ = 0, σ² = 1, x̂ = x, r = 1; dy = e₀, γ = 1:
    # dx = g − mean(g) − x̂·mean(g·x̂) = [1, 0, 0, 0] − 0.25 − x̂·(−0.25) = [0.5, −0.5, 0, 0]
    x = np.array([-1.0, -1.0, 1.0, 1.0]).reshape(4, 1)
    dy = np.array([1.0, 0.0, 0.0, 0.0]).reshape(4, 1)
    dx, dscale, dbias = ref.batch_norm_backward(dy, x, [1.0], epsilon=0.0)
    np.testing.assert_array_equal(dx.ravel(), [0.5, -0.5, 0.0, 0.0])
    np.testing.assert_array_equal(dscale, [-1.0])  # Σ dy·x̂
    np.testing.assert_array_equal(dbias, [1.0])  # Σ dy


def test_running_stats_conventions_by_hand():
    # old mean 0, old var 1; batch mean 2, biased var 1 over m = 2 (unbiased 2)
    mean_t, var_t = ref.update_running_stats_torch([0.0], [1.0], [2.0], [1.0], m=2, momentum=0.1)
    np.testing.assert_allclose(mean_t, [0.2], rtol=1e-15)  # 0.9·0 + 0.1·2
    np.testing.assert_allclose(var_t, [1.1], rtol=1e-15)  # 0.9·1 + 0.1·2
    mean_o, var_o = ref.update_running_stats_onnx([0.0], [1.0], [2.0], [1.0], momentum=0.9)
    np.testing.assert_allclose(mean_o, [0.2], rtol=1e-15)  # 0.9·0 + 0.1·2
    np.testing.assert_allclose(var_o, [1.0], rtol=1e-15)  # 0.9·1 + 0.1·1 (biased)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: ref.layer_norm(x.reshape(1, 2), [1.0, 1.0], [0.0, 0.0], epsilon=0.0),
        lambda x: ref.instance_norm(x.reshape(1, 1, 2), [1.0], [0.0], epsilon=0.0),
        lambda x: ref.group_norm(x.reshape(1, 2, 1), [1.0, 1.0], [0.0, 0.0], num_groups=1, epsilon=0.0),
        lambda x: ref.batch_norm_training(x.reshape(2, 1), [1.0], [0.0], epsilon=0.0)[0],
    ],
    ids=["layer_norm", "instance_norm", "group_norm", "batch_norm_training"],
)
def test_two_values_normalize_to_minus_one_and_one(fn):
    np.testing.assert_array_equal(fn(np.array([1.0, 3.0])).ravel(), [-1.0, 1.0])


def test_variance_is_two_pass_exact_with_a_large_offset():
    # E[x²] − E[x]² of 1e8 + [1, 3] in float64 loses all digits; the two-pass form is exact.
    y = ref.layer_norm(np.array([[1e8 + 1, 1e8 + 3]]), [1.0, 1.0], [0.0, 0.0], epsilon=0.0)
    np.testing.assert_array_equal(y, [[-1.0, 1.0]])


def test_group_norm_groups_by_hand():
    # C = 4, G = 2: channels {0, 1} and {2, 3} normalized together, per sample; affine per channel
    x = np.array([[1.0, 3.0, 10.0, 30.0]]).reshape(1, 4, 1)
    y = ref.group_norm(x, [1.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0], num_groups=2, epsilon=0.0)
    np.testing.assert_array_equal(y.ravel(), [-1.0, 2.0, -1.0, 6.0])


def test_instance_norm_single_spatial_position_gives_bias():
    # ONNX semantics: σ² = 0, x − μ = 0 → y = β (ε > 0 keeps the division finite)
    y = ref.instance_norm(np.array([[[5.0], [7.0]]]), [2.0, 3.0], [0.5, -1.0])
    np.testing.assert_array_equal(y.ravel(), [0.5, -1.0])


@pytest.mark.parametrize(
    ("x_dtype", "dtype", "expected"),
    [
        (np.float32, None, np.float32),
        (np.float16, None, np.float16),
        (np.float64, None, np.float64),
        (np.int64, None, np.float64),
        (np.int32, None, np.float64),
        (np.float32, np.float64, np.float64),
        (np.float64, np.float16, np.float16),
    ],
)
def test_result_dtype(x_dtype, dtype, expected):
    x = np.arange(8).reshape(2, 2, 2).astype(x_dtype)
    ones, zeros = np.ones(2), np.zeros(2)
    results = [
        ref.batch_norm_inference(x, ones, zeros, zeros, ones, dtype=dtype),
        *ref.batch_norm_training(x, ones, zeros, dtype=dtype),
        *ref.batch_norm_backward(x, x, ones, dtype=dtype),
        ref.layer_norm(x, ones, zeros, dtype=dtype),
        *ref.layer_norm_backward(x, x, ones, dtype=dtype),
        ref.instance_norm(x, ones, zeros, dtype=dtype),
        *ref.instance_norm_backward(x, x, ones, dtype=dtype),
        ref.group_norm(x, ones, zeros, 2, dtype=dtype),
        *ref.group_norm_backward(x, x, ones, 2, dtype=dtype),
    ]
    assert [r.dtype for r in results] == [np.dtype(expected)] * len(results)


def test_float32_input_is_computed_in_float64_then_rounded_once(rng):
    x = rng.normal(3.0, 0.01, size=(64, 2)).astype(np.float32)
    y32 = ref.batch_norm_training(x, [1.0, 1.0], [0.0, 0.0])[0]
    y64 = ref.batch_norm_training(x, [1.0, 1.0], [0.0, 0.0], dtype=np.float64)[0]
    np.testing.assert_array_equal(y32, y64.astype(np.float32))


def test_bfloat16_input_keeps_its_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[1.0, 3.0]], dtype=ml_dtypes.bfloat16).reshape(2, 1)
    y, _, _ = ref.batch_norm_training(x, [1.0], [0.0], epsilon=0.0)
    assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(y.astype(np.float64).ravel(), [-1.0, 1.0])
