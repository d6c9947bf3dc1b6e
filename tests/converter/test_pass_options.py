"""Pattern selection (skip/only), option errors, fold(path) and fold_file (incl. external data)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Action, UsageError, fold, fold_file
from bnfold.errors import ModelLoadError, OutputError
from tests.converter._passutil import bn_node, bn_params, entry, op_types, tensor, vi
from tests.ortutil import make_model, run

C = 4


def two_bn_model(rng, big=False):
    """Conv → BN1 → Relu → BN2: BN1 folds (conv), BN2 is rewritten."""
    n1, p1 = bn_params(rng, C, np.float32, prefix="bn1")
    n2, p2 = bn_params(rng, C, np.float32, prefix="bn2")
    k = 64 if big else 3
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "b1", n1, name="bn1"),
             helper.make_node("Relu", ["b1"], ["r"], name="relu"), bn_node("r", "y", n2, name="bn2")]
    inits = [tensor("W", rng.normal(size=(C, 2, k, 1)).astype(np.float32)), *p1, *p2]
    return make_model(nodes, [vi("x", np.float32, [1, 2, k, 2])], [vi("y", np.float32, [1, C, 1, 2])], inits)


@pytest.fixture
def rng():
    return np.random.default_rng(2)


def test_unknown_pattern_is_a_usage_error_listing_valid_names(rng):
    with pytest.raises(UsageError) as err:
        fold(two_bn_model(rng), skip="conv,gemmm")
    assert str(err.value) == ("skip: unknown pattern 'gemmm'; valid: conv, convtranspose, gemm, matmul, chain, "
                              "forward, rewrite")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="^only: unknown pattern 'bn'"):
        fold(two_bn_model(rng), only=["bn"])


def test_unknown_option_is_a_type_error(rng):
    with pytest.raises(TypeError):
        fold(two_bn_model(rng), validation=True)
    with pytest.raises(TypeError):
        fold_file("x.onnx", colour=True)


@pytest.mark.parametrize(("only", "skip", "bn1", "bn2"), [
    (None, (), Action.FOLDED, Action.REWRITTEN),
    ("conv", (), Action.FOLDED, Action.KEPT),
    ("rewrite", (), Action.REWRITTEN, Action.REWRITTEN),
    (None, "conv,rewrite", Action.KEPT, Action.KEPT),
    (" Conv , REWRITE ", "rewrite", Action.FOLDED, Action.KEPT),
])
def test_only_and_skip_select_patterns(rng, only, skip, bn1, bn2):
    result = fold(two_bn_model(rng), only=only, skip=skip)
    assert (entry(result, "bn1").action, entry(result, "bn2").action) == (bn1, bn2)


def test_report_counts_and_to_dict(rng):
    model = two_bn_model(rng)
    result = fold(model)
    counts = result.report.counts()
    assert counts == {"found": 2, "found:BatchNormalization": 2, "folded": 1, "rewritten": 1, "kept": 0,
                      "folded:Conv": 1}
    d = result.report.to_dict()
    assert d["counts"] == counts and d["nodes_before"] == 4 and d["nodes_after"] == 4
    assert d["bytes_before"] == model.ByteSize() and d["bytes_after"] == result.model.ByteSize()
    assert d["entries"][0] == {"node": "bn1", "op_type": "BatchNormalization", "graph": "", "action": "folded",
                               "target_kind": "Conv", "target": "conv", "reason": None, "producer": "conv",
                               "consumers": ["relu"], "blocking": False, "hint": None}


def test_unnamed_nodes_get_stable_synthetic_names(rng):
    model = two_bn_model(rng)
    for n in model.graph.node:
        n.name = ""
    result = fold(model)
    assert [(e.node, e.target, e.producer) for e in result.report.entries] == [
        ("BatchNormalization_1", "Conv_0", "Conv_0"), ("BatchNormalization_3", None, "Relu_2")]


def test_fold_from_a_path_and_fold_file_defaults(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(two_bn_model(rng), src)
    result = fold(src)
    assert op_types(result.model) == ["Conv", "Relu", "Mul", "Add"]
    written = fold_file(src)
    assert written.output == tmp_path / "m.folded.onnx" and written.output.is_file()
    assert written.report.bytes_before == src.stat().st_size
    assert written.report.bytes_after == written.output.stat().st_size
    x = {"x": rng.normal(size=(1, 2, 3, 2)).astype(np.float32)}
    np.testing.assert_allclose(run(onnx.load(written.output), x)[0], run(onnx.load(src), x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(OutputError, match="is the input model; refusing to overwrite it"):
        fold_file(src, src)
    before = src.read_bytes()
    fold_file(src, in_place=True)
    assert src.read_bytes() != before and op_types(onnx.load(src))[0] == "Conv"


def test_missing_file_is_a_one_line_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"missing\.onnx: no such file"):
        fold(tmp_path / "missing.onnx")


def test_external_data_stays_external(tmp_path, rng):
    src = tmp_path / "ext.onnx"
    model = two_bn_model(rng, big=True)
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=256)
    result = fold_file(src, tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    x = {"x": rng.normal(size=(1, 2, 64, 2)).astype(np.float32)}
    np.testing.assert_allclose(run(onnx.load(tmp_path / "out.onnx"), x)[0], run(onnx.load(src), x)[0],
                               rtol=1e-5, atol=1e-5)
    assert result.report.bytes_after > (tmp_path / "out.onnx").stat().st_size  # the data file counts too


def test_external_data_not_loaded_is_a_reason_not_a_crash(tmp_path, rng):
    src = tmp_path / "ext.onnx"
    onnx.save(two_bn_model(rng, big=True), src, save_as_external_data=True, location="ext.data", size_threshold=256)
    result = fold(onnx.load(src, load_external_data=False))
    assert "weight W of Conv 'conv' is not a constant: 'W' is stored in external data that was not loaded" in \
        entry(result, "bn1").reason
