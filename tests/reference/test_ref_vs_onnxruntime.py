"""bnfold.reference against onnxruntime's own operators in float32 (CPU, optimizations off).

Opsets used: BatchNormalization-15 (inference and training_mode=1 with its running_mean /
running_var outputs), LayerNormalization-17, InstanceNormalization (opset 17 model),
GroupNormalization-18 (per-group scale, deprecated but run by onnxruntime) and -21
(per-channel scale). Ours is evaluated in float64 on the same float32 inputs, so the bound is
onnxruntime's float32 error; see ``oracles.ort_bounds`` for the per-operator budget.
"""

import numpy as np
import pytest

from bnfold import reference as ref
from tests.reference import oracles


@pytest.mark.parametrize("case", oracles.ORT_CASES, ids=lambda c: c.id)
def test_matches_onnxruntime_float32(case):
    rtol, atol = oracles.ort_bounds(case)
    triples = oracles.run_ort(case, oracles.case_rng(case))
    assert triples
    for output, ours, theirs in triples:
        assert theirs.dtype == np.float32, output
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=f"{case.id}: {output}")


def test_onnxruntime_running_var_is_the_biased_batch_variance(rng):
    """With momentum 0, BatchNormalization-15 training_mode=1 outputs running_var = current var.

    onnxruntime's value is the BIASED batch variance (as the ONNX spec says), not torch's
    unbiased one: with m = 4 values per channel the two differ by 4/3, far outside float32
    noise. This pins the convention ``update_running_stats_onnx`` follows.
    """
    x = rng.normal(size=(2, 3, 2)).astype(np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    feeds = dict(x=x, s=ones, b=zeros, m=zeros, v=zeros)
    outputs = {"y": x.shape, "rm": (3,), "rv": (3,)}
    _, running_mean, running_var = oracles.run_onnx_node(
        "BatchNormalization", feeds, outputs, 15, momentum=0.0, training_mode=1
    )
    _, batch_mean, batch_var = ref.batch_norm_training(x, ones, zeros, dtype=np.float64)
    np.testing.assert_allclose(running_mean, batch_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(running_var, batch_var, rtol=1e-6)
    assert np.all(np.abs(running_var / (batch_var * 4 / 3) - 1) > 0.2)
