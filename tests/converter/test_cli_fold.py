"""``bnfold fold`` and ``bnfold inspect`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import cli
from tests.converter.test_pass_options import two_bn_model


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(two_bn_model(np.random.default_rng(0)), path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fold_writes_next_to_the_input_and_prints_a_summary(src):
    res = invoke("fold", src)
    assert res.exit_code == 0, res.output
    out = src.with_name("m.folded.onnx")
    assert out.is_file()
    lines = res.output.splitlines()
    assert lines[0] == f"{src}: 2 BatchNormalization nodes found"
    assert lines[1:5] == ["  folded     1  (Conv 1)", "  rewritten  1  (as Mul+Add)", "  kept       0",
                          "  nodes      4 -> 4"]
    assert lines[6].startswith("rewritten bn2 (BatchNormalization): no fold into the producer: its input comes from "
                               "Relu 'relu'")
    assert lines[-1] == f"wrote {out}"


def test_fold_json(src, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke("fold", src, "-o", out, "--json", "--skip", "rewrite")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["output"] == str(out)
    assert data["counts"] == {"found": 2, "found:BatchNormalization": 2, "folded": 1, "rewritten": 0, "kept": 1,
                              "folded:Conv": 1}
    assert [e["action"] for e in data["entries"]] == ["folded", "kept"]


def test_fold_never_overwrites_the_input_without_in_place(src):
    before = src.read_bytes()
    res = invoke("fold", src, "-o", src)
    assert res.exit_code == 2
    assert res.output.strip() == f"bnfold: error: {src}: is the input model; refusing to overwrite it (use --in-place)"
    assert src.read_bytes() == before
    res = invoke("fold", src, "--in-place")
    assert res.exit_code == 0 and src.read_bytes() != before
    assert not src.with_name("m.folded.onnx").exists()


def test_output_and_in_place_together_is_a_usage_error(src, tmp_path):
    res = invoke("fold", src, "--in-place", "-o", tmp_path / "x.onnx")
    assert (res.exit_code, res.output.strip()) == (2, "bnfold: error: --output and --in-place: give one or the other")


def test_unknown_pattern_exits_2_with_one_line(src):
    res = invoke("fold", src, "--only", "conv,bogus")
    assert res.exit_code == 2
    assert res.output.strip() == ("bnfold: error: only: unknown pattern 'bogus'; valid: conv, convtranspose, gemm, "
                                  "matmul, chain, forward, rewrite")


def test_missing_model_exits_2_with_one_line(tmp_path):
    res = invoke("fold", tmp_path / "nope.onnx")
    assert res.exit_code == 2
    assert res.output.strip() == f"bnfold: error: {tmp_path / 'nope.onnx'}: no such file"


def test_inspect_lists_nodes_and_writes_nothing(src, tmp_path):
    res = invoke("inspect", src)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    lines = res.output.splitlines()
    assert lines[0] == f"{src}: 2 normalization nodes"
    assert lines[1] == "  bn1 (BatchNormalization): producer conv; consumers relu; can be folded into Conv 'conv'"
    assert lines[2].startswith("  bn2 (BatchNormalization): producer relu; consumers (none); cannot be folded, "
                               "would be rewritten as Mul+Add: no fold into the producer")


def test_inspect_and_fold_agree(src, tmp_path):
    inspected = json.loads(invoke("inspect", src, "--json", "--keep-unfoldable").output)
    folded = json.loads(invoke("fold", src, "--json", "--keep-unfoldable", "-o", tmp_path / "o.onnx").output)
    assert inspected["entries"] == folded["entries"]
