"""The passes inside If/Loop subgraphs and model-local functions; outer-scope constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Action
from tests.converter._passutil import bn_node, bn_params, fold_and_compare, tensor, vi
from tests.ortutil import make_model

C = 3


@pytest.fixture
def rng():
    return np.random.default_rng(33)


def if_model(rng, *, else_uses_w=True):
    """If(cond): then = Conv(x, W) → BN (all parameters from the outer scope); else = Conv(x, W)."""
    names, params = bn_params(rng, C, np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["tc"], name="then_conv"), bn_node("tc", "ty", names, name="then_bn")],
        "then", [], [vi("ty", np.float32, [1, C, 3, 3])])
    else_nodes = [helper.make_node("Conv", ["x", "W"], ["ey"], name="else_conv")] if else_uses_w else [
        helper.make_node("Conv", ["x", "W2"], ["ey"], name="else_conv")]
    else_g = helper.make_graph(else_nodes, "else", [], [vi("ey", np.float32, [1, C, 3, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [tensor("W", rng.normal(size=(C, 2, 1, 1)).astype(np.float32)),
             tensor("W2", rng.normal(size=(C, 2, 1, 1)).astype(np.float32)), *params]
    model = make_model(nodes, [vi("cond", np.bool_, []) if False else helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
                               vi("x", np.float32, [1, 2, 3, 3])], [vi("y", np.float32, [1, C, 3, 3])], inits)
    return model


def test_bn_inside_an_if_branch_folds_with_outer_scope_weights(rng):
    model = if_model(rng)
    x = rng.normal(size=(1, 2, 3, 3)).astype(np.float32)
    for cond in (True, False):
        result = fold_and_compare(model, {"cond": np.array(cond), "x": x}, np.float32)
    e = result.report.entries[0]
    assert (e.node, e.graph, e.action, e.target) == ("then_bn", "if/then_branch", Action.FOLDED, "then_conv")
    then_g = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["Conv"]
    # W is shared with the else branch: the folded copy lives in the subgraph, W is untouched
    assert list(then_g.node[0].input) == ["x", "W_folded", "then_conv_B_folded"]
    assert [t.name for t in then_g.initializer] == ["W_folded", "then_conv_B_folded"]
    outer_w = next(t for t in result.model.graph.initializer if t.name == "W")
    assert outer_w.SerializeToString() == next(t for t in model.graph.initializer if t.name == "W").SerializeToString()


def test_conv_output_used_inside_a_subgraph_is_not_folded_into(rng):
    names, params = bn_params(rng, C, np.float32)
    then_g = helper.make_graph([helper.make_node("Identity", ["c"], ["ty"])], "then", [],
                               [vi("ty", np.float32, [1, C, 3, 3])])
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["ey"])], "else", [],
                               [vi("ey", np.float32, [1, C, 3, 3])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", names),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [tensor("W", rng.normal(size=(C, 2, 1, 1)).astype(np.float32)), *params]
    model = make_model(nodes, [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
                               vi("x", np.float32, [1, 2, 3, 3])], [vi("z", np.float32, [1, C, 3, 3])], inits)
    x = rng.normal(size=(1, 2, 3, 3)).astype(np.float32)
    result = fold_and_compare(model, {"cond": np.array(False), "x": x}, np.float32)
    fold_and_compare(model, {"cond": np.array(True), "x": x}, np.float32)
    e = result.report.entries[0]
    assert e.action is Action.REWRITTEN
    assert "the output of Conv 'conv' also feeds ['if']" in e.reason


def test_bn_inside_a_loop_body(rng):
    names, params = bn_params(rng, C, np.float32)
    body = helper.make_graph(
        [helper.make_node("Conv", ["v_in", "W"], ["c"], name="body_conv"), bn_node("c", "v_out", names, name="body_bn"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []), vi("v_in", np.float32, [1, C, 2, 2])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []), vi("v_out", np.float32, [1, C, 2, 2])])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)]
    inits = [tensor("W", (rng.normal(size=(C, C, 1, 1)) * 0.5).astype(np.float32)), tensor("n", np.array(3)), *params]
    model = make_model(nodes, [vi("x", np.float32, [1, C, 2, 2])], [vi("y", np.float32, [1, C, 2, 2])], inits)
    result = fold_and_compare(model, {"x": rng.normal(size=(1, C, 2, 2)).astype(np.float32)}, np.float32)
    e = result.report.entries[0]
    assert (e.node, e.graph, e.action) == ("body_bn", "loop/body", Action.FOLDED)


def test_bn_inside_a_model_local_function(rng):
    names, params = bn_params(rng, C, np.float32)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in
              [tensor("W", rng.normal(size=(C, 2, 1, 1)).astype(np.float32)), *params]]
    body = [*consts, helper.make_node("Conv", ["fx", "W"], ["c"], name="f_conv"), bn_node("c", "fy", names, name="f_bn")]
    function = helper.make_function("local", "ConvBN", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("ConvBN", ["x"], ["y"], domain="local", name="call")],
                       [vi("x", np.float32, [1, 2, 3, 3])], [vi("y", np.float32, [1, C, 3, 3])],
                       functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
    result = fold_and_compare(model, {"x": rng.normal(size=(1, 2, 3, 3)).astype(np.float32)}, np.float32)
    e = result.report.entries[0]
    assert (e.node, e.graph, e.action, e.target) == ("f_bn", "function:local.ConvBN", Action.FOLDED, "f_conv")
    f = result.model.functions[0]
    # the folded W and the new bias B are Constant nodes; the old W and BN constants are gone
    assert [n.op_type for n in f.node] == ["Constant", "Constant", "Conv"]


def test_function_bn_of_unknown_rank_is_kept_with_reason(rng):
    names, params = bn_params(rng, C, np.float32)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in params]
    body = [*consts, helper.make_node("Relu", ["fx"], ["r"], name="f_relu"), bn_node("r", "fy", names, name="f_bn")]
    function = helper.make_function("local", "ReluBN", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("ReluBN", ["x"], ["y"], domain="local", name="call")],
                       [vi("x", np.float32, [1, C, 3])], [vi("y", np.float32, [1, C, 3])],
                       functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
    result = fold_and_compare(model, {"x": rng.normal(size=(1, C, 3)).astype(np.float32)}, np.float32)
    e = result.report.entries[0]
    assert e.action is Action.KEPT
    assert e.reason.endswith("cannot rewrite as Mul+Add: the input's rank is unknown")
