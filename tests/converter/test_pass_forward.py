"""BN → Conv (passes/forward.py): folded into the FOLLOWING Conv only without padding."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold import Action
from tests.converter._passutil import bn_node, bn_params, entry, fold_and_compare, op_types, tensor, vi
from tests.ortutil import make_model

C = 4


def bn_conv(rng, *, groups=1, bias=True, conv_attrs=None, op="Conv", extra_nodes=(), outputs=None, dtype=np.float32):
    names, params = bn_params(rng, C, dtype)
    c_out = 6 if groups != C else C
    if op == "Conv":
        w = rng.normal(size=(c_out, C // groups, 3, 3)).astype(dtype)
    else:
        w = rng.normal(size=(C, c_out // groups, 3, 3)).astype(dtype)
    inits = [tensor("W", w), *params]
    inputs = ["b", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(size=c_out).astype(dtype)))
        inputs.append("B")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "b", names),
             helper.make_node(op, inputs, ["y"], name="conv", group=groups, **(conv_attrs or {})), *extra_nodes]
    model = make_model(nodes, [vi("x", dtype, [2, C, 7, 6])], outputs or [vi("y", dtype, 4)], inits)
    return model, {"x": rng.normal(size=(2, C, 7, 6)).astype(dtype)}


@pytest.fixture
def rng():
    return np.random.default_rng(9)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_attrs", [{}, dict(strides=[2, 1], dilations=[1, 2]), dict(auto_pad="VALID"),
                                        dict(pads=[0, 0, 0, 0])])
def test_bn_folds_into_following_conv_without_padding(rng, groups, bias, conv_attrs):
    model, feeds = bn_conv(rng, groups=groups, bias=bias, conv_attrs=conv_attrs)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Relu", "Conv"]
    e = entry(result, "bn")
    assert (e.action, e.target_kind, e.target, e.producer, e.consumers) == (
        Action.FOLDED, "Conv (following)", "conv", "relu", ("conv",))


def test_float16_forward(rng):
    model, feeds = bn_conv(rng, groups=2, dtype=np.float16)
    fold_and_compare(model, feeds, np.float16)


@pytest.mark.parametrize(("conv_attrs", "reason"), [
    (dict(pads=[1, 1, 1, 1]), "the following Conv 'conv' pads (pads=[1, 1, 1, 1]): zero padding would see t, not 0"),
    (dict(auto_pad="SAME_UPPER"), "the following Conv 'conv' pads (auto_pad=SAME_UPPER): zero padding would see t, not 0"),
])
def test_padding_refuses_the_forward_fold(rng, conv_attrs, reason):
    model, feeds = bn_conv(rng, conv_attrs=conv_attrs)
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert e.reason.endswith(f"no fold into a following Conv: {reason}")


def test_never_into_a_conv_transpose(rng):
    model, feeds = bn_conv(rng, op="ConvTranspose")
    result = fold_and_compare(model, feeds, np.float32)
    assert "the following node is a ConvTranspose (never folded forward" in entry(result, "bn").reason


def test_bn_output_with_other_consumers_is_refused(rng):
    model, feeds = bn_conv(rng, extra_nodes=[helper.make_node("Relu", ["b"], ["z"], name="relu2")],
                           outputs=[vi("y", np.float32, 4), vi("z", np.float32, 4)])
    result = fold_and_compare(model, feeds, np.float32)
    assert entry(result, "bn").reason.endswith("no fold into a following Conv: its output feeds 2 nodes")


def test_bn_output_that_is_a_graph_output_is_refused(rng):
    model, feeds = bn_conv(rng, outputs=[vi("y", np.float32, 4), vi("b", np.float32, 4)])
    result = fold_and_compare(model, feeds, np.float32)
    assert entry(result, "bn").reason.endswith("no fold into a following Conv: its output is a graph output")


def test_skip_forward(rng):
    model, feeds = bn_conv(rng)
    result = fold_and_compare(model, feeds, np.float32, skip="forward")
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert e.reason.endswith("forward folding is switched off")


def test_backward_fold_is_preferred(rng):
    # Conv → BN → Conv: the BN goes into the producer, the following Conv is untouched
    names, params = bn_params(rng, C, np.float32)
    inits = [tensor("W1", rng.normal(size=(C, 2, 1, 1)).astype(np.float32)),
             tensor("W2", rng.normal(size=(3, C, 1, 1)).astype(np.float32)), *params]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"), bn_node("c", "b", names),
             helper.make_node("Conv", ["b", "W2"], ["y"], name="conv2")]
    model = make_model(nodes, [vi("x", np.float32, [1, 2, 3, 3])], [vi("y", np.float32, [1, 3, 3, 3])], inits)
    result = fold_and_compare(model, {"x": rng.normal(size=(1, 2, 3, 3)).astype(np.float32)}, np.float32)
    assert entry(result, "bn").target == "conv1"
