"""Refusals: each a BnfoldError with one line naming the model/data and the problem."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import InputDataError, UnsupportedModelError, UsageError
from tests.calibration._models import single_bn, two_bn_chain
from tests.ortutil import make_model


def _x(rng, n=4, dtype=np.float32):
    return {"x": rng.normal(0, 1, (n, 3, 5, 5)).astype(dtype)}


def _gemm_bn() -> onnx.ModelProto:
    """x [N, 4] → Gemm → BN("bn") → y: m = N values per channel."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v, f"bn.{k}") for k, v in
              {"scale": np.ones(3, np.float32), "B": np.zeros(3, np.float32),
               "mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}.items()]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="gemm"),
             helper.make_node("BatchNormalization", ["h", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["y"], name="bn")]
    return make_model(nodes, [helper.make_tensor_value_info("x", 1, ["N", 4])],
                      [helper.make_tensor_value_info("y", 1, ["N", 3])], inits)


def test_batch_with_one_value_per_channel_is_refused(rng):
    batches = [{"x": rng.normal(0, 1, (5, 4)).astype(np.float32)}, {"x": rng.normal(0, 1, (1, 4)).astype(np.float32)}]
    with pytest.raises(InputDataError) as info:
        bnfold.calibrate(_gemm_bn(), batches)
    assert str(info.value) == ("batch 1: BatchNormalization 'bn' sees m = 1 value per channel (batch 1 × spatial "
                               "size 1); a batch variance needs m >= 2, use larger batches")
    # one sample with spatial positions is fine: m = 25
    bnfold.calibrate(single_bn(), [_x(rng, n=1)])


@pytest.mark.parametrize("feed, message", [
    ({"y": np.zeros((2, 3, 5, 5), np.float32)}, "batch 0: 'y' is not an input of the model (inputs: x)"),
    ({}, "batch 0: no data for input 'x' (given: nothing)"),
    ({"x": np.zeros((2, 3, 5, 5), np.float32), "z": np.zeros(1)}, "batch 0: 'z' is not an input of the model"),
    ({"x": np.zeros((2, 3, 5, 5), np.float64)},
     "batch 0: input 'x' expects float32 [N, 3, 5, 5], got float64 [2, 3, 5, 5]"),
    ({"x": np.zeros((2, 4, 5, 5), np.float32)},
     "batch 0: input 'x' expects float32 [N, 3, 5, 5], got float32 [2, 4, 5, 5]"),
    ({"x": np.zeros((2, 3, 5), np.float32)},
     "batch 0: input 'x' expects float32 [N, 3, 5, 5], got float32 [2, 3, 5]"),
], ids=["wrong-name", "missing", "unknown", "dtype", "shape", "rank"])
def test_inputs_that_do_not_match_the_model(feed, message):
    with pytest.raises(InputDataError) as info:
        bnfold.calibrate(single_bn(), [feed])
    assert str(info.value).startswith(message)


def test_npz_that_does_not_match_the_model(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 5, 5), np.float16))
    with pytest.raises(InputDataError, match=r"d\.npz: input 'x' expects float32 \[N, 3, 5, 5\], got float16"):
        bnfold.calibrate(single_bn(), tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", image=np.zeros((4, 3, 5, 5), np.float32))
    with pytest.raises(InputDataError, match=r"e\.npz: 'image' is not an input of the model \(inputs: x\)"):
        bnfold.calibrate(single_bn(), tmp_path / "e.npz")


def test_training_mode_bn_is_refused(rng):
    model = single_bn(opset=15)
    model.graph.node[0].attribute.append(helper.make_attribute("training_mode", 1))
    model.graph.node[0].output.extend(["running_mean", "running_var"])
    with pytest.raises(UnsupportedModelError) as info:
        bnfold.calibrate(model, [_x(rng)])
    assert str(info.value) == ("model: BatchNormalization 'bn': is in training mode (training_mode=1); it normalizes "
                               "with batch statistics and has no population statistics to re-estimate")
    old = single_bn(opset=9)
    old.graph.node[0].output.extend(["rm", "rv"])  # opset < 14: mean/var outputs = training mode
    with pytest.raises(UnsupportedModelError, match=r"training mode \(opset 9 with the training-mode outputs"):
        bnfold.calibrate(old, [_x(rng)])


def test_statistics_that_are_not_constants_are_refused(rng):
    model = single_bn()
    model.graph.input.append(helper.make_tensor_value_info("running_mean", 1, [3]))
    model.graph.node[0].input[3] = "running_mean"
    with pytest.raises(UnsupportedModelError) as info:
        bnfold.calibrate(model, [_x(rng)])
    assert str(info.value) == ("model: BatchNormalization 'bn': its mean is not a constant ('running_mean' is a "
                               "graph input); calibrate writes the statistics into constants")
    computed = single_bn()
    computed.graph.node.insert(0, helper.make_node("Abs", ["bn.var"], ["var_abs"], name="abs"))
    computed.graph.node[1].input[4] = "var_abs"
    with pytest.raises(UnsupportedModelError, match=r"its var is not a constant \('var_abs' is computed by Abs 'abs'\)"):
        bnfold.calibrate(computed, [_x(rng)])


def test_spatial0_and_no_bn_are_refused(rng):
    with pytest.raises(UnsupportedModelError, match=r"spatial=0 keeps per-position statistics"):
        bnfold.calibrate(single_bn(opset=7, spatial=0), [_x(rng)])
    no_bn = make_model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", 1, [2, 3])],
                       [helper.make_tensor_value_info("y", 1, [2, 3])])
    with pytest.raises(UnsupportedModelError, match=r"^model: no BatchNormalization in the main graph to calibrate$"):
        bnfold.calibrate(no_bn, [{"x": np.zeros((2, 3), np.float32)}])


def test_usage_errors(rng):
    model, _ = two_bn_chain()
    with pytest.raises(UsageError, match="give data"):
        bnfold.calibrate(model)
    with pytest.raises(UsageError, match="max_batches=0"):
        bnfold.calibrate(model, [_x(rng)], max_batches=0)
    with pytest.raises(UsageError, match="batch_size applies to .npz data"):
        bnfold.calibrate(model, [_x(rng)], batch_size=2)
    with pytest.raises(InputDataError, match="yielded no batch"):
        bnfold.calibrate(model, [])
    with pytest.raises(InputDataError, match=r"batch 0: is a ndarray, expected a dict"):
        bnfold.calibrate(model, [np.zeros(3)])


def test_the_input_model_is_never_modified(rng):
    model, _ = two_bn_chain()
    before = model.SerializeToString()
    bnfold.calibrate(model, [{"x": rng.normal(0, 1, (4, 3, 6, 6)).astype(np.float32)}], fold=True)
    assert model.SerializeToString() == before
