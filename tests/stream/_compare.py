"""The streamed ``fold_file`` against the in-memory ``fold``: same report, same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import _get_all_tensors

import bnfold
from bnfold.stream.source import PLACEHOLDER_KEY


def report_without_sizes(report) -> dict:
    d = report.to_dict()
    d.pop("bytes_before")
    d.pop("bytes_after")
    return d


def save(model: onnx.ModelProto, path: Path, *, external: bool = False, threshold: int = 1024) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=threshold)
    else:
        onnx.save_model(model, path)
    return path


def tensor_bytes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in _get_all_tensors(model)}


def without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every tensor payload and external-data reference cleared."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in _get_all_tensors(out):
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "external_data"):
            out_field = getattr(t, field)
            if field == "raw_data":
                t.ClearField("raw_data")
            else:
                del out_field[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return out


def assert_streamed_equals_fold(src: Path, dst: Path, **options) -> bnfold.FoldResult:
    """fold_file(src, dst) (streamed) writes exactly what fold(src) computes."""
    reference = bnfold.fold(src, **options)
    result = bnfold.fold_file(src, dst, **options)
    assert report_without_sizes(result.report) == report_without_sizes(reference.report)
    assert result.report.bytes_before == src.stat().st_size + sum(
        p.stat().st_size for p in src.parent.glob(f"{src.name}.data"))
    written = onnx.load(dst, load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(written))
    for t in _get_all_tensors(written):
        assert all(e.key != PLACEHOLDER_KEY for e in t.external_data), "a placeholder reached the output"
    if not external:
        # one file: byte for byte what the in-memory path serializes
        assert dst.read_bytes() == reference.model.SerializeToString()
        assert result.report.bytes_after == dst.stat().st_size
    else:
        loaded = onnx.load(dst)
        assert without_data(loaded) == without_data(reference.model)
        assert tensor_bytes(loaded) == tensor_bytes(reference.model)
        data = [p for p in dst.parent.iterdir() if p.name.startswith(dst.name) and p.name.endswith(".data")]
        assert result.report.bytes_after == dst.stat().st_size + sum(p.stat().st_size for p in data)
    # result.model points at the written files
    resolved = onnx.ModelProto()
    resolved.CopyFrom(result.model)
    onnx.external_data_helper.load_external_data_for_model(resolved, str(dst.parent))
    assert tensor_bytes(resolved) == tensor_bytes(reference.model)
    return result


def max_abs(a, b) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))
