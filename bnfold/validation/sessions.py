"""onnxruntime sessions for a check: graph-optimization level, providers, bfloat16 I/O.

onnxruntime's Python API takes bfloat16 inputs only as OrtValues and cannot return bfloat16
arrays, so bfloat16 inputs are fed as OrtValues built from their bits, and each bfloat16
output is read through an appended ``Cast`` to float32 (exact: every bfloat16 is a float32)
and turned back into bfloat16 — the same for both models, so it changes nothing compared.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from bnfold.errors import UsageError
from bnfold.validation.providers import Provider

OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_BF16 = np.dtype(ml_dtypes.bfloat16)
_CAST_SUFFIX = "__bnfold_bf16_as_float32"


def opt_level(name: str) -> ort.GraphOptimizationLevel:
    try:
        return OPT_LEVELS[str(name).lower()]
    except KeyError:
        raise UsageError(f"--ort-opt-level: unknown level {name!r}; use one of "
                         f"{', '.join(OPT_LEVELS)}") from None


@dataclass(frozen=True)
class ModelSource:
    """What a session is created from: a model in memory (serialized for onnxruntime), or a
    file that onnxruntime reads itself (and maps its external data), so that a check of a
    model on disk never holds its weights in Python."""

    label: str
    graph: onnx.ModelProto          # at least the graph (from a path: its skeleton, no payloads)
    path: str | None = None         # load from this path (onnxruntime reads its external data)

    def session_input(self) -> bytes | str:
        if self.path is not None and not _bf16_outputs(self.graph):
            return self.path
        model = self.graph
        if self.path is not None:  # bfloat16 outputs need a graph edit: load the data too
            model = onnx.load(self.path)
        return _cast_bf16_outputs(model).SerializeToString()


def _bf16_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type == TensorProto.BFLOAT16]


def _cast_bf16_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    names = _bf16_outputs(model)
    if not names:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.graph.output:
        if o.name in names:
            out.graph.node.append(helper.make_node("Cast", [o.name], [o.name + _CAST_SUFFIX],
                                                   to=TensorProto.FLOAT))
            o.name += _CAST_SUFFIX
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


class Runner:
    """One model on one provider: ``run(feed) -> {output name: array}``."""

    def __init__(self, source: ModelSource, provider: Provider, level: str):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = opt_level(level)
        opts.log_severity_level = 3
        chain = provider.session_providers()
        with warnings.catch_warnings():
            # "Specified provider ... is not in available provider names": the caller checks
            # session.get_providers() and reports a fallback itself.
            warnings.simplefilter("ignore", UserWarning)
            self.session = ort.InferenceSession(
                source.session_input(), opts,
                providers=[ep for ep, _ in chain], provider_options=[o for _, o in chain],
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.seconds = 0.0

    def providers(self) -> tuple[str, ...]:
        return tuple(self.session.get_providers())

    def close(self) -> None:
        """Release the session and the weights it holds (or maps); the runner is done."""
        self.session = None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ort_feed = {
            name: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(a).view(np.uint16), TensorProto.BFLOAT16)
                if a.dtype == _BF16 else a)
            for name, a in feed.items()
        }
        start = time.perf_counter()
        values = self.session.run(self.output_names, ort_feed)
        self.seconds += time.perf_counter() - start
        out = {}
        for name, value in zip(self.output_names, values):
            if name.endswith(_CAST_SUFFIX):
                out[name[: -len(_CAST_SUFFIX)]] = np.asarray(value).astype(_BF16)
            else:
                out[name] = np.asarray(value)
        return out


def ort_message(exc: BaseException, limit: int = 300) -> str:
    """onnxruntime's error text on one line, shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["ModelSource", "Runner", "OPT_LEVELS", "opt_level", "ort_message"]
