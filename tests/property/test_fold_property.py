"""The fold property, proved over generated graphs (issue 6).

For every generated case (see :mod:`tests.property.graphs`): ``bnfold.fold`` must

1. produce a model that onnxruntime (ORT_DISABLE_ALL) runs and whose every output matches the
   unfolded model's: per element of output channel c,
   ``|folded − original| ≤ 4·eps32·√(fan_in + 2)·S[c]``, where S[c] bounds every value the
   error comes from (``graphs.channel_scale``: |s|·(L1 bound of the producer's channel + |E|)
   + |β|). Rounding error of a length-K dot product grows like √K·eps of its magnitude, and a
   BN with a large mean computes h − E (original) or s·h + t (folded) at the scale of |s·E|:
   the bound is relative to the output scale AND to that cancellation (the fold's condition).
   Outputs the fold must not touch (a twin producer sharing the weight, a Relu on the
   producer) must be bit-identical;
2. report every BN exactly as the generator's ground truth says: folded into the right node,
   or rewritten/kept with a reason that is true for the graph (an extra consumer, a graph
   output, training mode, a parameter that is a graph input, the 3-D MatMul feature axis),
   ``blocking`` exactly for the kept ones.

Profiles: ``small`` (60 examples, derandomized: the same graphs on every run) in ``make
test``; the ``slow`` test runs the profile named by ``BNFOLD_HYPOTHESIS_PROFILE`` (default
``large``, 1,000 examples; ``huge``, 5,000):

    .venv/bin/python -m pytest tests/property -m slow --hypothesis-show-statistics
    BNFOLD_HYPOTHESIS_PROFILE=huge .venv/bin/python -m pytest tests/property -m slow
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import bnfold
from tests.ortutil import run
from tests.property.graphs import Case, cases

EPS32 = float(np.finfo(np.float32).eps)
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILES = {
    "small": settings(max_examples=60, derandomize=True, **_COMMON),
    "large": settings(max_examples=1000, derandomize=True, **_COMMON),
    "huge": settings(max_examples=5000, derandomize=False, **_COMMON),
}
LARGE = PROFILES[os.environ.get("BNFOLD_HYPOTHESIS_PROFILE", "large")]


def _outputs(model, feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    return dict(zip(names, run(model, feeds)))


def assert_equivalent(case: Case, folded) -> None:
    want = _outputs(case.model, case.feeds)
    got = _outputs(folded, case.feeds)
    assert set(got) == set(want)
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if name not in case.scale:  # untouched by the fold: bit-identical
            np.testing.assert_array_equal(out, ref, err_msg=f"{name} changed ({case.describe})")
            continue
        tol = 4 * EPS32 * np.sqrt(case.fan_in + 2) * case.scale[name]
        tol = tol.reshape((1, -1) + (1,) * (ref.ndim - 2))
        err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        assert np.all(np.isfinite(out)) and np.all(err <= tol), (
            f"{name}: max error / tolerance {np.max(err / tol):.3g} ({case.describe})")


def assert_report_true(case: Case, result) -> None:
    entries = {e.node: e for e in result.report.entries}
    expected = case.expected()
    assert set(entries) == set(expected), (sorted(entries), case.describe)
    for node, (action, detail, blocking) in expected.items():
        e = entries[node]
        assert e.action.value == action, (node, e.action, e.reason, case.describe)
        assert e.blocking is blocking, (node, e.reason, case.describe)
        if action == "folded":
            assert e.target == detail and e.target_kind == case.kind and e.reason is None, (node, e, case.describe)
        else:
            assert detail in e.reason, (node, e.reason, case.describe)
    ops = [n.op_type for n in result.model.graph.node]
    folded = sum(1 for a, _, _ in expected.values() if a == "folded")
    assert ops.count("BatchNormalization") == sum(1 for a, _, _ in expected.values() if a == "kept")
    assert result.report.counts()["folded"] == folded


def check_case(case: Case) -> None:
    result = bnfold.fold(case.model)
    assert_report_true(case, result)
    assert_equivalent(case, result.model)


@PROFILES["small"]
@given(case=cases())
def test_fold_property(case):
    check_case(case)


@pytest.mark.slow
@LARGE
@given(case=cases())
def test_fold_property_large(case):
    check_case(case)


@settings(max_examples=10, derandomize=True, **_COMMON)
@given(case=cases().filter(lambda c: not c.blockers and c.kind in ("Conv", "ConvTranspose")))
def test_the_comparison_catches_a_wrong_fold(case):
    """A folded bias off by 1e-4 of the output scale S must fail the comparison (its unit,
    eps32·√(fan_in + 2)·S, is a few hundred times smaller): the tolerance is not a loose one."""
    import onnx
    from onnx import numpy_helper

    result = bnfold.fold(case.model)
    assert_equivalent(case, result.model)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    folded_b = next(n for n in broken.graph.node if n.name == "p").input[2]
    bias = next(t for t in broken.graph.initializer if t.name == folded_b)
    b = numpy_helper.to_array(bias).astype(np.float64)
    b[0] += 1e-4 * case.scale["y"][0]
    bias.CopyFrom(numpy_helper.from_array(b.astype(np.float32), bias.name))
    with pytest.raises(AssertionError, match="max error / tolerance"):
        assert_equivalent(case, broken)
