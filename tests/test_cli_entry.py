"""The console entry point ``bnfold.cli.run`` (``bnfold``, ``python -m bnfold``): it ends the
process with ``os._exit`` after flushing the standard streams, so its exit statuses, its
output on a pipe and its files must be exactly what ``main`` gives in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bnfold.cli import _exit_status
from tests.reliability._models import conv_bn_model, feeds, write
from tests.ortutil import run


def _bnfold(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.parametrize("flags", [[], ["--no-validate"]], ids=["validated", "streamed"])
def test_fold_as_a_process_writes_a_complete_model_and_exits_0(tmp_path, flags):
    model = conv_bn_model()
    src = write(tmp_path / "m.onnx", model)
    dst = tmp_path / "out.onnx"
    proc = _bnfold("fold", src, "-o", dst, "--json", *flags)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout was flushed whole before the process ended
    assert report["counts"]["found"] == report["counts"]["folded:Conv"] == 1
    assert (report["nodes_before"], report["nodes_after"]) == (2, 1)
    folded = onnx.load(str(dst))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    x = feeds()
    want, got = run(model, x)[0], run(folded, x)[0]
    assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]  # no staging left


def test_bad_input_as_a_process_exits_2_with_one_line(tmp_path):
    src = write(tmp_path / "m.onnx", b"")
    proc = _bnfold("fold", src)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"bnfold: error: {src}: is empty (0 bytes), not an ONNX model"]


def test_usage_error_as_a_process_exits_2():
    proc = _bnfold("fold", "--no-such-option")
    assert proc.returncode == 2
    assert "No such option" in proc.stderr


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    # `bnfold inspect m.onnx | head -c 10`: the reader goes away; no traceback, non-zero status.
    src = write(tmp_path / "m.onnx", conv_bn_model())
    proc = subprocess.Popen([sys.executable, "-m", "bnfold", "inspect", str(src), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err
    assert proc.returncode in (0, 1)


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), (2, 2), (256 + 3, 3), ("message", 1)])
def test_exit_status_of_system_exit(code, status, capsys):
    assert _exit_status(code) == status
    assert capsys.readouterr().err == ("message\n" if isinstance(code, str) else "")


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("3", "3")])
def test_cli_keeps_openblas_to_one_thread_unless_the_user_says(preset, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    code = "import sys, bnfold.cli, os; assert 'numpy' in sys.modules; print(os.environ['OPENBLAS_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
