"""The errors bnfold raises on bad input.

Every error carries a one-line message that names the file (or argument) and the problem,
and the exit status the CLI uses for it. Library code raises these and never prints or exits;
the CLI turns them into one line on stderr.
"""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of every error bnfold reports to a user."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a multi-line message would look like a traceback in a CI log.
        super().__init__(" ".join(str(message).split()))


class ModelLoadError(BnfoldError):
    """The model file cannot be read: missing, not a model, truncated, unsafe external data."""


class UnsupportedModelError(BnfoldError):
    """The model loads but bnfold cannot work on it (no BatchNormalization opset, bad shapes...)."""


class InputDataError(BnfoldError):
    """User-given input data (.npz, .pb) does not match the model."""


class ProviderError(BnfoldError):
    """A requested onnxruntime execution provider is not available."""


class OutputError(BnfoldError):
    """The destination cannot be written (missing or read-only folder, would clobber the input)."""


class ValidationFailed(BnfoldError):
    """The folded model does not compute the same function as the original.

    ``result`` carries the :class:`~bnfold.report.FoldResult` (with its check report) when the
    error comes from a fold, so a caller can still show what was measured.
    """

    exit_code = 1

    def __init__(self, message: str, *, result=None):
        super().__init__(message)
        self.result = result


class UsageError(BnfoldError):
    """An option or argument value is not one bnfold accepts (e.g. an unknown pattern name)."""
