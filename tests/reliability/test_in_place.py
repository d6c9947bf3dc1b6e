"""``--in-place`` replaces the input only after the new model was written and checked: a fold
whose check fails leaves the input byte-identical (exit 1), a successful one replaces it with
a valid folded model, and nothing else is left in the folder."""

from __future__ import annotations

import numpy as np
import onnx

from tests.ortutil import run
from tests.reliability._models import conv_bn_model, feeds, invoke, snapshot, write


def test_in_place_with_a_failing_check_keeps_the_input(tmp_path, monkeypatch):
    import bnfold.passes.conv as conv_pass

    real = conv_pass.fold_bias
    monkeypatch.setattr(conv_pass, "fold_bias", lambda b, s, t: real(b, s, t) + 0.5)  # a wrong fold
    src = write(tmp_path / "m.onnx", conv_bn_model())
    before = snapshot(tmp_path)
    result = invoke("fold", src, "--in-place")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"bnfold: error: {src}: the folded model is not equivalent")
    assert result.stderr.strip().endswith("nothing written")
    assert snapshot(tmp_path) == before


def test_in_place_replaces_the_input_with_the_checked_fold(tmp_path):
    model = conv_bn_model()
    src = write(tmp_path / "m.onnx", model)
    result = invoke("fold", src, "--in-place")
    assert result.exit_code == 0, result.stderr
    folded = onnx.load(str(src))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    x = feeds()
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
