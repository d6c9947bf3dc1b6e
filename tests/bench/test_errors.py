"""The bench's error columns: seeded input samples, max over them, and the fold error
(float64 evaluation of each output, :mod:`bench.reference64`) on models whose answer is known."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import metrics
from bench.reference64 import evaluate_float64, evaluate_float64_samples
from bench.tools import REPO_ROOT
from tests.ortutil import make_model

DELTA = 2.0**-6


def _conv_bn(batch, *, folded: bool, delta: float = 0.0) -> onnx.ModelProto:
    """1×1 Conv (2 → 2 channels) → BN, and its fold. γ = 2, Var = 4, ε = 0: s = 1, so the fold
    is exact in float32 and any difference is the ``delta`` added to folded weight [0, 0]."""
    w = np.array([[0.5, -0.25], [0.75, 1.0]], np.float32).reshape(2, 2, 1, 1)
    gamma, beta, mean, var = (np.full(2, v, np.float32) for v in (2.0, 0.25, 0.5, 4.0))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 3, 3])
    if not folded:
        inits = [numpy_helper.from_array(a, n) for a, n in
                 ((w, "W"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))]
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
                 helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=0.0)]
    else:
        s = gamma / np.sqrt(var)                       # exactly 1
        wf = w * s.reshape(2, 1, 1, 1)
        wf[0, 0, 0, 0] += np.float32(delta)
        inits = [numpy_helper.from_array(wf, "W"), numpy_helper.from_array(beta - s * mean, "B")]
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"])]
    return make_model(nodes, [x], [y], inits)


def test_samples_are_seeded_one_by_one_when_the_batch_is_fixed(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_bn(1, folded=False), path)
    feeds = metrics.sample_feeds(path, 4)
    assert len(feeds) == 4 and not metrics.batch_is_symbolic(path)
    for seed, f in enumerate(feeds):
        np.testing.assert_array_equal(f["x"], metrics.random_feeds(path, seed)["x"])
    assert feeds[0]["x"].shape == (1, 2, 3, 3)


def test_samples_are_batched_when_the_batch_dim_is_symbolic(tmp_path):
    fixed, symbolic = tmp_path / "fixed.onnx", tmp_path / "sym.onnx"
    onnx.save(_conv_bn(1, folded=False), fixed)
    onnx.save(_conv_bn("N", folded=False), symbolic)
    (batch,) = metrics.sample_feeds(symbolic, 4)
    assert batch["x"].shape == (4, 2, 3, 3) and metrics.batch_is_symbolic(symbolic)
    # The same values as running the fixed-batch model's samples one by one.
    np.testing.assert_array_equal(batch["x"], np.concatenate([f["x"] for f in metrics.sample_feeds(fixed, 4)]))


@pytest.mark.parametrize("batch", [1, "N"])
def test_fold_error_is_what_the_fold_changed_max_over_all_samples(tmp_path, batch):
    unfolded, folded = tmp_path / "unfolded.onnx", tmp_path / "folded.onnx"
    onnx.save(_conv_bn(batch, folded=False), unfolded)
    onnx.save(_conv_bn(batch, folded=True, delta=DELTA), folded)
    base = metrics.baseline(unfolded, tmp_path / "base", samples=4)
    assert base["batched"] == (batch == "N")
    got = metrics.evaluate(folded, tmp_path / "base")

    x0 = np.concatenate([f["x"][:, 0] for f in metrics.sample_feeds(unfolded, 4)])
    want = DELTA * float(np.abs(x0.astype(np.float64)).max())  # Δy[:, 0] = δ · x[:, 0]
    assert got["fold_err"] == pytest.approx(want, rel=1e-12)
    assert got["err_ref"] == pytest.approx(want, rel=1e-6)     # onnxruntime's float32 on top
    assert got["err_f64"] == pytest.approx(want, rel=1e-6)
    # The max is over all four samples: sample 0 alone would have said less.
    assert DELTA * float(np.abs(x0[:1]).max()) < 0.9 * want


def test_exact_fold_has_zero_fold_error(tmp_path):
    unfolded, folded = tmp_path / "unfolded.onnx", tmp_path / "folded.onnx"
    onnx.save(_conv_bn(1, folded=False), unfolded)
    onnx.save(_conv_bn(1, folded=True), folded)
    metrics.baseline(unfolded, tmp_path / "base", samples=2)
    assert metrics.evaluate(folded, tmp_path / "base")["fold_err"] == 0.0


def test_an_output_the_evaluator_cannot_run_says_why(tmp_path):
    unfolded, other = tmp_path / "unfolded.onnx", tmp_path / "softmax.onnx"
    onnx.save(_conv_bn(1, folded=False), unfolded)
    model = _conv_bn(1, folded=True)
    model.graph.node[0].output[0] = "c"
    model.graph.node.append(helper.make_node("Softmax", ["c"], ["y"], axis=1))
    onnx.save(model, other)
    metrics.baseline(unfolded, tmp_path / "base", samples=1)
    got = metrics.evaluate(other, tmp_path / "base")
    assert got["fold_err"] is None
    assert got["fold_err_reason"] == "op Softmax is not supported"
    assert got["err_ref"] > 0.01  # onnxruntime ran it: a different function


def test_evaluating_several_samples_at_once_equals_one_by_one(tiny):
    model = onnx.load(str(tiny))
    feeds = [metrics.random_feeds(tiny, s) for s in range(3)]
    together = evaluate_float64_samples(model, feeds)
    for f, outs in zip(feeds, together):
        np.testing.assert_array_equal(outs[0], evaluate_float64(model, f)[0])


def _tool(tool, src, dst):
    proc = subprocess.run([sys.executable, "-m", "bench.run_tool", tool, str(src), str(dst)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr


def _peer_outputs(out, jobs):
    for key, (tool, src) in jobs.items():
        _tool(tool, src, out / f"{key}.onnx")
    return out


@pytest.fixture(scope="module")
def ort_outputs(tiny, tiny16, tmp_path_factory):
    """onnxruntime's offline outputs (always installed): extended fuses Conv+Relu into
    com.microsoft FusedConv; basic on float16 puts a Cast to float32 around every node."""
    return _peer_outputs(tmp_path_factory.mktemp("ort"), {
        "basic": ("ort-basic", tiny), "ext": ("ort-extended", tiny), "basic16": ("ort-basic", tiny16)})


@pytest.fixture(scope="module")
def peer_outputs(tiny, tiny16, tmp_path_factory):
    """onnxoptimizer's outputs (Cast, Sqrt, Div, Unsqueeze, Sub …) and onnxslim's: the bench
    extra (`pip install -e '.[bench]'`, which `make bench` runs); skipped where it is missing."""
    pytest.importorskip("onnxoptimizer")
    pytest.importorskip("onnxslim")
    return _peer_outputs(tmp_path_factory.mktemp("peers"), {
        "opt": ("onnxoptimizer", tiny), "opt16": ("onnxoptimizer", tiny16), "slim16": ("onnxslim", tiny16)})


def _ops(path):
    return {(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node}


def _fold_errors(outputs, keys, tiny, tiny16, tmp_path):
    metrics.baseline(tiny, tmp_path / "b32", samples=2)
    metrics.baseline(tiny16, tmp_path / "b16", samples=2)
    return {k: metrics.evaluate(outputs / f"{k}.onnx", tmp_path / ("b16" if k.endswith("16") else "b32"))
            ["fold_err"] for k in keys}


def test_fold_error_of_onnxruntimes_outputs(tiny, tiny16, ort_outputs, tmp_path):
    fold = _fold_errors(ort_outputs, ("basic", "ext", "basic16"), tiny, tiny16, tmp_path)
    assert ("com.microsoft", "FusedConv") in _ops(ort_outputs / "ext.onnx")
    assert ("", "Cast") in _ops(ort_outputs / "basic16.onnx")
    # onnxruntime folds into float32 weights: float32 rounding, and the same weights whether the
    # Conv and Relu are fused (extended) or not (basic).
    assert 1e-9 < fold["basic"] < 1e-6
    assert fold["ext"] == fold["basic"]
    # On float16 it keeps fp16 weights and casts them to float32 at run time (exact casts).
    assert 1e-5 < fold["basic16"] < 1e-2


def test_fold_error_of_the_other_peers_outputs(tiny, tiny16, ort_outputs, peer_outputs, tmp_path):
    fold = _fold_errors(peer_outputs, ("opt", "opt16", "slim16"), tiny, tiny16, tmp_path / "peers")
    assert {("", "Unsqueeze"), ("", "Sqrt"), ("", "Cast")} <= _ops(peer_outputs / "opt.onnx")
    # onnxoptimizer computes the fold at run time from the unfolded parameters: in float64 it is
    # the unfolded model's function up to float64 reassociation.
    assert fold["opt"] < 1e-14 and fold["opt16"] < 1e-12
    # onnxslim's float16 fold: the same folded weights as onnxruntime's basic optimizer.
    assert fold["slim16"] == _fold_errors(ort_outputs, ("basic16",), tiny, tiny16, tmp_path / "ort")["basic16"]
