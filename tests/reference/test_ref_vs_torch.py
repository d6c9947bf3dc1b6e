"""bnfold.reference against torch in float64: forward, batch statistics, running buffers, grads.

Every case of ``oracles.TORCH_CASES`` (BN inference/training/backward, layer/instance/group
norm with autograd gradients) must agree elementwise within rtol 1e-10 (atol 1e-12 for
outputs that cross zero). ``deviation_table.py`` prints the measured worst case (~1e-14).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.reference import oracles  # noqa: E402


@pytest.mark.parametrize("case", oracles.TORCH_CASES, ids=lambda c: c.id)
def test_matches_torch_float64(case):
    triples = oracles.run_torch(case, oracles.case_rng(case))
    assert triples
    for output, ours, theirs in triples:
        assert ours.dtype == np.float64, output
        np.testing.assert_allclose(
            ours, theirs, rtol=oracles.TORCH_RTOL, atol=oracles.TORCH_ATOL, err_msg=f"{case.id}: {output}"
        )
