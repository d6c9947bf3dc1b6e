"""A BN the INPUT makes unfoldable is data: ``fold()`` keeps it with its reason and marks the
entry ``blocking``; ``fold_file``/``bnfold fold`` refuse such a model (exit 2, nothing
written) unless ``partial=True``/``--partial``, which writes it with those BNs kept. BNs kept on
request (``--keep-unfoldable``) or rewritten as Mul+Add are never blocking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold.errors import UnsupportedModelError
from bnfold.report import Action
from tests.ortutil import run
from tests.reliability._models import C_OUT, conv_bn_model, feeds, invoke, set_initializer, snapshot, write


def _training(model):
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    return model


def _nan_var(model):
    values = np.ones(C_OUT)
    values[2] = np.nan
    return set_initializer(model, "bn.var", values)


@pytest.mark.parametrize("breaker, reason", [(_training, "training_mode=1"), (_nan_var, "parameter var is not finite")])
def test_fold_keeps_blocking_bn_with_reason(breaker, reason):
    model = breaker(conv_bn_model())
    result = bnfold.fold(model)
    [entry] = result.report.entries
    assert entry.action is Action.KEPT and entry.blocking and entry.reason.startswith(reason)
    assert result.report.blocking() == [entry]
    assert entry.to_dict()["blocking"] is True
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization"]
    # kept means untouched: the weights are the original ones
    assert result.model.graph.initializer[0] == model.graph.initializer[0]


def test_folded_and_rewritten_and_kept_on_request_are_not_blocking(rng):
    from tests.converter.builders import relu_bn

    model, _ = relu_bn(rng=rng)
    assert [e.action for e in bnfold.fold(model).report.entries] == [Action.REWRITTEN]
    assert bnfold.fold(model).report.blocking() == []
    kept = bnfold.fold(model, keep_unfoldable=True).report
    assert [e.action for e in kept.entries] == [Action.KEPT] and kept.blocking() == []
    assert bnfold.fold(conv_bn_model()).report.blocking() == []


def test_fold_file_refuses_then_partial_writes(tmp_path):
    src = write(tmp_path / "m.onnx", _training(conv_bn_model()))
    dst = tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    with pytest.raises(UnsupportedModelError, match="BatchNormalization 'bn' cannot be folded: training_mode=1"):
        bnfold.fold_file(src, dst)
    assert snapshot(tmp_path) == before
    result = bnfold.fold_file(src, dst, partial=True)
    assert result.output == dst and [e.node for e in result.report.blocking()] == ["bn"]
    written = onnx.load(str(dst))
    assert [n.op_type for n in written.graph.node] == ["Conv", "BatchNormalization"]


def test_cli_partial_exit_0_and_model_runs(tmp_path):
    model = set_initializer(conv_bn_model(), "bn.var", np.full(C_OUT, 2.0))
    model.graph.input.append(helper.make_tensor_value_info("bn.mean", onnx.TensorProto.FLOAT, [C_OUT]))
    src = write(tmp_path / "m.onnx", model)
    refused = invoke("fold", src)
    assert refused.exit_code == 2 and not (tmp_path / "m.folded.onnx").exists()
    result = invoke("fold", src, "--partial")
    assert result.exit_code == 0, result.stderr
    assert "kept bn (BatchNormalization): parameter mean is not a constant" in result.output
    out = onnx.load(str(tmp_path / "m.folded.onnx"))
    x = feeds()
    np.testing.assert_array_equal(run(out, x)[0], run(model, x)[0])


def test_cli_json_marks_blocking_entries(tmp_path):
    import json

    src = write(tmp_path / "m.onnx", _training(conv_bn_model()))
    result = invoke("fold", src, "--partial", "--json", "--no-validate")
    assert result.exit_code == 0, result.stderr
    [entry] = json.loads(result.output)["entries"]
    assert entry["blocking"] is True and entry["action"] == "kept"
