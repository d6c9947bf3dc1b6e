"""Gemm → BN (passes/gemm.py): every transA/transB/alpha/beta and C absent/scalar/[F]/[1,F]/[M,F]."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Action, fold
from bnfold import numerics as nx
from tests.converter._passutil import bn_node, bn_params, entry, fold_and_compare, initializer, node, op_types, tensor, vi
from tests.ortutil import make_model

M, K, F = 3, 5, 4


def gemm_bn(rng, *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(F,), dtype=np.float32, opset=17,
            c_as_input=False):
    b = rng.normal(size=(F, K) if trans_b else (K, F)).astype(dtype)
    names, params = bn_params(rng, F, dtype)
    inits = [tensor("Bw", b), *params]
    inputs = ["a", "Bw"]
    graph_inputs = [vi("a", dtype, [K, M] if trans_a else [M, K])]
    feeds = {"a": rng.normal(size=(K, M) if trans_a else (M, K)).astype(dtype)}
    if c_shape is not None:
        c = rng.normal(size=c_shape).astype(dtype)
        inputs.append("C")
        if c_as_input:
            graph_inputs.append(vi("C", dtype, list(c_shape)))
            feeds["C"] = c
        else:
            inits.append(tensor("C", c))
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha,
                              beta=beta),
             bn_node("g", "y", names)]
    model = make_model(nodes, graph_inputs, [vi("y", dtype, [M, F])], inits, opset=opset)
    return model, feeds


@pytest.fixture
def rng():
    return np.random.default_rng(5)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 3.0)])
@pytest.mark.parametrize("c_shape", [None, (), (F,), (1, F), (M, F), (M, 1)])
def test_gemm_bn_folds_in_onnxruntime(rng, trans_a, trans_b, alpha, beta, c_shape):
    model, feeds = gemm_bn(rng, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Gemm"]
    assert entry(result, "bn").target_kind == "Gemm"
    g = node(result.model, "gemm")
    assert {a.name: helper.get_attribute_value(a) for a in g.attribute}["beta"] == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("opset", [7, 9, 13, 24])
def test_gemm_dtypes_and_opsets(rng, dtype, opset):
    model, feeds = gemm_bn(rng, trans_b=1, beta=2.0, dtype=dtype, opset=opset)
    fold_and_compare(model, feeds, dtype)


def test_gemm_weights_are_rounded_once(rng):
    model, _ = gemm_bn(rng, trans_b=1, beta=0.5, c_shape=(1, F))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    s, t = nx.bn_affine(*(inits[n] for n in ("bn_scale", "bn_bias", "bn_mean", "bn_var")), epsilon=float(np.float32(1e-3)))
    b64, c64 = nx.fold_gemm(inits["Bw"], inits["C"], s, t, trans_b=True, beta=0.5)
    result = fold(model)
    np.testing.assert_array_equal(initializer(result.model, "Bw"), nx.round_once(b64, np.float32))
    np.testing.assert_array_equal(initializer(result.model, "C"), nx.round_once(c64, np.float32))
    assert initializer(result.model, "C").shape == (1, F)


def test_non_constant_c_is_refused(rng):
    model, feeds = gemm_bn(rng, c_as_input=True)
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert "C of Gemm 'gemm' is not a constant: 'C' is a graph input" in e.reason


def test_skip_gemm(rng):
    model, feeds = gemm_bn(rng)
    result = fold_and_compare(model, feeds, np.float32, skip=["gemm"])
    assert "folding into Gemm is switched off (pattern 'gemm')" in entry(result, "bn").reason
