"""fold + validation wired together: the API records the check, fold_file and `bnfold fold`
write nothing when it fails (unless forced), and the CLI's exit status says so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import cli
from bnfold.errors import ValidationFailed
from tests.ortutil import make_model


def _conv_bn(rng) -> onnx.ModelProto:
    c = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.2, 2, c).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 8, 8])],
        inits,
    )


@pytest.fixture
def model_path(tmp_path, rng):
    path = tmp_path / "m.onnx"
    path.write_bytes(_conv_bn(rng).SerializeToString())
    return path


def test_fold_validate_records_a_passing_check(rng):
    result = bnfold.fold(_conv_bn(rng), validate={"samples": 3, "dims": {"batch": 2}})
    assert result.check.passed
    comparison = result.check.comparisons[0]
    assert 0 < comparison.outputs[0].max_abs_error < 1e-5
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_fold_without_validate_has_no_check(rng):
    assert bnfold.fold(_conv_bn(rng)).check is None


def test_fold_file_writes_nothing_when_the_check_fails(model_path):
    out = model_path.with_name("out.onnx")
    with pytest.raises(ValidationFailed, match=r"m\.onnx: the folded model is not equivalent .*nothing written") as info:
        bnfold.fold_file(model_path, out, validate={"rtol": 0.0, "atol": 0.0})
    assert not out.exists()
    assert info.value.result.check.passed is False
    assert info.value.result.report.counts()["folded"] == 1


def test_fold_file_force_writes_a_failing_fold(model_path):
    out = model_path.with_name("out.onnx")
    result = bnfold.fold_file(model_path, out, validate={"rtol": 0.0, "atol": 0.0}, force=True)
    assert out.exists() and result.output == out and not result.check.passed


def test_cli_fold_validates_by_default(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--samples", "2", "--dim", "batch=3"])
    assert result.exit_code == 0, result.output
    assert "PASS: equivalent on cpu (1 output(s), 2 sample(s)" in result.output
    assert result.output.rstrip().endswith(f"wrote {model_path.with_name('m.folded.onnx')}")
    assert model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_failing_check_exit_1_nothing_written(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--rtol", "0", "--atol", "0"])
    assert result.exit_code == 1
    assert "FAIL: output 'y' on cpu" in result.stdout
    assert "nothing written" in result.stdout
    assert result.stderr.strip().startswith(f"bnfold: error: {model_path}: the folded model is not equivalent")
    assert not model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_force_writes_and_still_exits_1(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--rtol", "0", "--atol", "0", "--force"])
    assert result.exit_code == 1
    assert "written anyway (--force)" in result.stderr
    assert model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_no_validate_skips_the_check(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--no-validate", "--rtol", "0", "--atol", "0"])
    assert result.exit_code == 0
    assert "PASS" not in result.output and "FAIL" not in result.output


def test_cli_fold_json_carries_the_check(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--json"])
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["check"]["passed"] is True
    assert document["counts"]["folded"] == 1
    assert document["output"] == str(model_path.with_name("m.folded.onnx"))


def test_cli_fold_missing_provider_is_exit_2_and_writes_nothing(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--providers", "cpu,cuda"])
    assert result.exit_code == 2
    assert "cuda" in result.stderr.lower()
    assert not model_path.with_name("m.folded.onnx").exists()
