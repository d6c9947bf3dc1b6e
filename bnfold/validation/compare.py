"""Comparing one output of two models: the metrics, defined exactly.

For one output, the reference values ``a`` and candidate values ``b`` of every sample are
upcast to float64 (float16/bfloat16 first, so the difference itself is not rounded) and
compared element by element. With ``d = |a − b|`` over the elements where both are finite:

* ``max_abs_error`` = max d.
* ``max_rel_error`` = max d / max(|a|, eps·scale), where ``scale = max|a|`` and ``eps`` the
  output dtype's machine epsilon (1e-300 for integers). Elements of the reference smaller
  than one rounding step of the output's largest element are measured against that step:
  their own magnitude is noise, and dividing by it makes the relative error explode for
  nothing (deep networks have many near-zero outputs after ReLUs and residual sums).
* ``error_vs_rms`` = max d / rms(a): the worst error as a fraction of the output's typical
  size; the figure to read when ``max_rel_error`` is dominated by small elements.
* ``failing`` / ``failing_fraction``: elements with ``d > atol + rtol·|a|`` (numpy.isclose),
  plus non-finite mismatches, over all elements of all samples.
* ``needed_atol`` = max(d − rtol·|a|), the smallest atol that passes with the rtol used;
  ``needed_rtol`` = max((d − atol)/|a|), the smallest rtol that passes with the atol used
  (Polygraphy's "required tolerance"; inf when an element with a == 0 needs it).
* Non-finite values: NaN in both at the same place is equal, as is the same infinity in
  both; any other NaN or ±inf mismatch always fails, whatever the tolerance, and is
  counted in ``nonfinite_mismatches`` and ``failing``.
* A shape or dtype difference fails the output with a message; no figure is computed.
* ``worst`` locates the element with the largest ``d − (atol + rtol·|a|)`` (a non-finite
  mismatch first): sample number, index, both values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.validation.tolerances import UNKNOWN_REDUCTION, Tolerance, dtype_eps, resolve_tolerance


@dataclass(frozen=True)
class WorstElement:
    """Where an output differs most: ``sample`` (0-based), ``index`` into the output array."""

    sample: int
    index: tuple[int, ...]
    reference: float
    candidate: float


@dataclass(frozen=True)
class OutputComparison:
    """The figures for one output of one provider (see the module docstring)."""

    output: str
    dtype: str
    shape: tuple[int, ...]
    elements: int
    passed: bool
    tolerance: Tolerance
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    error_vs_rms: float = 0.0
    reference_max_abs: float = 0.0
    reference_rms: float = 0.0
    failing: int = 0
    failing_fraction: float = 0.0
    nonfinite_mismatches: int = 0
    needed_rtol: float = 0.0
    needed_atol: float = 0.0
    worst: WorstElement | None = None
    message: str | None = None

    def to_dict(self) -> dict:
        return {
            "output": self.output, "dtype": self.dtype, "shape": list(self.shape),
            "elements": self.elements, "passed": self.passed,
            "rtol": self.tolerance.rtol, "atol": self.tolerance.atol,
            "tolerance_source": self.tolerance.source,
            "tolerance_eps_multiple": self.tolerance.eps_multiple,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "error_vs_rms": self.error_vs_rms, "reference_max_abs": self.reference_max_abs,
            "reference_rms": self.reference_rms, "failing": self.failing,
            "failing_fraction": self.failing_fraction,
            "nonfinite_mismatches": self.nonfinite_mismatches,
            "needed_rtol": self.needed_rtol, "needed_atol": self.needed_atol,
            "worst": None if self.worst is None else {
                "sample": self.worst.sample, "index": list(self.worst.index),
                "reference": self.worst.reference, "candidate": self.worst.candidate,
            },
            "message": self.message,
        }


def _dtype_name(dtype: np.dtype) -> str:
    return str(np.dtype(dtype))


def compare_output(name: str, reference: list[np.ndarray], candidate: list[np.ndarray], *,
                   rtol: float | None = None, atol: float | None = None,
                   reduction: int = UNKNOWN_REDUCTION) -> OutputComparison:
    """Compare one output over all samples (lists of arrays, one per sample).

    Args:
        name: the output's name, for the report.
        reference: the reference model's values of this output, one array per sample.
        candidate: the candidate model's values, same order.
        rtol: relative tolerance; None for the dtype's default.
        atol: absolute tolerance in the output's units; None for the dtype's default.
        reduction: the model's longest dot product, K in the default tolerance
            (:func:`~bnfold.validation.tolerances.max_reduction_length`).
    """
    if not reference or len(reference) != len(candidate):
        raise ValueError("compare_output needs the same number (≥ 1) of reference and candidate samples")
    ref0 = reference[0]
    dtype = ref0.dtype
    for i, (a, b) in enumerate(zip(reference, candidate)):
        problem = None
        if a.dtype != b.dtype:
            problem = f"dtype differs: reference {_dtype_name(a.dtype)}, candidate {_dtype_name(b.dtype)}"
        elif a.shape != b.shape:
            problem = f"shape differs: reference {list(a.shape)}, candidate {list(b.shape)}"
        if problem:
            where = f" (sample {i})" if len(reference) > 1 else ""
            return OutputComparison(
                output=name, dtype=_dtype_name(dtype), shape=tuple(ref0.shape),
                elements=int(ref0.size), passed=False,
                tolerance=resolve_tolerance(dtype, 1.0, reduction=reduction, rtol=rtol, atol=atol),
                message=f"output {name!r}: {problem}{where}",
            )

    a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in reference])
    b = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in candidate])
    finite = np.isfinite(a) & np.isfinite(b)
    # Equal non-finite pairs: NaN with NaN, or the same infinity. Anything else non-finite fails.
    same_nonfinite = ~finite & ((np.isnan(a) & np.isnan(b)) | (a == b))
    nonfinite_bad = ~finite & ~same_nonfinite

    af, bf = a[finite], b[finite]
    scale = float(np.abs(af).max()) if af.size else 0.0
    rms = float(np.sqrt(np.mean(af * af))) if af.size else 0.0
    tol = resolve_tolerance(dtype, scale, reduction=reduction, rtol=rtol, atol=atol)
    eps = dtype_eps(dtype) or 0.0

    d = np.abs(af - bf)
    absa = np.abs(af)
    allowed = tol.atol + tol.rtol * absa
    over = d > allowed
    if tol.source == "exact" and not np.issubdtype(dtype, np.floating):
        # Integers beyond 2**53 collide in float64: compare exact outputs in their own dtype.
        ai = np.concatenate([x.ravel() for x in reference])
        bi = np.concatenate([x.ravel() for x in candidate])
        over = ai != bi
    failing = int(over.sum()) + int(nonfinite_bad.sum())

    if d.size:
        max_abs = float(d.max())
        floor = max(eps * scale, 1e-300)
        max_rel = float((d / np.maximum(absa, floor)).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            need_r = np.where(d > tol.atol, (d - tol.atol) / absa, 0.0)
        needed_rtol = float(need_r.max())
        needed_atol = float(np.maximum(d - tol.rtol * absa, 0.0).max())
    else:
        max_abs = max_rel = needed_rtol = needed_atol = 0.0
    if nonfinite_bad.any():
        needed_rtol = needed_atol = float("inf")

    worst = None
    if nonfinite_bad.any() or d.size:
        if nonfinite_bad.any():
            flat = int(np.flatnonzero(nonfinite_bad)[0])
        else:
            flat = int(np.flatnonzero(finite)[int(np.argmax(d - allowed))])
        worst = _locate(flat, reference, a[flat], b[flat])

    return OutputComparison(
        output=name, dtype=_dtype_name(dtype), shape=tuple(ref0.shape),
        elements=int(a.size), passed=failing == 0, tolerance=tol,
        max_abs_error=max_abs, max_rel_error=max_rel,
        error_vs_rms=(max_abs / rms) if rms > 0 else (0.0 if max_abs == 0 else float("inf")),
        reference_max_abs=scale, reference_rms=rms, failing=failing,
        failing_fraction=failing / a.size if a.size else 0.0,
        nonfinite_mismatches=int(nonfinite_bad.sum()),
        needed_rtol=needed_rtol, needed_atol=needed_atol, worst=worst,
    )


def _locate(flat: int, reference: list[np.ndarray], a: float, b: float) -> WorstElement:
    for sample, x in enumerate(reference):
        if flat < x.size:
            index = tuple(int(i) for i in np.unravel_index(flat, x.shape)) if x.shape else ()
            return WorstElement(sample=sample, index=index, reference=float(a), candidate=float(b))
        flat -= x.size
    raise AssertionError("element index past the end of the samples")
