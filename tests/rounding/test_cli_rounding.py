"""``bnfold fold --rounding``: the option reaches the fold; a bad value is a usage error."""

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

import bnfold
from bnfold.cli import cli
from tests.converter import builders


def _weights(path) -> np.ndarray:
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv.input[1])


def test_cli_rounding_compensated_matches_the_api(tmp_path):
    model, _ = builders.conv_bn(dtype=np.float16, c_in=32, c_out=16, rng=5)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    runner = CliRunner()
    for rounding in ("nearest", "compensated"):
        out = tmp_path / f"{rounding}.onnx"
        result = runner.invoke(cli, ["fold", str(src), "-o", str(out), "--rounding", rounding])
        assert result.exit_code == 0, result.output
        api = bnfold.fold(model, rounding=rounding).model
        conv = next(n for n in api.graph.node if n.op_type == "Conv")
        expected = next(numpy_helper.to_array(t) for t in api.graph.initializer if t.name == conv.input[1])
        assert np.array_equal(_weights(out), expected)
    assert not np.array_equal(_weights(tmp_path / "nearest.onnx"), _weights(tmp_path / "compensated.onnx"))


def test_cli_bad_rounding_exits_2_and_writes_nothing(tmp_path):
    model, _ = builders.conv_bn(dtype=np.float16)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "o.onnx"), "--rounding", "exact"])
    assert result.exit_code == 2
    assert "'exact' is not one of 'nearest', 'compensated'" in result.output
    assert not (tmp_path / "o.onnx").exists()
