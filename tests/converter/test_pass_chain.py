"""Per-channel Mul/Add chains after a linear node (passes/chain.py), and the broadcast trap:
a constant is per-channel by how it BROADCASTS against the feature axis, not by its size."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import Action, fold
from tests.converter._passutil import bn_node, bn_params, entry, fold_and_compare, op_types, tensor, vi
from tests.ortutil import make_model

C = 4


def conv_chain(rng, ops, *, with_bn=True, spatial=(C, 5), opset=17):
    """Conv → [BN] → ops..., ops = [(op_type, constant shape)], square-ish spatial dims."""
    names, params = bn_params(rng, C, np.float32)
    inits = [tensor("W", rng.normal(size=(C, 2, 3, 3)).astype(np.float32)), *params]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    last = "c"
    if with_bn:
        nodes.append(bn_node("c", "b", names))
        last = "b"
    for k, (op, shape) in enumerate(ops):
        const = rng.normal(1, 0.3, shape).astype(np.float32)
        inits.append(tensor(f"k{k}", const))
        nodes.append(helper.make_node(op, [last, f"k{k}"], [f"o{k}"], name=f"{op.lower()}{k}"))
        last = f"o{k}"
    model = make_model(nodes, [vi("x", np.float32, [1, 2, *spatial])], [vi(last, np.float32, [1, C, *spatial])],
                       inits, opset=opset)
    return model, {"x": rng.normal(size=(1, 2, *spatial)).astype(np.float32)}


@pytest.fixture
def rng():
    return np.random.default_rng(21)


@pytest.mark.parametrize("shape", [(C, 1, 1), (1, C, 1, 1), (1,), ()])
def test_conv_bn_mul_add_folds_into_one_conv(rng, shape):
    model, feeds = conv_chain(rng, [("Mul", shape), ("Add", shape)])
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv"]
    assert [(e.node, e.op_type, e.action, e.target) for e in result.report.entries] == [
        ("bn", "BatchNormalization", Action.FOLDED, "conv"), ("mul0", "Mul", Action.FOLDED, "conv"),
        ("add1", "Add", Action.FOLDED, "conv")]
    assert result.report.counts()["found:BatchNormalization"] == 1


def test_mul_or_add_alone_after_conv_folds(rng):
    model, feeds = conv_chain(rng, [("Add", (C, 1, 1)), ("Mul", (C, 1, 1))], with_bn=False)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv"]
    assert all(e.target_kind == "Conv" for e in result.report.entries)


def test_broadcast_trap_c_vector_broadcasts_over_the_last_axis(rng):
    # a [C] constant against [1, C, H, W=C] scales the LAST axis (W), not the channels
    model, feeds = conv_chain(rng, [("Mul", (C,))], spatial=(3, C))
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv", "Mul"]
    assert [e.node for e in result.report.entries] == ["bn"]  # the Mul is not a normalization node


def test_broadcast_trap_after_bn_stops_the_chain(rng):
    model, feeds = conv_chain(rng, [("Mul", (1, 1, C)), ("Add", (C, 1, 1))], spatial=(C, C))
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv", "Mul", "Add"]


def test_constant_that_would_raise_the_rank_is_not_per_channel(rng):
    model, feeds = conv_chain(rng, [("Mul", (C, 1, 1))], with_bn=False)
    g = model.graph
    g.initializer[-1].CopyFrom(tensor("k0", np.ones((1, 1, C, 1, 1), np.float32)))
    del g.output[:]
    g.output.append(vi("o0", np.float32, 5))
    result = fold(model)
    assert op_types(result.model) == ["Conv", "Mul"]


def test_gemm_feature_vector_is_per_channel(rng):
    # for a rank-2 output the last axis IS the feature axis: [F] folds
    names, params = bn_params(rng, 3, np.float32)
    nodes = [helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
             helper.make_node("Mul", ["g", "k"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "k2"], ["y"], name="add")]
    inits = [tensor("B", rng.normal(size=(5, 3)).astype(np.float32)), tensor("k", rng.normal(size=3).astype(np.float32)),
             tensor("k2", rng.normal(size=(1, 3)).astype(np.float32))]
    model = make_model(nodes, [vi("a", np.float32, [2, 5])], [vi("y", np.float32, [2, 3])], inits)
    result = fold_and_compare(model, {"a": rng.normal(size=(2, 5)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["Gemm"]


def test_matmul_rank3_mul_on_the_feature_axis_folds(rng):
    nodes = [helper.make_node("MatMul", ["a", "B"], ["mm"], name="matmul"),
             helper.make_node("Mul", ["mm", "k"], ["y"], name="mul")]
    inits = [tensor("B", rng.normal(size=(5, 3)).astype(np.float32)), tensor("k", rng.normal(size=3).astype(np.float32))]
    model = make_model(nodes, [vi("a", np.float32, [2, 4, 5])], [vi("y", np.float32, [2, 4, 3])], inits)
    result = fold_and_compare(model, {"a": rng.normal(size=(2, 4, 5)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["MatMul", "Add"]
    assert entry(result, "mul").target_kind == "MatMul"


def test_skip_chain_keeps_mul_add_but_folds_bn(rng):
    model, feeds = conv_chain(rng, [("Mul", (C, 1, 1)), ("Add", (C, 1, 1))])
    result = fold_and_compare(model, feeds, np.float32, skip="chain")
    assert op_types(result.model) == ["Conv", "Mul", "Add"]
    assert [e.node for e in result.report.entries] == ["bn"]


def test_mul_then_bn_folds_over_two_rounds(rng):
    # Conv → Mul → BN: the chain pass takes the Mul and, in the same chain, the BN
    names, params = bn_params(rng, C, np.float32)
    inits = [tensor("W", rng.normal(size=(C, 2, 3, 3)).astype(np.float32)), tensor("k", np.full((C, 1, 1), 2, np.float32)),
             *params]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), helper.make_node("Mul", ["c", "k"], ["m"], name="mul"),
             bn_node("m", "y", names)]
    model = make_model(nodes, [vi("x", np.float32, [1, 2, 5, 5])], [vi("y", np.float32, [1, C, 3, 3])], inits)
    result = fold_and_compare(model, {"x": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)}, np.float32)
    assert op_types(result.model) == ["Conv"]
    assert entry(result, "bn").action is Action.FOLDED
