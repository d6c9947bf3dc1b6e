"""Print the largest deviation of bnfold.reference from torch (float64) and onnxruntime (float32).

    python tests/reference/deviation_table.py

One row per backend, operator and output: the max absolute and max relative error (see
``oracles.deviation``) over all cases of ``oracles.TORCH_CASES`` / ``ORT_CASES``, and the bound
the tests assert. The numbers are reproducible: every case draws from the same seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make `tests.reference.oracles` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.reference import oracles  # noqa: E402

def measure() -> list[tuple[str, str, str, float, float, str]]:
    """Rows (backend, operator, output, max abs, max rel, asserted bound)."""
    worst: dict[tuple[str, str, str], list] = {}
    torch_bounds = (oracles.TORCH_RTOL, oracles.TORCH_ATOL)
    runs = [("torch float64", c, oracles.run_torch, c.op, torch_bounds) for c in oracles.TORCH_CASES]
    runs += [
        ("onnxruntime float32", c, oracles.run_ort, oracles.ort_op_label(c), oracles.ort_bounds(c))
        for c in oracles.ORT_CASES
    ]
    for backend, case, run, label, (rtol, atol) in runs:
        for output, ours, theirs in run(case, oracles.case_rng(case)):
            abs_err, rel_err = oracles.deviation(ours, theirs)
            w = worst.setdefault((backend, label, output), [0.0, 0.0, f"rtol {rtol:g}, atol {atol:g}"])
            w[0], w[1] = max(w[0], abs_err), max(w[1], rel_err)
    return [(b, op, out, a, r, bound) for (b, op, out), (a, r, bound) in worst.items()]


def main() -> None:
    rows = measure()
    header = ("backend", "operator", "output", "max abs", "max rel", "asserted bound")
    table = [header] + [(b, op, out, f"{a:.2e}", f"{r:.2e}", bound) for b, op, out, a, r, bound in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
