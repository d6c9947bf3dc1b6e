"""Training-mode BatchNorm for torch: exact population statistics, precise BN, ONNX export.

Only ``import bnfold.torch`` imports torch; ``import bnfold`` never does. Install the extra with
``pip install torch==2.13.0 && pip install bnfold[torch]`` (torch first: an unpinned resolution
pulls the CUDA build).

What is here:

* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` -- drop-in subclasses of
  torch.nn's that, in training mode, normalize bit-identically to torch and also accumulate the
  sufficient statistics of Ioffe & Szegedy's Algorithm 2 in float64 (see
  :mod:`bnfold.torch.moments`). ``layer.apply_population_stats()`` writes them into
  ``running_mean`` / ``running_var``; the moving average keeps running as in torch.
* :func:`convert_batchnorm` -- swaps torch.nn BN layers for these, in place.
* :func:`recalibrate` -- precise BN: re-estimates every BN of any model from data, combining
  statistics across ranks when torch.distributed is initialized.
* :func:`export` -- ONNX export that keeps one BatchNormalization node per BN layer, optionally
  folded with :func:`bnfold.fold` and validated in the same call.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401 - the import is the check
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "bnfold.torch needs torch: pip install torch==2.13.0 && pip install bnfold[torch]"
    ) from exc

from bnfold.torch.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    apply_population_stats,
    reset_population_stats,
)
from bnfold.torch.convert import convert_batchnorm
from bnfold.torch.onnx_export import ExportResult, export
from bnfold.torch.moments import PopulationMoments
from bnfold.torch.recalibration import LayerRecalibration, RecalibrationReport, recalibrate

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ExportResult",
    "LayerRecalibration",
    "PopulationMoments",
    "RecalibrationReport",
    "apply_population_stats",
    "convert_batchnorm",
    "export",
    "recalibrate",
    "reset_population_stats",
]
