"""Numerical validation: prove two ONNX models compute the same function with onnxruntime.

``check(reference, candidate, ...) -> CheckReport``; see :mod:`.check` for the steps,
:mod:`.compare` for the exact metric definitions, :mod:`.tolerances` for the defaults and
:mod:`.inputs` for the input data.
"""

from bnfold.validation.check import check
from bnfold.validation.compare import OutputComparison, WorstElement, compare_output
from bnfold.validation.providers import ALIASES, COMPARABLE_OPTIONS, Provider, SkippedProvider
from bnfold.validation.render import format_report, to_json, to_junit_xml, write_json, write_junit
from bnfold.validation.report import CheckReport, Comparison
from bnfold.validation.tolerances import EPS_MULTIPLIER, Tolerance, resolve_tolerance

__all__ = [
    "check", "CheckReport", "Comparison", "OutputComparison", "WorstElement", "compare_output",
    "Provider", "SkippedProvider", "ALIASES", "COMPARABLE_OPTIONS", "Tolerance", "EPS_MULTIPLIER",
    "resolve_tolerance", "format_report", "to_json", "to_junit_xml", "write_json", "write_junit",
]
