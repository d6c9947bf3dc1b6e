"""The model zoo: architectures, the build command, its cache."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # models/ is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))

from torch import nn  # noqa: E402

import models  # noqa: E402
from models import build  # noqa: E402

# name → (BN layers, output shape for the example input)
EXPECTED = {
    "resnet": (12, (2, 10)),
    "mobilenet": (11, (2, 10)),
    "mlp": (3, (8, 10)),
    "decoder": (3, (2, 3, 16, 16)),
    "conv3d": (2, (2, 4)),
    "preact": (5, (2, 10)),
}


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", models.NAMES)
def test_definitions(name):
    assert set(EXPECTED) == set(models.NAMES)
    model = models.build_model(name).eval()
    out = model(torch.randn(models.input_shape(name)))
    layers, shape = EXPECTED[name]
    assert len(_batchnorms(model)) == layers
    assert tuple(out.shape) == shape


def test_decoder_has_grouped_transposed_convolutions_before_batchnorm():
    seq = models.build_model("decoder")
    pairs = [(a, b) for a, b in zip(seq, seq[1:]) if isinstance(a, nn.ConvTranspose2d)]
    assert [(a.groups, type(b)) for a, b in pairs] == [(4, nn.BatchNorm2d), (2, nn.BatchNorm2d)]


def test_mobilenet_has_depthwise_convolutions():
    convs = [m for m in models.build_model("mobilenet").modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels == c.out_channels and c.groups > 1]
    assert len(depthwise) == 3


def test_preact_has_batchnorm_before_convs_with_and_without_padding():
    block = models.build_model("preact").blocks[0]
    assert (block.conv1.kernel_size, block.conv1.padding) == ((1, 1), (0, 0))  # forward fold: exact
    assert (block.conv2.kernel_size, block.conv2.padding) == ((3, 3), (1, 1))  # forward fold: refused


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    return out, build.ensure_built(out=out)


def test_build_writes_every_model(zoo):
    out, built = zoo
    assert [b.name for b in built] == list(models.NAMES) and all(b.built for b in built)
    digest = build.definition_hash()
    for b in built:
        meta = json.loads(b.json_path.read_text())
        layers, shape = EXPECTED[b.name]
        assert meta["num_batchnorm"] == b.num_batchnorm == layers
        assert meta["definition_hash"] == digest and meta["input_shape"] == list(models.input_shape(b.name))
        assert meta["max_abs_error_vs_torch"] < 1e-4
        proto = onnx.load(b.onnx_path)
        assert proto.ir_version == 8
        assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == layers
        # Runs in onnxruntime (optimizations off) with another batch size (dynamic batch axis).
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(b.onnx_path), options, providers=["CPUExecutionProvider"])
        x = np.load(b.inputs_path)["input"]
        x3 = np.concatenate([x, x[:1]])
        (y,) = session.run(None, {"input": x3})
        assert y.shape == (len(x) + 1,) + shape[1:] and np.all(np.isfinite(y))


def test_build_recalibrated_the_statistics(zoo):
    """The exported running statistics are Algorithm 2 over the calibration batches, not the
    moving average of training: rebuild the mlp's first BN input statistics independently."""
    out, _ = zoo
    values = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out / "mlp.onnx").graph.initializer}
    first_bn = next(n for n in onnx.load(out / "mlp.onnx").graph.node if n.op_type == "BatchNormalization")
    torch.manual_seed(build.SEED)
    g = torch.Generator().manual_seed(build.SEED)
    shape = (16,) + models.input_shape("mlp")[1:]
    build._synthetic_batch(shape, g)  # the output-size probe
    torch.randn(32, 10, generator=g)  # the teacher
    for _ in range(build.TRAIN_STEPS):
        build._synthetic_batch(shape, g)
    calibration = torch.cat([build._synthetic_batch(shape, g) for _ in range(build.CALIBRATION_BATCHES)]).double()
    np.testing.assert_allclose(values[first_bn.input[3]], calibration.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # Equal batch sizes: Var = mean of the batches' unbiased variances.
    batch_vars = calibration.view(build.CALIBRATION_BATCHES, 16, -1).var(1).mean(0)
    np.testing.assert_allclose(values[first_bn.input[4]], batch_vars.numpy(), rtol=1e-5)


# name → how the converter treats the zoo's BN layers (see each definition's docstring).
FOLDS = {
    "resnet": {("folded", "Conv"): 12},
    "mobilenet": {("folded", "Conv"): 11},
    "mlp": {("rewritten", "Mul+Add"): 1, ("folded", "Gemm"): 1, ("folded", "MatMul"): 1},
    "decoder": {("folded", "ConvTranspose"): 2, ("folded", "Conv"): 1},
    "conv3d": {("folded", "Conv"): 2},
    "preact": {("folded", "Conv (following)"): 2, ("rewritten", "Mul+Add"): 3},
}


@pytest.mark.parametrize("name", models.NAMES)
def test_zoo_folds_and_validates(zoo, name):
    import bnfold

    out, _ = zoo
    result = bnfold.fold(out / f"{name}.onnx")
    actions = {}
    for entry in result.report.entries:
        key = (entry.action.value, entry.target_kind)
        actions[key] = actions.get(key, 0) + 1
    assert actions == FOLDS[name]
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]
    assert bnfold.check(out / f"{name}.onnx", result.model, inputs=out / f"{name}.inputs.npz").passed


def test_cache_rebuilds_only_when_a_definition_changes(tmp_path, monkeypatch, capsys):
    # Hash a private copy of the sources, so the test can edit a definition safely.
    sources = tmp_path / "src"
    sources.mkdir()
    for path in build._definition_files():
        shutil.copy(path, sources / path.name)
    monkeypatch.setattr(build, "_definition_files", lambda: sorted(sources.glob("*.py")))
    out = tmp_path / "cache"

    first = build.ensure_built(["mlp", "conv3d"], out=out)
    assert [b.built for b in first] == [True, True]
    mtime = (out / "mlp.onnx").stat().st_mtime_ns
    assert [b.built for b in build.ensure_built(["mlp", "conv3d"], out=out)] == [False, False]
    assert (out / "mlp.onnx").stat().st_mtime_ns == mtime

    with open(sources / "mlp.py", "a") as f:
        f.write("\n# touched\n")
    assert [b.built for b in build.ensure_built(["mlp"], out=out)] == [True]
    assert [b.built for b in build.ensure_built(["mlp"], out=out, force=False)] == [False]
    assert [b.built for b in build.ensure_built(["mlp"], out=out, force=True)] == [True]
    (out / "mlp.inputs.npz").unlink()  # a missing file is stale too
    assert [b.built for b in build.ensure_built(["mlp"], out=out)] == [True]

    assert build.main(["--out", str(out), "--only", "mlp,conv3d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["mlp", "conv3d"]
    # One hash covers the whole models/ folder: conv3d went stale when mlp.py changed.
    assert lines[0].endswith("up to date") and " built in " in lines[1]
    assert f"{out / 'mlp.onnx'}  3 BatchNormalization" in lines[0]


def test_unknown_names_are_refused(tmp_path, capsys):
    with pytest.raises(KeyError, match="unknown model 'vgg'"):
        build.ensure_built(["vgg"], out=tmp_path)
    with pytest.raises(SystemExit) as exc:
        build.main(["--out", str(tmp_path), "--only", "vgg"])
    assert exc.value.code == 2
    assert "--only: unknown model vgg; the zoo has resnet, mobilenet, mlp, decoder, conv3d, preact" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
