"""Conv → BN folds (passes/conv.py), checked in onnxruntime against the unfolded model, and
every precondition's refusal with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Action, fold
from bnfold import numerics as nx
from tests.converter._passutil import (
    BF16, bn_node, bn_params, bn_reference, entry, fold_and_compare, initializer, node, op_types, ref_conv, tensor, vi,
)
from tests.ortutil import make_model


def conv_bn(rng, *, dims=2, groups=1, bias=True, dtype=np.float32, opset=17, c_in=4, c_out=6, extra_nodes=(),
            outputs=None, conv_attrs=None, weight_as_input=False, bn_attrs=None, epsilon=1e-3, extra_inits=(), bn_outputs=()):
    c_out = c_in if groups == c_in else c_out
    spatial = [5, 4, 3][:dims]
    w = rng.normal(0, 0.5, (c_out, c_in // groups) + (3,) * dims).astype(dtype)
    names, params = bn_params(rng, c_out, dtype)
    inits = [] if weight_as_input else [tensor("W", w)]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(0, 0.5, c_out).astype(dtype)))
        conv_inputs.append("B")
    attrs = dict(group=groups, pads=[1] * (2 * dims)) | (conv_attrs or {})
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", **attrs),
             bn_node("c", "y", names, epsilon=epsilon, **(bn_attrs or {})), *extra_nodes]
    nodes[1].output.extend(bn_outputs)
    inputs = [vi("x", dtype, [2, c_in, *spatial])] + ([vi("W", dtype, list(w.shape))] if weight_as_input else [])
    outs = outputs or [vi("y", dtype, dims + 2)]
    model = make_model(nodes, inputs, outs, [*inits, *params, *extra_inits], opset=opset)
    feeds = {"x": rng.normal(size=(2, c_in, *spatial)).astype(dtype)}
    if weight_as_input:
        feeds["W"] = w
    return model, feeds


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])  # 4 = depthwise (c_in = 4)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_in_onnxruntime(rng, dims, groups, bias):
    model, feeds = conv_bn(rng, dims=dims, groups=groups, bias=bias)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv"]
    e = entry(result, "bn")
    assert (e.action, e.target_kind, e.target, e.reason) == (Action.FOLDED, "Conv", "conv", None)
    assert (e.producer, e.consumers) == ("conv", ())
    assert result.model.graph.output[0].name == "y"
    # W (and B) had one user: replaced in place; a missing bias is added under a new name
    expected = {"W", "B"} if bias else {"W", "conv_B_folded"}
    assert {t.name for t in result.model.graph.initializer} == expected


@pytest.mark.parametrize("opset", [7, 9, 11, 14, 15, 21, 24])
def test_conv_bn_across_opsets(rng, opset):
    model, feeds = conv_bn(rng, opset=opset)
    result = fold_and_compare(model, feeds, np.float32)
    assert result.report.counts()["folded:Conv"] == 1
    assert result.model.ir_version == model.ir_version
    assert list(result.model.opset_import) == list(model.opset_import)


@pytest.mark.parametrize("conv_attrs", [
    dict(strides=[2, 1], dilations=[1, 2], pads=[0, 2, 1, 0]),
    dict(auto_pad="SAME_UPPER", pads=None),
    dict(auto_pad="VALID", pads=None),
])
def test_conv_geometry_does_not_matter(rng, conv_attrs):
    attrs = {k: v for k, v in conv_attrs.items() if v is not None}
    model, feeds = conv_bn(rng, conv_attrs=attrs)
    if "pads" in conv_attrs and conv_attrs["pads"] is None:
        for a in list(model.graph.node[0].attribute):
            if a.name == "pads":
                model.graph.node[0].attribute.remove(a)
    assert op_types(fold_and_compare(model, feeds, np.float32).model) == ["Conv"]


def test_float16_in_onnxruntime(rng):
    model, feeds = conv_bn(rng, dtype=np.float16)
    result = fold_and_compare(model, feeds, np.float16)
    assert initializer(result.model, "W").dtype == np.float16


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_weights_are_the_float64_result_rounded_once(rng, dtype, bias):
    # onnxruntime's CPU provider has no float64/bfloat16 Conv: these dtypes are checked
    # against the float64 NumPy result instead (exact equality of the stored weights).
    model, _ = conv_bn(rng, dtype=dtype, bias=bias, epsilon=1e-2, opset=22 if dtype == BF16 else 17)  # bf16 Conv: opset 22+
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    eps = float(np.float32(1e-2))  # the attribute is a float32: fold uses exactly what is stored
    s, t = nx.bn_affine(*(inits[n] for n in ("bn_scale", "bn_bias", "bn_mean", "bn_var")), epsilon=eps)
    w64, b64 = nx.fold_conv(inits["W"], inits.get("B"), s, t)
    result = fold(model)
    conv = result.model.graph.node[0]
    w_new, b_new = initializer(result.model, conv.input[1]), initializer(result.model, conv.input[2])
    assert w_new.dtype == np.dtype(dtype) and b_new.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(w_new.astype(np.float64), nx.round_once(w64, dtype).astype(np.float64))
    np.testing.assert_array_equal(b_new.astype(np.float64), nx.round_once(b64, dtype).astype(np.float64))
    if dtype in (np.float64, BF16):
        x = rng.normal(size=(2, 4, 5, 4)).astype(dtype)
        ref = bn_reference(ref_conv(x, inits["W"], inits.get("B"), pads=[1] * 4), inits,
                           ["bn_scale", "bn_bias", "bn_mean", "bn_var"], eps)
        got = ref_conv(x, w_new, b_new, pads=[1] * 4)
        assert np.abs(ref - got).max() <= (1e-12 if dtype == np.float64 else 5e-2) * np.abs(ref).max()


def test_bn_bn_chain_folds_into_one_conv(rng):
    names2, params2 = bn_params(rng, 6, np.float32, prefix="bn2")
    model, feeds = conv_bn(rng, extra_nodes=[bn_node("y", "z", names2, name="bn2")], outputs=[vi("z", np.float32, 4)],
                           extra_inits=params2)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv"]
    assert [(e.node, e.action, e.target) for e in result.report.entries] == [
        ("bn", Action.FOLDED, "conv"), ("bn2", Action.FOLDED, "conv")]


def test_input_model_is_not_mutated_and_metadata_survives(rng):
    model, feeds = conv_bn(rng)
    model.doc_string = "doc"
    model.graph.doc_string = "graph doc"
    model.producer_name = "tests"
    helper.set_model_props(model, {"k": "v"})
    before = model.SerializeToString()
    result = fold(model)
    assert model.SerializeToString() == before
    assert (result.model.doc_string, result.model.graph.doc_string, result.model.producer_name) == (
        "doc", "graph doc", "tests")
    assert [(p.key, p.value) for p in result.model.metadata_props] == [("k", "v")]
    assert result.model.graph.name == model.graph.name and result.model.graph.node[0].name == "conv"


def test_shared_weight_is_copied_not_mutated(rng):
    model, feeds = conv_bn(rng, outputs=[vi("y", np.float32, 4), vi("c2", np.float32, 4)],
                           extra_nodes=[helper.make_node("Conv", ["x", "W", "B"], ["c2"], name="conv2", pads=[1] * 4)])
    result = fold_and_compare(model, feeds, np.float32)
    conv, conv2 = node(result.model, "conv"), node(result.model, "conv2")
    assert list(conv2.input) == ["x", "W", "B"]
    assert conv.input[1] != "W" and conv.input[2] != "B"
    np.testing.assert_array_equal(initializer(result.model, "W"), initializer(model, "W"))


def test_constant_node_and_constant_expression_parameters(rng):
    model, feeds = conv_bn(rng)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    # W as a Constant node; bn_var as Unsqueeze+Reshape of an initializer; bn_scale via Identity
    w = inits.pop("W")
    var = onnx.numpy_helper.to_array(inits.pop("bn_var"))
    consts = [
        helper.make_node("Constant", [], ["W"], value=w),
        helper.make_node("Unsqueeze", ["var_raw", "ax"], ["var_2d"]),
        helper.make_node("Reshape", ["var_2d", "shape"], ["bn_var"]),
    ]
    del g.initializer[:]
    g.initializer.extend([*inits.values(), tensor("var_raw", var), tensor("ax", np.array([0])),
                          tensor("shape", np.array([-1]))])
    nodes = [*consts, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["Conv"]  # the dead constant expressions are gone
    assert {t.name for t in result.model.graph.initializer} == {"W_folded", "B"}


# ---- refusals: each precondition, with its reason ---------------------------------------

def test_conv_output_with_another_consumer_is_not_folded_into(rng):
    model, feeds = conv_bn(rng, extra_nodes=[helper.make_node("Relu", ["c"], ["r"], name="relu")],
                           outputs=[vi("y", np.float32, 4), vi("r", np.float32, 4)])
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN and e.target_kind == "Mul+Add"
    assert e.reason.startswith("no fold into the producer: the output of Conv 'conv' also feeds ['relu']")
    assert op_types(result.model) == ["Conv", "Mul", "Add", "Relu"]


def test_conv_output_that_is_a_graph_output_is_not_folded_into(rng):
    model, feeds = conv_bn(rng, outputs=[vi("y", np.float32, 4), vi("c", np.float32, 4)])
    result = fold_and_compare(model, feeds, np.float32)
    assert "the output of Conv 'conv' is a graph output" in entry(result, "bn").reason
    assert entry(result, "bn").action is Action.REWRITTEN


def test_non_constant_weight_is_not_folded_into(rng):
    model, feeds = conv_bn(rng, weight_as_input=True)
    result = fold_and_compare(model, feeds, np.float32)
    assert "weight W of Conv 'conv' is not a constant: 'W' is a graph input" in entry(result, "bn").reason


@pytest.mark.parametrize("param", ["bn_scale", "bn_var"])
def test_non_constant_bn_parameter_is_kept(rng, param):
    model, feeds = conv_bn(rng)
    value = initializer(model, param)
    kept = [t for t in model.graph.initializer if t.name != param]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.append(vi(param, np.float32, [6]))
    feeds[param] = value
    result = fold_and_compare(model, feeds, np.float32)
    label = {"bn_scale": "scale", "bn_var": "var"}[param]
    e = entry(result, "bn")
    assert (e.action, e.reason) == (Action.KEPT, f"parameter {label} is not a constant: {param!r} is a graph input")
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def test_initializer_that_is_also_an_input_is_not_a_constant_unless_asked(rng):
    model, feeds = conv_bn(rng)
    model.graph.input.append(vi("bn_mean", np.float32, [6]))
    result = fold_and_compare(model, feeds, np.float32)
    assert entry(result, "bn").reason == (
        "parameter mean is not a constant: 'bn_mean' is an initializer that is also a graph input "
        "(overridable at run time; use inputs_as_constants to treat it as a constant)")
    result = fold_and_compare(model, feeds, np.float32, inputs_as_constants=True)
    assert entry(result, "bn").action is Action.FOLDED
    assert any(v.name == "bn_mean" for v in result.model.graph.input)  # the input stays declared


def test_initializer_inputs_are_constants_below_ir_version_4(rng):
    model, feeds = conv_bn(rng, opset=7)
    model.ir_version = 3
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    onnx.checker.check_model(model, full_check=True)
    result = fold_and_compare(model, feeds, np.float32)
    assert entry(result, "bn").action is Action.FOLDED
    assert result.model.ir_version == 3


def test_training_mode_bn_is_never_folded_even_with_unused_outputs(rng):
    # running_mean/running_var declared (the schema requires them), used by nobody
    model, feeds = conv_bn(rng, opset=15, bn_attrs=dict(training_mode=1), bn_outputs=["running_mean", "running_var"])
    result = fold(model)
    e = entry(result, "bn")
    assert e.action is Action.KEPT
    assert e.reason.startswith("training_mode=1: a training-mode BatchNormalization")
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def test_opset9_bn_with_training_outputs_is_kept(rng):
    model, feeds = conv_bn(rng, opset=9, bn_outputs=["m", "v", "sm", "sv"])
    result = fold(model)
    assert entry(result, "bn").reason.startswith("declares the training-mode outputs ['m', 'v', 'sm', 'sv'] (opset 9")
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def spatial0_model(rng, per_position: bool):
    # onnxruntime runs spatial=0 only with statistics of shape [C, H, W]
    model, feeds = conv_bn(rng, opset=7, bn_attrs=dict(spatial=0))
    g = model.graph
    for name in ("bn_scale", "bn_bias", "bn_mean", "bn_var"):
        value = np.repeat(initializer(model, name)[:, None, None], 5, axis=1).repeat(4, axis=2)
        if per_position:
            value = value * rng.uniform(0.5, 1.5, value.shape)
        idx = next(i for i, t in enumerate(g.initializer) if t.name == name)
        g.initializer[idx].CopyFrom(tensor(name, value.astype(np.float32)))
    return model, feeds


def test_spatial0_with_per_channel_statistics_folds(rng):
    model, feeds = spatial0_model(rng, per_position=False)
    result = fold_and_compare(model, feeds, np.float32)
    assert entry(result, "bn").action is Action.FOLDED
    assert op_types(result.model) == ["Conv"]


def test_spatial0_with_per_position_statistics_is_rewritten_not_crashed(rng):
    model, feeds = spatial0_model(rng, per_position=True)
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert (e.action, e.reason) == (Action.REWRITTEN, "spatial=0 with per-position statistics of shape [6, 5, 4]: "
                                                      "not a per-channel affine map, cannot fold into a neighbour")
    assert op_types(result.model) == ["Conv", "Mul", "Add"]
    result = fold(model, keep_unfoldable=True)
    assert entry(result, "bn").action is Action.KEPT


def test_float16_overflow_is_refused_with_a_reason(rng):
    model, feeds = conv_bn(rng, dtype=np.float16)
    idx = next(i for i, t in enumerate(model.graph.initializer) if t.name == "bn_var")
    model.graph.initializer[idx].CopyFrom(tensor("bn_var", np.full(6, 1e-7, np.float16)))
    idx = next(i for i, t in enumerate(model.graph.initializer) if t.name == "bn_scale")
    model.graph.initializer[idx].CopyFrom(tensor("bn_scale", np.full(6, 60000, np.float16)))
    result = fold(model, keep_unfoldable=True)
    e = entry(result, "bn")
    assert e.action is Action.KEPT
    assert "folded weights of Conv 'conv' would overflow float16" in e.reason


def test_float16_flush_to_subnormal_is_refused_with_a_reason(rng):
    model, feeds = conv_bn(rng, dtype=np.float16)
    idx = next(i for i, t in enumerate(model.graph.initializer) if t.name == "bn_scale")
    model.graph.initializer[idx].CopyFrom(tensor("bn_scale", np.array([1, 1, 1e-7, 1, 1, 1], np.float16)))
    result = fold(model, skip="rewrite")
    assert "folded weights of Conv 'conv' of output channel 2 would flush to zero/subnormal in float16" in \
        entry(result, "bn").reason


def test_skip_conv_rewrites_instead(rng):
    model, feeds = conv_bn(rng)
    result = fold_and_compare(model, feeds, np.float32, skip="conv")
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert e.reason.startswith("no fold into the producer: folding into Conv is switched off (pattern 'conv')")


def test_value_info_of_removed_tensors_is_dropped(rng):
    model, feeds = conv_bn(rng, extra_nodes=[helper.make_node("Relu", ["y"], ["z"], name="relu")],
                           outputs=[vi("z", np.float32, 4)])
    model = onnx.shape_inference.infer_shapes(model)
    assert {v.name for v in model.graph.value_info} == {"c", "y"}
    result = fold_and_compare(model, feeds, np.float32)
    assert {v.name for v in result.model.graph.value_info} == {"y"}
