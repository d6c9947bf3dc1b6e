"""Left-over BN → one Mul and one Add with s, t as [C, 1, …, 1] (passes/rewrite.py), or kept."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import Action, fold
from bnfold import numerics as nx
from tests.converter._passutil import bn_node, bn_params, entry, fold_and_compare, initializer, op_types, vi
from tests.ortutil import make_model

C = 3


def relu_bn(rng, shape, *, dtype=np.float32, opset=17, bn_attrs=None):
    names, params = bn_params(rng, C, dtype)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y", names, **(bn_attrs or {}))]
    model = make_model(nodes, [vi("x", dtype, list(shape))], [vi("y", dtype, list(shape))], params, opset=opset)
    concrete = [d if isinstance(d, int) else 2 for d in shape]  # symbolic dims: any size runs
    return model, {"x": rng.normal(size=concrete).astype(dtype)}


@pytest.fixture
def rng():
    return np.random.default_rng(17)


@pytest.mark.parametrize("shape", [(4, C), (2, C, 5), (2, C, 4, 3), (1, C, 2, 3, 2)])
@pytest.mark.parametrize(("dtype", "opset"), [(np.float32, 7), (np.float32, 15), (np.float16, 17), (np.float64, 24)])
def test_rewrite_as_mul_add_in_onnxruntime(rng, shape, dtype, opset):
    model, feeds = relu_bn(rng, shape, dtype=dtype, opset=opset)
    result = fold_and_compare(model, feeds, dtype)
    assert op_types(result.model) == ["Relu", "Mul", "Add"]
    e = entry(result, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.REWRITTEN, "Mul+Add", None)
    assert e.reason == ("no fold into the producer: its input comes from Relu 'relu', not Conv/ConvTranspose/Gemm/"
                        "MatMul; no fold into a following Conv: its output is a graph output")
    mul, add = result.model.graph.node[1:]
    scale = initializer(result.model, mul.input[1])
    assert scale.shape == (C,) + (1,) * (len(shape) - 2) and scale.dtype == dtype
    assert result.model.graph.output[0].name == add.output[0] == "y"


def test_rewritten_scale_and_shift_are_rounded_once(rng):
    model, _ = relu_bn(rng, (2, C, 4))
    inits = {t.name: initializer(model, t.name) for t in model.graph.initializer}
    s, t = nx.bn_affine(*(inits[n] for n in ("bn_scale", "bn_bias", "bn_mean", "bn_var")),
                        epsilon=float(np.float32(1e-3)))
    result = fold(model)
    mul, add = result.model.graph.node[1:]
    np.testing.assert_array_equal(initializer(result.model, mul.input[1]).ravel(), nx.round_once(s, np.float32))
    np.testing.assert_array_equal(initializer(result.model, add.input[1]).ravel(), nx.round_once(t, np.float32))


def test_bn_on_a_graph_input(rng):
    names, params = bn_params(rng, C, np.float32)
    model = make_model([bn_node("x", "y", names)], [vi("x", np.float32, [2, C, 3])], [vi("y", np.float32, [2, C, 3])],
                       params)
    result = fold_and_compare(model, {"x": rng.normal(size=(2, C, 3)).astype(np.float32)}, np.float32)
    e = entry(result, "bn")
    assert e.reason.startswith("no fold into the producer: its input 'x' is not produced by a node (graph input or constant)")
    assert e.producer is None


def test_keep_unfoldable_keeps_with_reason(rng):
    model, feeds = relu_bn(rng, (2, C, 4))
    result = fold_and_compare(model, feeds, np.float32, keep_unfoldable=True)
    e = entry(result, "bn")
    assert e.action is Action.KEPT and e.target_kind is None
    assert e.reason.endswith("; kept as BatchNormalization (keep_unfoldable)")
    assert op_types(result.model) == ["Relu", "BatchNormalization"]


def test_rewrite_switched_off_keeps_with_reason(rng):
    model, feeds = relu_bn(rng, (2, C, 4))
    result = fold(model, skip="rewrite")
    assert entry(result, "bn").reason.endswith("; kept as BatchNormalization (the rewrite pattern is switched off)")


def test_training_mode_is_kept_not_rewritten(rng):
    names, params = bn_params(rng, C, np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", *names], ["y", "rm", "rv"], name="bn", training_mode=1)]
    model = make_model(nodes, [vi("x", np.float32, [2, C, 4])], [vi("y", np.float32, [2, C, 4])], params, opset=15)
    result = fold(model)
    e = entry(result, "bn")
    assert e.action is Action.KEPT and e.reason.startswith("training_mode=1")
    assert op_types(result.model) == ["Relu", "BatchNormalization"]


def test_used_running_statistics_outputs_are_kept(rng):
    # training_mode=0 with extra outputs is invalid ONNX (the checker refuses it), yet such
    # models exist: built unchecked, the BN is kept because its extra output is used.
    names, params = bn_params(rng, C, np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", *names], ["y", "rm", "rv"], name="bn", training_mode=0)]
    graph = helper.make_graph(nodes, "g", [vi("x", np.float32, [2, C, 4])],
                              [vi("y", np.float32, [2, C, 4]), vi("rm", np.float32, [C])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    result = fold(model)
    assert entry(result, "bn").reason == "its running-statistics outputs ['rm'] are used"


def test_float16_rewrite_overflow_is_kept_with_reason(rng):
    model, feeds = relu_bn(rng, (2, C, 4), dtype=np.float16)
    g = model.graph
    for t in g.initializer:
        if t.name == "bn_scale":
            t.CopyFrom(helper.make_tensor("bn_scale", t.data_type, [C], np.full(C, 60000, np.float16).view(np.uint16)))
        if t.name == "bn_var":
            t.CopyFrom(helper.make_tensor("bn_var", t.data_type, [C], np.full(C, 0, np.float16).view(np.uint16)))
    result = fold(model)
    e = entry(result, "bn")
    assert e.action is Action.KEPT
    assert "cannot rewrite as Mul+Add: folded scale of 'bn' would overflow float16" in e.reason


def test_dynamic_shapes_keep_the_rank(rng):
    model, _ = relu_bn(rng, ("n", C, "h", "w"))
    result = fold_and_compare(model, {"x": rng.normal(size=(2, C, 5, 3)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["Relu", "Mul", "Add"]


def test_opset6_bn_is_kept_not_rewritten(rng):
    # Mul/Add before opset 7 broadcast only with broadcast=1/axis; onnxruntime has no Mul-6
    names, params = bn_params(rng, C, np.float32)
    node_ = bn_node("x", "y", names, is_test=1)
    graph = helper.make_graph([node_], "g", [vi("x", np.float32, [2, C, 4])], [vi("y", np.float32, [2, C, 4])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    result = fold(model)
    e = entry(result, "bn")
    assert e.action is Action.KEPT
    assert e.reason.endswith("; not rewritten: opset 6 Mul/Add use legacy broadcasting (opset < 7)")
