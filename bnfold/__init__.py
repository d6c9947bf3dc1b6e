"""bnfold: fold BatchNormalization into neighbouring linear layers of ONNX models, exactly.

The public API, re-exported here; everything else is internal.
"""

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
]
