"""PopulationMoments: the running sums of Algorithm 2 in torch, against the NumPy oracle."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnfold.errors import InputDataError  # noqa: E402
from bnfold.reference import PopulationStats  # noqa: E402
from bnfold.torch import PopulationMoments  # noqa: E402
from bnfold.torch.moments import batch_moments  # noqa: E402


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, 3, generator=g, dtype=torch.float64) * 2 - 1 for n in (2, 5, 3, 8)]


def test_merge_equals_one_pass_and_converts_to_the_reference():
    batches = _batches()
    whole, first, second = (PopulationMoments.zeros(4) for _ in range(3))
    oracle = PopulationStats(4)
    for i, x in enumerate(batches):
        whole.add_batch(x)
        (first if i % 2 == 0 else second).add_batch(x)
        oracle.update(x.numpy())
    assert first.merge_(second) is first
    for merged in (first, whole):
        assert (int(merged.num_batches), int(merged.count)) == (4, (2 + 5 + 3 + 8) * 3)
        np.testing.assert_allclose(merged.mean.numpy(), oracle.mean, rtol=1e-12)
        np.testing.assert_allclose(merged.var.numpy(), oracle.var, rtol=1e-12)
    ref = whole.to_reference()
    assert (ref.num_batches, ref.count) == (oracle.num_batches, oracle.count)
    np.testing.assert_allclose(ref.var, oracle.var, rtol=1e-12)
    whole.reset_()
    assert int(whole.num_batches) == 0 and float(whole.sum_var.abs().sum()) == 0.0


def test_add_moments_matches_reference_update_moments():
    mine, oracle = PopulationMoments.zeros(4), PopulationStats(4)
    for x in _batches(1):
        m, mean, var = batch_moments(x)
        assert m == x.shape[0] * x.shape[2]
        mine.add_moments(m, mean, var)
        oracle.update_moments(m, mean.numpy(), var.numpy())
    np.testing.assert_allclose(mine.var.numpy(), oracle.var, rtol=1e-12)
    np.testing.assert_allclose(mine.mean.numpy(), oracle.mean, rtol=1e-12)


def test_bad_batches_name_the_problem():
    moments = PopulationMoments.zeros(4)
    with pytest.raises(InputDataError, match=r"^batch of shape \(4,\): BatchNorm needs \(N, C, \.\.\.\) with the channels on axis 1$"):
        moments.add_batch(torch.randn(4))
    with pytest.raises(InputDataError, match=r"^batch with 3 channels: the statistics have 4$"):
        moments.add_batch(torch.randn(2, 3))
    with pytest.raises(InputDataError, match=r"^batch with m=1 value per channel: Algorithm 2 needs m >= 2$"):
        moments.add_batch(torch.randn(1, 4))
    assert int(moments.num_batches) == 0
