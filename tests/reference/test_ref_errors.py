"""Every bad argument raises ValueError with a one-line message naming it and the problem."""

import re

import numpy as np
import pytest

from bnfold import reference as ref
from bnfold.reference import PopulationStats

X = np.arange(12.0).reshape(2, 3, 2)  # N=2, C=3, one spatial axis of 2: m = 4 per channel
C3, C4 = np.ones(3), np.ones(4)
Z3 = np.zeros(3)
NEG_VAR = np.array([1.0, -0.5, 2.0])


def _filled_stats(c=3):
    stats = PopulationStats(c)
    stats.update(np.arange(2.0 * c).reshape(2, c))
    return stats


CASES = [
    # --- shapes and channels
    ("rank-1 x", lambda: ref.batch_norm_inference(np.ones(3), C3, Z3, Z3, C3),
     "x has shape (3,) (rank 1), expected rank >= 2 ((N, C, ...) with channels on axis 1)"),
    ("scale channels", lambda: ref.batch_norm_inference(X, C4, Z3, Z3, C3),
     "scale has shape (4,), expected (3,) = number of channels of x (axis 1)"),
    ("var channels", lambda: ref.batch_norm_inference(X, C3, Z3, Z3, np.ones((3, 1))),
     "var has shape (3, 1), expected (3,) = number of channels of x (axis 1)"),
    ("bias channels training", lambda: ref.batch_norm_training(X, C3, np.zeros(2)),
     "bias has shape (2,), expected (3,) = number of channels of x (axis 1)"),
    ("dy shape", lambda: ref.batch_norm_backward(X[:1], X, C3),
     "dy has shape (1, 3, 2), expected (2, 3, 2) = shape of x"),
    ("layer_norm scale", lambda: ref.layer_norm(X, np.ones(3), np.zeros(3)),
     "scale has shape (3,), expected (2,) = x.shape[-1:] (the normalized axes)"),
    ("layer_norm bias", lambda: ref.layer_norm(X, np.ones((3, 2)), np.zeros(2), axis=1),
     "bias has shape (2,), expected (3, 2) = shape of scale"),
    ("layer_norm axis", lambda: ref.layer_norm(X, C3, Z3, axis=3),
     "axis=3 is out of range for x of rank 3, expected -3 <= axis < 3"),
    ("instance_norm rank 2", lambda: ref.instance_norm(np.ones((2, 3)), C3, Z3),
     "x has shape (2, 3) (rank 2), expected rank >= 3 "
     "((N, C, D1, ...) with channels on axis 1 and at least one spatial axis)"),
    ("instance_norm scale", lambda: ref.instance_norm(X, C4, Z3),
     "scale has shape (4,), expected (3,) = number of channels of x (axis 1)"),
    ("group_norm bias", lambda: ref.group_norm(X, C3, np.zeros(4), 3),
     "bias has shape (4,), expected (3,) = number of channels of x (axis 1)"),
    ("fold_params 2-D", lambda: ref.fold_params(np.ones((3, 1)), Z3, Z3, C3),
     "scale has shape (3, 1), expected a 1-D per-channel vector (C,)"),
    ("fold_params mean", lambda: ref.fold_params(C3, Z3, np.zeros(2), C3),
     "mean has shape (2,), expected (3,) = shape of scale"),
    ("running_var shape", lambda: ref.update_running_stats_onnx(Z3, np.ones(2), Z3, C3),
     "running_var has shape (2,), expected (3,) = shape of running_mean"),
    # --- num_groups
    ("num_groups not dividing", lambda: ref.group_norm(np.ones((2, 6, 2)), np.ones(6), np.zeros(6), 4),
     "num_groups=4 does not divide the number of channels of x (axis 1) = 6"),
    ("num_groups zero", lambda: ref.group_norm_backward(X, X, C3, 0),
     "num_groups=0, expected a positive integer"),
    ("num_groups float", lambda: ref.group_norm(X, C3, Z3, 1.5),
     "num_groups=1.5, expected a positive integer"),
    # --- m = 1
    ("training m=1", lambda: ref.batch_norm_training(np.ones((1, 3)), C3, Z3),
     "x has shape (1, 3): 1 value(s) per channel (N × spatial), expected at least 2 for batch statistics"),
    ("backward m=1", lambda: ref.batch_norm_backward(np.ones((1, 3, 1)), np.ones((1, 3, 1)), C3),
     "x has shape (1, 3, 1): 1 value(s) per channel (N × spatial), expected at least 2"),
    ("torch running m=1", lambda: ref.update_running_stats_torch(Z3, C3, Z3, C3, m=1),
     "m=1 value(s) per channel, expected at least 2 for batch statistics (the unbiased variance divides by m - 1)"),
    ("m not an integer", lambda: ref.update_running_stats_torch(Z3, C3, Z3, C3, m=4.0),
     "m=4.0, expected an integer number of values per channel"),
    ("population update m=1", lambda: PopulationStats(3).update(np.ones((1, 3))),
     "x has shape (1, 3): 1 value(s) per channel (N × spatial), expected at least 2"),
    ("population moments m=1", lambda: PopulationStats(3).update_moments(1, Z3, Z3),
     "m=1 value(s) per channel, expected at least 2"),
    # --- negative variance
    ("inference var", lambda: ref.batch_norm_inference(X, C3, Z3, Z3, NEG_VAR),
     "var has negative entries (1 of 3, first -0.5 at index 1); a variance cannot be negative"),
    ("fold var", lambda: ref.fold_params(C3, Z3, Z3, NEG_VAR),
     "var has negative entries (1 of 3, first -0.5 at index 1)"),
    ("torch running_var", lambda: ref.update_running_stats_torch(Z3, NEG_VAR, Z3, C3, m=4),
     "running_var has negative entries"),
    ("onnx batch var", lambda: ref.update_running_stats_onnx(Z3, C3, Z3, NEG_VAR),
     "batch_var_biased has negative entries"),
    ("population batch_var", lambda: PopulationStats(3).update_moments(4, Z3, NEG_VAR),
     "batch_var has negative entries"),
    # --- epsilon, momentum, division by zero, dtypes
    ("negative epsilon", lambda: ref.layer_norm(X, np.ones(2), np.zeros(2), epsilon=-1e-5),
     "epsilon=-1e-05, expected a finite number >= 0"),
    ("zero denominator", lambda: ref.fold_params(C3, Z3, Z3, Z3, epsilon=0.0),
     "var + epsilon is 0 at index 0 (epsilon=0.0); the normalization would divide by zero"),
    ("constant batch, epsilon 0", lambda: ref.batch_norm_training(np.ones((2, 3)), C3, Z3, epsilon=0),
     "the batch variance + epsilon is 0 at index 0 (epsilon=0.0)"),
    ("momentum", lambda: ref.update_running_stats_onnx(Z3, C3, Z3, C3, momentum=1.5),
     "momentum=1.5, expected a number in [0, 1]"),
    ("complex x", lambda: ref.instance_norm(X.astype(complex), C3, Z3),
     "x has dtype complex128, expected a real floating-point or integer dtype"),
    ("integer dtype", lambda: ref.layer_norm(X, np.ones(2), np.zeros(2), dtype=np.int32),
     "dtype=int32 is not a floating-point dtype"),
    # --- PopulationStats
    ("num_channels", lambda: PopulationStats(0), "num_channels=0, expected a positive integer"),
    ("population channels", lambda: PopulationStats(3).update(np.ones((2, 4))),
     "x has shape (2, 4) with 4 channels (axis 1), expected 3 = num_channels of this PopulationStats"),
    ("population moments shape", lambda: PopulationStats(3).update_moments(4, np.zeros(2), Z3),
     "batch_mean has shape (2,), expected (3,) = num_channels of this PopulationStats"),
    ("population NaN", lambda: PopulationStats(3).update(np.full((2, 3), np.nan)),
     "x contains NaN or infinity; it would poison the population statistics"),
    ("empty mean", lambda: PopulationStats(3).mean,
     "PopulationStats(num_channels=3, num_batches=0, count=0) has no batches: call update() or update_moments() first"),
    ("empty var", lambda: PopulationStats(2).var,
     "PopulationStats(num_channels=2, num_batches=0, count=0) has no batches"),
    ("merge channels", lambda: _filled_stats(3).merge(_filled_stats(4)),
     "cannot merge PopulationStats(num_channels=4, num_batches=1, count=2) into "
     "PopulationStats(num_channels=3, num_batches=1, count=2): num_channels 4 != 3"),
    ("state version", lambda: PopulationStats.from_state_dict({**_filled_stats().state_dict(), "format_version": 7}),
     "PopulationStats format_version is 7, this bnfold reads 1"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_value_error_names_the_problem(call, message):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    assert re.match(re.escape(message), text), text


def test_merge_refuses_other_types():
    with pytest.raises(TypeError, match="cannot merge dict into PopulationStats"):
        PopulationStats(3).merge({})


def test_a_refused_update_leaves_the_stats_unchanged():
    stats = _filled_stats(3)
    before = stats.state_dict()
    with pytest.raises(ValueError):
        stats.update_moments(4, Z3, NEG_VAR)
    after = stats.state_dict()
    assert (after["num_batches"], after["count"]) == (before["num_batches"], before["count"])
    np.testing.assert_array_equal(after["sum_m_var_unbiased"], before["sum_m_var_unbiased"])
