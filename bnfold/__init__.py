"""bnfold: fold BatchNormalization into neighbouring linear layers of ONNX models, exactly.

The public API, re-exported here; everything else is internal. The heavier parts (the
converter, onnxruntime validation) are imported on first use, so ``import bnfold`` stays cheap
and ``import bnfold.reference`` never loads onnxruntime.
"""

from __future__ import annotations

import importlib

from bnfold._version import __version__
from bnfold.errors import (
    BnfoldError,
    InputDataError,
    ModelLoadError,
    OutputError,
    ProviderError,
    UnsupportedModelError,
    UsageError,
    ValidationFailed,
)

# public name -> module that defines it
_LAZY = {
    "fold": "bnfold.api",
    "fold_file": "bnfold.api",
    "Action": "bnfold.report",
    "FoldReport": "bnfold.report",
    "FoldResult": "bnfold.report",
    "NodeReport": "bnfold.report",
    "check": "bnfold.validation",
    "CheckReport": "bnfold.validation",
    "calibrate": "bnfold.calibration",
    "CalibrationResult": "bnfold.calibration",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "__version__",
    "BnfoldError",
    "InputDataError",
    "ModelLoadError",
    "OutputError",
    "ProviderError",
    "UnsupportedModelError",
    "UsageError",
    "ValidationFailed",
    *_LAZY,
]
