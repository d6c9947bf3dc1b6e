"""Helpers for users' test suites: assert that a folded model is the original function.

    from bnfold.testing import assert_equivalent

    def test_folded_model_is_equivalent():
        assert_equivalent("model.onnx", "model.folded.onnx", providers=("cpu",), samples=4)
"""

from __future__ import annotations

from bnfold.validation import CheckReport, check


def assert_equivalent(reference, candidate, **options) -> CheckReport:
    """Run :func:`bnfold.check` and raise AssertionError (message: the readable report) if the
    candidate is not equivalent; return the report otherwise.

    Args:
        reference: the original model (ModelProto or path).
        candidate: the model to check (ModelProto or path).
        **options: the keyword arguments of :func:`bnfold.check` (inputs, providers, rtol,
            atol, samples, seed, dims, allow_missing_providers, ort_opt_level).
    """
    report = check(reference, candidate, **options)
    if not report.passed:
        raise AssertionError("models are not equivalent\n" + report.format())
    return report


__all__ = ["assert_equivalent"]
