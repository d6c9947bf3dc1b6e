"""Four ``bnfold fold`` processes on the same input and the same output at once: all exit 0,
the output is one complete, valid model (each writer stages in its own hidden folder and
renames atomically, so the last rename wins whole), no staging folder is left behind."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx

from bnfold.modelio import save_model
from tests.ortutil import run
from tests.reliability._models import conv_bn_model, feeds, write
from tests.reliability.test_interrupted import ENV


def _run_four(args):
    procs = [subprocess.Popen([sys.executable, "-m", "bnfold", "fold", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(4)]
    return [(p.wait(), *p.communicate()) for p in procs]


def test_four_processes_same_input_same_output(tmp_path):
    model = conv_bn_model()
    src = write(tmp_path / "m.onnx", model)
    dst = tmp_path / "out.onnx"
    for code, out, err in _run_four([src, "-o", dst]):  # validation on: each checks its fold
        assert code == 0 and err == "" and "PASS" in out, (code, err)
    folded = onnx.load(str(dst))
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    x = feeds()
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert src.read_bytes() == model.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_four_processes_external_data_model(tmp_path):
    model = conv_bn_model()
    src = tmp_path / "m.onnx"
    save_model(model, src, external_data=True)
    dst = tmp_path / "out.onnx"
    for code, _, err in _run_four([src, "-o", dst, "--no-validate"]):
        assert code == 0 and err == "", (code, err)
    folded = onnx.load(str(dst))  # loads its external data: whichever file it names is complete
    onnx.checker.check_model(folded)
    x = feeds()
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))
