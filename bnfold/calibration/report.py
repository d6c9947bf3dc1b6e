"""What a calibration did to every BN: data for the CLI table, ``--json`` and tests.

Per BN: batches and values per channel (count = Σm) its statistics rest on, and how far they
moved: ``mean_change`` = max over channels of |E_new − E_old| (in the activation's units),
``var_change`` = max |Var_new / Var_old − 1| (relative; inf when a stored variance was 0),
both measured on the values as stored in the model (after rounding to its dtype) — the same
definitions as :class:`bnfold.torch.LayerRecalibration`. A skipped BN carries its reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx


@dataclass(frozen=True)
class BatchNormCalibration:
    name: str
    graph: str
    num_batches: int
    count: int
    mean_change: float
    var_change: float
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("mean_change", "var_change"):  # JSON has no inf/NaN
            if not math.isfinite(d[key]):
                d[key] = str(d[key])
        return d


@dataclass
class CalibrationReport:
    """``num_batches``: batches run in this call; ``merged``: statistics files merged in."""

    source: str
    num_batches: int
    layers: list[BatchNormCalibration] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def calibrated(self) -> list[BatchNormCalibration]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[BatchNormCalibration]:
        return [layer for layer in self.layers if layer.skipped is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_batches": self.num_batches,
            "merged": list(self.merged),
            "fingerprint": self.fingerprint,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def format(self) -> str:
        """A table of how far each BN's statistics moved."""
        rows = [(layer.name, str(layer.num_batches), str(layer.count),
                 f"{layer.mean_change:.3g}", f"{layer.var_change:.3g}") for layer in self.calibrated]
        head = ("BatchNormalization", "batches", "count", "max|ΔE|", "max|ΔVar|/Var")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        merged = f", {len(self.merged)} statistics files merged" if self.merged else ""
        out = [f"{self.source}: {len(self.calibrated)} BatchNormalization nodes calibrated from "
               f"{self.num_batches} batches{merged}", line(head)]
        out += [line(r) for r in rows]
        out += [f"skipped {layer.name} (in {layer.graph}): {layer.skipped}" for layer in self.skipped]
        return "\n".join(out)


@dataclass
class CalibrationResult:
    """``model``: the re-statisticked model (folded when ``fold=True``); ``calibrated``: the
    unfolded re-statisticked model; ``stats``: the sufficient statistics
    (:class:`~bnfold.calibration.stats.CalibrationStats`, ``.save(path)``); ``fold``: the
    :class:`~bnfold.report.FoldResult` when folded (its ``check`` when validated)."""

    model: onnx.ModelProto
    calibrated: onnx.ModelProto
    report: CalibrationReport
    stats: Any
    fold: Any = None

    @property
    def check(self):
        return None if self.fold is None else self.fold.check
