"""The same model and batches through ``bnfold.torch.recalibrate`` and through ``bnfold
calibrate`` on its unfolded ONNX export give the same statistics, and both match the reference
runtime's PopulationStats of the layer inputs (float64 torch forward with BN in training mode)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.reference import PopulationStats  # noqa: E402
from bnfold.torch import export, recalibrate  # noqa: E402
from tests.calibration._models import constant  # noqa: E402

# float32 activations computed by two runtimes (torch, onnxruntime): error budget of the
# statistics (mean error in units of the std, variance error relative). Measured: torch vs
# ONNX 2.3e-7, each vs the float64 reference 2.0e-7 (a few float32 ULP); 20× margin.
RTOL = 5e-6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        )
        self.head = nn.Sequential(nn.Linear(8 * 3 * 3, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-3, 3)  # stale statistics, far from the data's
                m.running_var.uniform_(0.1, 5.0)
    return net.eval()


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4 + i % 3, 3, 8, 8, generator=g) * 2 + 0.5 for i in range(n)]


def _reference(net: Net, batches) -> dict[str, PopulationStats]:
    """PopulationStats.update on each BN's input, float64 forward, BN in training mode."""
    ref = copy.deepcopy(net).double().eval()
    stats, hooks = {}, []
    for name, m in ref.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            stats[name] = PopulationStats(m.num_features)
            hooks.append(m.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.update(args[0].numpy())))
    with torch.no_grad():
        for b in batches:
            ref(b.double())
    for h in hooks:
        h.remove()
    return stats


def statistics_errors(tmp_path) -> dict[str, float]:
    """Max relative errors of the running statistics: torch vs ONNX, and each vs the reference."""
    net, batches = _net(), _batches()
    path = tmp_path / "net.onnx"
    export(net, batches[0], path, input_names=["input"], output_names=["output"],
           dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    result = bnfold.calibrate(path, [{"input": b.numpy()} for b in batches])
    recalibrated = copy.deepcopy(net)
    recalibrate(recalibrated, batches, progress=False)
    reference = _reference(net, batches)
    errors = {"torch_vs_onnx": 0.0, "torch_vs_reference": 0.0, "onnx_vs_reference": 0.0}
    bn_nodes = {n.input[3]: n for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    assert len(bn_nodes) == len(reference) == 3
    for name, ref in reference.items():
        layer = recalibrated.get_submodule(name)
        node = bn_nodes.get(f"{name}.running_mean")
        assert node is not None, f"no BN reads {name}.running_mean (exporter naming changed?)"
        onnx_mean, onnx_var = constant(result.model, node.input[3]), constant(result.model, node.input[4])
        torch_mean, torch_var = layer.running_mean.numpy(), layer.running_var.numpy()
        scale = {"mean": np.sqrt(ref.var), "var": ref.var}  # a mean error is measured in std units
        for key, (a, b) in {"torch_vs_onnx": ((torch_mean, torch_var), (onnx_mean, onnx_var)),
                            "torch_vs_reference": ((torch_mean, torch_var), (ref.mean, ref.var)),
                            "onnx_vs_reference": ((onnx_mean, onnx_var), (ref.mean, ref.var))}.items():
            err = max(np.max(np.abs(a[0] - b[0]) / scale["mean"]), np.max(np.abs(a[1] - b[1]) / scale["var"]))
            errors[key] = max(errors[key], float(err))
    return errors


def test_torch_recalibrate_and_onnx_calibrate_agree_with_each_other_and_the_reference(tmp_path):
    errors = statistics_errors(tmp_path)
    print(errors)
    for key, err in errors.items():
        assert err <= RTOL, (key, err)


def test_recalibrated_onnx_model_matches_recalibrated_torch_model_outputs(tmp_path):
    net, batches = _net(), _batches()
    path = tmp_path / "net.onnx"
    export(net, batches[0], path, input_names=["input"], output_names=["output"],
           dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    result = bnfold.calibrate(path, [{"input": b.numpy()} for b in batches], fold=True)
    assert result.check.passed
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    recalibrate(net, batches, progress=False)
    x = batches[0]
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    from tests.ortutil import run

    got = run(result.model, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
