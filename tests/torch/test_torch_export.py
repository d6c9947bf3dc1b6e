"""bnfold.torch.export: one BatchNormalization per BN layer, loadable by onnxruntime 1.31."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from torch import nn  # noqa: E402

import bnfold  # noqa: E402
import bnfold.torch.onnx_export as export_module  # noqa: E402
from bnfold.errors import OutputError, UsageError, ValidationFailed  # noqa: E402
from bnfold.torch import BatchNorm2d, export  # noqa: E402


def _conv2d():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), BatchNorm2d(4)), (2, 3, 8, 8)


def _mlp():
    return nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), (4, 6)


def _grouped_transpose():
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.Tanh()), (2, 4, 5, 5)


def _conv3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU()), (2, 2, 4, 6, 6)


MODELS = {"conv2d": _conv2d, "mlp": _mlp, "grouped-transpose": _grouped_transpose, "conv3d": _conv3d}


def _trained(factory, fresh: bool):
    torch.manual_seed(0)
    model, shape = factory()
    if not fresh:  # distinct statistics per layer (a fresh BN's weight and running_var are equal)
        model.train()
        for _ in range(3):
            model(torch.randn(shape) * 2 + 1)
    return model, torch.randn(shape)


@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "fresh"])
@pytest.mark.parametrize("name", MODELS)
def test_one_batchnorm_node_per_layer(tmp_path, name, fresh):
    model, x = _trained(MODELS[name], fresh)
    model.train()
    model[-1].eval()
    modes = [m.training for m in model.modules()]
    path = tmp_path / f"{name}.onnx"

    result = export(model, x, path)

    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert (result.num_batchnorm_layers, result.num_batchnorm_exported, result.num_batchnorm_nodes) == (layers,) * 3
    assert result.path == path and result.exporter == "torchscript" and result.opset == 17
    assert result.max_abs_error < 1e-5
    assert [m.training for m in model.modules()] == modes  # exported in eval mode, modes restored
    proto = onnx.load(path)
    assert proto.ir_version == 8
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") == layers and "Identity" not in ops
    initializers = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            assert set(node.input[1:]) <= initializers  # scale, B, mean, var are all constants
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_exported_statistics_are_the_running_statistics(tmp_path):
    model, x = _trained(_conv2d, fresh=False)
    export(model, x, tmp_path / "m.onnx", validate=False)
    proto = onnx.load(tmp_path / "m.onnx")
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    bn_nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    for node, layer in zip(bn_nodes, (model[1], model[4])):
        np.testing.assert_array_equal(values[node.input[3]], layer.running_mean.numpy())
        np.testing.assert_array_equal(values[node.input[4]], layer.running_var.numpy())
        assert node.attribute[0].name == "epsilon" and node.attribute[0].f == pytest.approx(layer.eps)


def test_missing_folder_is_refused(tmp_path):
    model, x = _trained(_mlp, fresh=True)
    target = tmp_path / "missing" / "m.onnx"
    with pytest.raises(OutputError, match=rf"^{target}: folder {target.parent} does not exist$"):
        export(model, x, target)


def test_unknown_exporter_is_refused(tmp_path):
    model, x = _trained(_mlp, fresh=True)
    with pytest.raises(UsageError, match=r"^export: exporter='jit'; expected one of torchscript, dynamo$"):
        export(model, x, tmp_path / "m.onnx", exporter="jit")


def test_export_that_disagrees_with_torch_fails_and_writes_nothing(tmp_path, monkeypatch):
    real = export_module._export_proto

    def broken(*args, **kwargs):  # an exporter bug: the first BN's running_mean is off by 0.5
        proto = real(*args, **kwargs)
        bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
        init = next(i for i in proto.graph.initializer if i.name == bn.input[3])
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 0.5, init.name))
        return proto

    monkeypatch.setattr(export_module, "_export_proto", broken)
    model, x = _trained(_conv2d, fresh=False)
    target = tmp_path / "m.onnx"
    with pytest.raises(ValidationFailed, match=rf"^{target}: output 0 of the exported model differs from torch by "):
        export(model, x, target)
    assert list(tmp_path.iterdir()) == []
    export(model, x, target, validate=False)  # unchecked, it is written
    assert target.is_file()


def test_folded_model_that_fails_the_check_is_not_written(tmp_path, monkeypatch):
    class Failed:
        passed = False

    monkeypatch.setattr(bnfold, "check", lambda *a, **k: Failed(), raising=False)
    model, x = _trained(_conv2d, fresh=False)
    target = tmp_path / "m.onnx"
    with pytest.raises(ValidationFailed, match=rf"^{target}: the folded model does not match the exported one; nothing written$"):
        export(model, x, target, fold=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export internals, not ours
def test_dynamo_exporter_keeps_batchnorm(tmp_path):
    model, x = _trained(_conv2d, fresh=False)
    result = export(model, x, tmp_path / "m.onnx", exporter="dynamo", opset=18)
    assert result.num_batchnorm_nodes == 2 and onnx.load(tmp_path / "m.onnx").ir_version <= 10


# What the converter does with each BN: every one follows a Conv/ConvTranspose/Gemm except the
# MLP's input BN, which has no producer and becomes one Mul and one Add.
FOLD_ACTIONS = {
    "conv2d": [("folded", "Conv"), ("folded", "Conv")],
    "mlp": [("rewritten", "Mul+Add"), ("folded", "Gemm")],
    "grouped-transpose": [("folded", "ConvTranspose")],
    "conv3d": [("folded", "Conv")],
}


@pytest.mark.parametrize("name", MODELS)
def test_fold_removes_foldable_batchnorms_and_validates(tmp_path, name):
    model, x = _trained(MODELS[name], fresh=False)
    result = export(model, x, tmp_path / "folded.onnx", fold=True)
    assert result.num_batchnorm_exported == result.num_batchnorm_layers
    assert result.num_batchnorm_nodes == 0
    assert [(e.action.value, e.target_kind) for e in result.fold_report.entries] == FOLD_ACTIONS[name]
    assert result.check_report.passed
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(tmp_path / "folded.onnx").graph.node]


@pytest.mark.parametrize(
    "opset, written, expected",
    [(17, 14, 10), (17, 8, 8), (21, 14, 10), (23, 14, 11)],  # opset 23 needs IR 11
)
def test_ir_version_is_capped_for_onnxruntime(opset, written, expected):
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = written
    export_module._cap_ir_version(proto)
    assert proto.ir_version == expected
