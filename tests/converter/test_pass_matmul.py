"""MatMul → BN and MatMul → Add(bias) → BN (passes/matmul.py): 2-D activations only."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import Action, fold
from tests.converter._passutil import bn_node, bn_params, entry, fold_and_compare, op_types, tensor, vi
from tests.ortutil import make_model

N, K, F = 3, 5, 4


def matmul_bn(rng, *, bias=None, dtype=np.float32, opset=17, between=(), x_shape=(N, K), y_shape=None,
              bn_channels=F, b_as_input=False, extra_inits=()):
    w = rng.normal(size=(K, F)).astype(dtype)
    names, params = bn_params(rng, bn_channels, dtype)
    inits = [*params, *extra_inits] + ([] if b_as_input else [tensor("W", w)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul")]
    last = "m"
    if bias is not None:
        inits.append(tensor("bias", rng.normal(size=bias).astype(dtype)))
        nodes.append(helper.make_node("Add", ["m", "bias"], ["mb"], name="bias_add"))
        last = "mb"
    for op in between:
        nodes.append(op)
        last = op.output[0]
    nodes.append(bn_node(last, "y", names))
    inputs = [vi("x", dtype, list(x_shape))] + ([vi("W", dtype, [K, F])] if b_as_input else [])
    model = make_model(nodes, inputs, [vi("y", dtype, list(y_shape or (*x_shape[:-1], F)))], inits, opset=opset)
    feeds = {"x": rng.normal(size=[d if isinstance(d, int) else 2 for d in x_shape]).astype(dtype)}
    if b_as_input:
        feeds["W"] = w
    return model, feeds


@pytest.fixture
def rng():
    return np.random.default_rng(3)


@pytest.mark.parametrize("bias", [None, (F,), (1, F)])
@pytest.mark.parametrize(("dtype", "opset"), [(np.float32, 9), (np.float32, 15), (np.float16, 17), (np.float64, 24)])
def test_matmul_bn_folds_in_onnxruntime(rng, bias, dtype, opset):
    model, feeds = matmul_bn(rng, bias=bias, dtype=dtype, opset=opset)
    result = fold_and_compare(model, feeds, dtype)
    assert op_types(result.model) == ["MatMul", "Add"]
    e = entry(result, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "MatMul", "matmul")
    assert [x.node for x in result.report.entries] == ["bn"]  # the bias Add is not a normalization node


def test_rank3_matmul_output_is_refused_with_reason(rng):
    # BN normalizes axis 1 (L) of [N, L, F]; MatMul's features are the last axis.
    model, feeds = matmul_bn(rng, x_shape=(2, 3, K), bn_channels=3)
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert ("BatchNormalization normalizes axis 1 of the rank-3 output of MatMul 'matmul', whose feature axis is 2"
            in e.reason)


@pytest.mark.parametrize("target", [[N, F, 1], [0, F, 1, 1], [-1, 0, 1]])
def test_bn_after_a_provable_reshape_folds_into_matmul(rng, target):
    reshape = helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape")
    model, feeds = matmul_bn(rng, between=[reshape], y_shape=(N, F) + (1,) * (len(target) - 2),
                             extra_inits=[tensor("shape", np.array(target))])
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["MatMul", "Add", "Reshape"]
    assert (entry(result, "bn").action, entry(result, "bn").target) == (Action.FOLDED, "matmul")


@pytest.mark.parametrize("target", [[N, 2, 2], [N * F, 1], [N, 1, F]])
def test_bn_after_a_reshape_that_moves_the_features_is_refused(rng, target):
    reshape = helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape")
    model, feeds = matmul_bn(rng, between=[reshape], y_shape=tuple(target), bn_channels=target[1],
                             extra_inits=[tensor("shape", np.array(target))])
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert ("no fold into the producer: Reshape 'reshape' after MatMul 'matmul' does not provably keep its feature "
            "axis on the channel axis") in e.reason


def test_bn_after_transpose_of_rank3_matmul_folds(rng):
    # torch: Linear on [N, L, F], .transpose(1, 2), BatchNorm1d(F) — BN's axis 1 is F
    transpose = helper.make_node("Transpose", ["m"], ["tr"], name="transpose", perm=[0, 2, 1])
    model, feeds = matmul_bn(rng, x_shape=(2, 3, K), between=[transpose], y_shape=(2, F, 3))
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["MatMul", "Add", "Transpose"]
    assert entry(result, "bn").target_kind == "MatMul"


def test_bn_after_transpose_of_2d_matmul_is_refused(rng):
    # [N, F] → [F, N]: BN normalizes N
    transpose = helper.make_node("Transpose", ["m"], ["tr"], name="transpose", perm=[1, 0])
    model, feeds = matmul_bn(rng, between=[transpose], y_shape=(F, N), bn_channels=N)
    result = fold_and_compare(model, feeds, np.float32)
    assert ("BatchNormalization normalizes axis 1 of the rank-2 output of MatMul 'matmul' (after Transpose "
            "'transpose'), whose feature axis is 0") in entry(result, "bn").reason


def test_matmul_bias_transpose_bn(rng):
    transpose = helper.make_node("Transpose", ["mb"], ["tr"], name="transpose", perm=[0, 2, 1])
    model, feeds = matmul_bn(rng, x_shape=(2, 3, K), bias=(F,), between=[transpose], y_shape=(2, F, 3))
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["MatMul", "Add", "Transpose"]


def test_gemm_unsqueeze_bn_folds(rng):
    names, params = bn_params(rng, F, np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="gemm"),
             helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsqueeze"), bn_node("u", "y", names)]
    inits = [tensor("W", rng.normal(size=(K, F)).astype(np.float32)), tensor("axes", np.array([2, 3])), *params]
    model = make_model(nodes, [vi("x", np.float32, [N, K])], [vi("y", np.float32, [N, F, 1, 1])], inits)
    result = fold_and_compare(model, {"x": rng.normal(size=(N, K)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["Gemm", "Unsqueeze"]


def test_non_constant_matmul_weight_is_refused(rng):
    model, feeds = matmul_bn(rng, b_as_input=True)
    result = fold_and_compare(model, feeds, np.float32)
    assert "B (second input) of MatMul 'matmul' is not a constant: 'W' is a graph input" in entry(result, "bn").reason


def test_bias_add_with_per_row_constant_is_refused(rng):
    # an [N, 1] "bias" broadcasts over rows, not features: not a MatMul bias
    model, feeds = matmul_bn(rng, bias=(N, 1))
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert "Add constant of shape [3, 1] does not broadcast per channel along axis 1 of the rank-2 output" in e.reason


def test_skip_matmul(rng):
    model, feeds = matmul_bn(rng, bias=(F,))
    result = fold(model, skip="matmul")
    assert entry(result, "bn").reason.startswith(
        "no fold into the producer: its input comes from Add 'bias_add', not Conv/ConvTranspose/Gemm/MatMul")


def test_dynamic_batch_dimension(rng):
    model, _ = matmul_bn(rng, x_shape=("batch", K), y_shape=("batch", F))
    result = fold_and_compare(model, {"x": rng.normal(size=(7, K)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["MatMul", "Add"]
