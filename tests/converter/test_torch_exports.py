"""Models exported from torch with BatchNormalization preserved fold exactly.

Export: the TorchScript exporter, ``torch.onnx.export(m.eval(), x, f, dynamo=False,
do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, opset_version=...)``:
in torch 2.13 it still exists (deprecated) and keeps every BN as a BatchNormalization node
(asserted below), reading running_mean / running_var through Identity nodes — constant
expressions the converter has to see through. It writes IR 8 at these opsets; anything
above 10 is lowered so onnxruntime 1.31 loads it.

Every BN gets non-trivial affine parameters and running statistics (torch's defaults, γ=1,
β=0, E=0, Var=1, would make a fold that ignores them pass). The folded model is compared
with the torch module (float32, 1e-5 × max|output| plus the float32 error torch and
onnxruntime already disagree by) and with the unfolded ONNX model in onnxruntime
(ORT_DISABLE_ALL, 1e-5 × max|output|, test_matrix's float32 tolerance).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnfold.report import Action  # noqa: E402
from tests.converter.test_matrix import count, entry, fold  # noqa: E402
from tests.ortutil import run  # noqa: E402

TOL = 1e-5


class Residual(nn.Module):
    """conv-bn-relu-conv-bn + identity shortcut, then ReLU (a ResNet basic block)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


# name → (module factory, input shape, expected target kinds of the BNs in order)
MODULES = {
    "conv2d_bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)),
                    (2, 3, 9, 9), ["Conv"]),
    "conv1d_bn1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, dilation=2, bias=False), nn.BatchNorm1d(5)),
                    (2, 3, 11), ["Conv"]),
    "conv3d_bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4)),
                    (1, 2, 5, 5, 5), ["Conv"]),
    "depthwise": (lambda: nn.Sequential(nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6)),
                  (2, 6, 7, 7), ["Conv"]),
    "grouped_convtranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2,
                                                                         output_padding=1), nn.BatchNorm2d(6)),
                                (2, 4, 5, 5), ["ConvTranspose"]),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)), (4, 7), [("Gemm", "MatMul")]),
    "residual_block": (Residual, (2, 4, 6, 6), ["Conv", "Conv"]),
}


def randomize_bn(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.25, -1.0, 1.0)
                m.weight.copy_((torch.rand(c, generator=g) * 1.5 + 0.5) * sign)
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.8 + 0.2)
                m.eps = 1e-3
    return module.eval()


def export(module: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, opset_version=opset)
    model = onnx.load_from_string(f.getvalue())
    if model.ir_version > 10:
        model.ir_version = 10
    return model


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", list(MODULES))
def test_torch_export_folds(name, opset):
    factory, shape, kinds = MODULES[name]
    torch.manual_seed(0)
    module = randomize_bn(factory(), seed=1)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    model = export(module, x, opset)
    assert count(model, "BatchNormalization") == len(kinds), "the exporter did not keep the BN nodes"
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    bns = [e for e in result.report.entries if e.op_type == "BatchNormalization"]
    assert len(bns) == len(kinds)
    for e, kind in zip(bns, kinds):
        assert e.action is Action.FOLDED, e
        assert e.target_kind in (kind if isinstance(kind, tuple) else (kind,)), e
    feeds = {model.graph.input[0].name: x.numpy()}
    with torch.no_grad():
        expected = module(x).double().numpy()
    unfolded, folded = run(model, feeds)[0], run(result.model, feeds)[0]
    scale = float(np.abs(expected).max())
    err_onnx = float(np.abs(folded.astype(np.float64) - unfolded).max())
    err_torch = float(np.abs(folded.astype(np.float64) - expected).max())
    err_torch_unfolded = float(np.abs(unfolded.astype(np.float64) - expected).max())
    assert err_onnx <= TOL * scale, f"folded vs unfolded ONNX: {err_onnx:.3g} > {TOL} × {scale:.3g}"
    assert err_torch <= TOL * scale + err_torch_unfolded, f"folded vs torch: {err_torch:.3g}"


def test_exporter_keeps_bn_and_identity_stats():
    """What the converter faces from this exporter: BN reading stats through Identity nodes."""
    factory, shape, _ = MODULES["conv2d_bn2d"]
    model = export(randomize_bn(factory(), 1), torch.randn(*shape), 17)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 1 and "Conv" in ops
    result = fold(model)
    e = entry(result.report, next(n.name for n in model.graph.node if n.op_type == "BatchNormalization"))
    assert (e.action, e.target_kind) == (Action.FOLDED, "Conv")
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], "dead Identity nodes should be gone"
