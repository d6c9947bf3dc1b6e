"""Graph handling and preconditions of ``bnfold.fold`` / ``bnfold.fold_file``.

Constants (initializers, Constant nodes, constant expressions), initializers that are also
graph inputs (onnxruntime's rule: constant when ir_version < 4, overridable otherwise),
subgraphs of If / Loop / Scan, model-local functions, symbolic dims, external data, what a
fold must preserve (checker, names, doc strings, metadata, opsets, IR version, the input
object), and every precondition that must stop a fold — each with the reason it must give.
Outputs are compared in onnxruntime (ORT_DISABLE_ALL), float32, against the unfolded model
with the float32 tolerance of test_matrix (1e-5 × max|output|).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import Action
from tests.converter import builders as B
from tests.converter.test_matrix import const, count, entry, fold, node_named
from tests.ortutil import make_model, run

F32 = TensorProto.FLOAT


def assert_same_outputs(before, after, feeds, *, tol=1e-5):
    ref, got = run(before, feeds), run(after, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        scale = max(float(np.max(np.abs(r))), 1e-30)
        err = float(np.max(np.abs(g.astype(np.float64) - r)))
        assert err <= tol * scale, f"max |folded - unfolded| = {err:.3g} > {tol:g} × {scale:.3g}"


def all_node_inputs(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= all_node_inputs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    names |= all_node_inputs(g)
    return names


# --- constants ----------------------------------------------------------------------------------

def test_constant_nodes_as_weights_and_bn_params():
    """Every parameter comes from a Constant node instead of an initializer."""
    model, feeds = B.conv_bn(2, 2, True, np.float32, 17)
    consts = []
    for t in list(model.graph.initializer):
        consts.append(helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    del model.graph.initializer[:]
    model.graph.node.insert(0, consts[0])
    for c in consts[1:]:
        model.graph.node.insert(0, c)
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    assert count(result.model, "BatchNormalization") == 0
    assert_same_outputs(model, result.model, feeds)


@pytest.mark.parametrize("opset", [9, 17])
def test_constant_expressions_as_params(opset):
    """BN params / Conv weight / chain constants behind ConstantOfShape, Identity, Reshape, Unsqueeze."""
    rng = np.random.default_rng(5)
    c = 4
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32), "w_raw"),
             numpy_helper.from_array(rng.uniform(0.5, 2, (1, c)).astype(np.float32), "scale_2d"),
             numpy_helper.from_array(np.array([c], dtype=np.int64), "c_shape"),
             numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "bias_raw"),
             numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "mean_raw"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "mul_raw"),
             numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "add_raw")]
    unsq_axes = {"axes": [1, 2]} if opset < 13 else {}
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"))
    ax = ["axes12"] if opset >= 13 else []
    nodes = [
        helper.make_node("Identity", ["w_raw"], ["w"], name="w_identity"),
        helper.make_node("Reshape", ["scale_2d", "c_shape"], ["scale"], name="scale_reshape"),
        helper.make_node("Identity", ["bias_raw"], ["bias"], name="bias_identity"),
        helper.make_node("Identity", ["mean_raw"], ["mean"], name="mean_identity"),
        helper.make_node("ConstantOfShape", ["c_shape"], ["var"], name="var_fill",
                         value=numpy_helper.from_array(np.array([0.7], dtype=np.float32))),
        helper.make_node("Unsqueeze", ["mul_raw"] + ax, ["mul_c"], name="mul_unsqueeze", **unsq_axes),
        helper.make_node("Unsqueeze", ["add_raw"] + ax, ["add_c"], name="add_unsqueeze", **unsq_axes),
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", "scale", "bias", "mean", "var"], ["hn"], name="bn",
                         epsilon=1e-3),
        helper.make_node("Mul", ["hn", "mul_c"], ["hm"], name="mul"),
        helper.make_node("Add", ["hm", "add_c"], ["y"], name="add"),
    ]
    x = rng.normal(0, 1, (2, 3, 5, 5)).astype(np.float32)
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3, 5, 5])],
                       [helper.make_tensor_value_info("y", F32, [2, c, 5, 5])], inits, opset=opset)
    result = fold(model)
    for name in ("bn", "mul", "add"):
        e = entry(result.report, name)
        assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    assert {"BatchNormalization", "Mul", "Add"}.isdisjoint(n.op_type for n in result.model.graph.node)
    assert_same_outputs(model, result.model, {"x": x})


# --- initializers that are graph inputs ---------------------------------------------------------

@pytest.mark.parametrize("which", ["conv.W", "bn.mean"])
def test_initializer_also_graph_input_is_overridable_from_ir4(which):
    model, feeds = B.initializer_as_input(which, opset=9)
    assert model.ir_version >= 4
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert which in e.reason and re.search(r"graph input|overrid", e.reason, re.I), e.reason
    if which == "bn.mean":
        assert e.action is Action.KEPT, "a BN whose mean can be overridden cannot be rewritten either"
    assert which in {i.name for i in result.model.graph.input}, "an overridable input must stay an input"
    assert_same_outputs(model, result.model, feeds)
    # overriding the input must still work and give the same answer in both models
    override = {which: (const(model, which) * 1.5).astype(np.float32)}
    assert_same_outputs(model, result.model, {**feeds, **override})


@pytest.mark.parametrize("which", ["conv.W", "bn.mean"])
def test_initializer_also_graph_input_folded_with_inputs_as_constants(which):
    model, feeds = B.initializer_as_input(which, opset=9)
    result = fold(model, inputs_as_constants=True)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    assert_same_outputs(model, result.model, feeds)


def test_ir3_initializers_listed_as_inputs_are_constants():
    model, feeds = B.initializer_as_input("all", ir_version=3, opset=8)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    assert result.model.ir_version == 3
    onnx.checker.check_model(result.model, full_check=True)  # IR 3: every initializer still an input
    assert_same_outputs(model, result.model, feeds)


# --- preconditions ------------------------------------------------------------------------------

def test_producer_with_another_consumer_is_not_folded_into():
    model, feeds = B.conv_bn_shared_producer("consumer")
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert re.search(r"also feeds|consumer|used by|fan.?out", e.reason, re.I), e.reason
    assert set(e.consumers) == set() and e.producer == "conv"
    np.testing.assert_array_equal(const(result.model, node_named(result.model, "conv").input[1]),
                                  const(model, "conv.W"))
    assert_same_outputs(model, result.model, feeds)  # both y and the Relu output z


def test_producer_output_that_is_a_graph_output_is_not_folded_into():
    model, feeds = B.conv_bn_shared_producer("graph_output")
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    # the clause about the producer (clauses are ';'-separated), not the BN's own output
    assert re.search(r"(producer|conv)[^;]*graph output", e.reason, re.I), e.reason
    assert [o.name for o in result.model.graph.output] == ["y", "h"]
    assert_same_outputs(model, result.model, feeds)  # including the extra output h


@pytest.mark.parametrize("share_bias", [True, False], ids=["W_and_b_shared", "W_shared"])
def test_weight_shared_by_two_convs_is_copied(share_bias):
    model, feeds = B.shared_weight_convs(share_bias=share_bias)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    conv1, conv2 = node_named(result.model, "conv"), node_named(result.model, "conv2")
    assert conv1.input[1] != conv2.input[1], "conv and conv2 still share the (now scaled) weight"
    np.testing.assert_array_equal(const(result.model, conv2.input[1]), const(model, "conv.W"))
    if share_bias:
        np.testing.assert_array_equal(const(result.model, conv2.input[2]), const(model, "conv.b"))
    assert_same_outputs(model, result.model, feeds)  # z = conv2 output unchanged


def test_bn_then_conv_with_padding_is_not_forward_folded():
    model, feeds = B.bn_conv(pads=[1, 1, 1, 1])
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert re.search(r"pad", e.reason, re.I), e.reason
    np.testing.assert_array_equal(const(result.model, "conv.W"), const(model, "conv.W"))
    assert_same_outputs(model, result.model, feeds)


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_then_convtranspose_is_never_forward_folded(groups):
    model, feeds = B.bn_conv(groups=groups, following="ConvTranspose")
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert re.search(r"ConvTranspose", e.reason), e.reason
    np.testing.assert_array_equal(const(result.model, "conv.W"), const(model, "conv.W"))
    assert_same_outputs(model, result.model, feeds)


def test_bn_output_with_two_consumers_is_not_forward_folded():
    model, feeds = B.bn_conv()
    model.graph.node.append(helper.make_node("Relu", ["h"], ["z"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("z", F32, [2, 4, 6, 6]))
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert set(e.consumers) == {"conv", "relu"}
    np.testing.assert_array_equal(const(result.model, "conv.W"), const(model, "conv.W"))
    assert_same_outputs(model, result.model, feeds)


def test_non_constant_bn_parameter_is_kept():
    model, feeds = B.bn_param_input()
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target) == (Action.KEPT, None), e
    assert "gamma" in e.reason and re.search(r"constant|graph input", e.reason, re.I), e.reason
    assert count(result.model, "BatchNormalization") == 1
    assert_same_outputs(model, result.model, feeds)
    assert_same_outputs(model, result.model, {**feeds, "gamma": feeds["gamma"] * -2})


# --- subgraphs and functions --------------------------------------------------------------------

def _conv_bn_subgraph(name: str, rng, *, x: str = "x", y: str = "y"):
    """Nodes + initializers of Conv(name.conv) → BN(name.bn) reading ``x`` (the caller puts the
    initializers in the subgraph, or in the main graph to make them outer-scope values)."""
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), f"{name}.W")
    bn, bn_inits = B.bn_node(f"{name}.bn", f"{name}.h", y, 4, rng, np.float32)
    conv = helper.make_node("Conv", [x, w.name], [f"{name}.h"], name=f"{name}.conv", pads=[1, 1, 1, 1])
    return [conv, bn], [w] + bn_inits


def _entries_in(report, fragment: str):
    return [e for e in report.entries if fragment in e.graph]


def test_if_branches_are_folded():
    rng = np.random.default_rng(11)
    then_nodes, then_inits = _conv_bn_subgraph("then", rng, y="then_y")
    else_nodes, else_inits = _conv_bn_subgraph("else", rng, y="else_y")
    out = helper.make_tensor_value_info
    then_g = helper.make_graph(then_nodes, "then_g", [], [out("then_y", F32, [2, 4, 6, 6])], then_inits)
    else_g = helper.make_graph(else_nodes, "else_g", [], [out("else_y", F32, [2, 4, 6, 6])], else_inits)
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    model = make_model([node], [out("x", F32, [2, 3, 6, 6]), out("cond", TensorProto.BOOL, [])],
                       [out("y", F32, [2, 4, 6, 6])], opset=17)
    result = fold(model)
    found = {e.node: e for e in result.report.entries}
    for branch in ("then", "else"):
        e = found[f"{branch}.bn"]
        assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", f"{branch}.conv"), e
        assert f"{branch}_branch" in e.graph and "if" in e.graph, e.graph
    assert "BatchNormalization" not in str(result.model.graph)
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"x": x, "cond": np.array(cond)})


def test_loop_body_with_outer_scope_weights_is_folded():
    """Loop body Conv+BN whose parameters are main-graph initializers (outer scope)."""
    rng = np.random.default_rng(12)
    nodes, inits = _conv_bn_subgraph("body", rng, y="bn_y")
    out = helper.make_tensor_value_info
    body_nodes = nodes + [helper.make_node("Add", ["v_in", "bn_y"], ["v_out"], name="body.acc"),
                          helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body.cond")]
    body = helper.make_graph(body_nodes, "body",
                             [out("i", TensorProto.INT64, []), out("cond_in", TensorProto.BOOL, []),
                              out("v_in", F32, [2, 4, 6, 6])],
                             [out("cond_out", TensorProto.BOOL, []), out("v_out", F32, [2, 4, 6, 6])])
    inits += [numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "true"),
              numpy_helper.from_array(np.zeros((2, 4, 6, 6), np.float32), "v0")]
    loop = helper.make_node("Loop", ["trips", "true", "v0"], ["y"], name="loop", body=body)
    model = make_model([loop], [out("x", F32, [2, 3, 6, 6])], [out("y", F32, [2, 4, 6, 6])], inits, opset=17)
    result = fold(model)
    e = entry(result.report, "body.bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "body.conv"), e
    assert "loop" in e.graph and "body" in e.graph, e.graph
    assert "BatchNormalization" not in str(result.model.graph)
    assert_same_outputs(model, result.model, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)})


def test_scan_body_is_folded():
    rng = np.random.default_rng(13)
    nodes, inits = _conv_bn_subgraph("body", rng, x="xs", y="ys")
    out = helper.make_tensor_value_info
    body = helper.make_graph(nodes, "body", [out("xs", F32, [1, 3, 6, 6])], [out("ys", F32, [1, 4, 6, 6])], inits)
    scan = helper.make_node("Scan", ["seq"], ["y"], name="scan", body=body, num_scan_inputs=1)
    model = make_model([scan], [out("seq", F32, [3, 1, 3, 6, 6])], [out("y", F32, [3, 1, 4, 6, 6])], opset=17)
    result = fold(model)
    e = entry(result.report, "body.bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "body.conv"), e
    assert "scan" in e.graph, e.graph
    assert "BatchNormalization" not in str(result.model.graph)
    assert_same_outputs(model, result.model, {"seq": rng.normal(0, 1, (3, 1, 3, 6, 6)).astype(np.float32)})


def test_model_local_function_is_folded():
    """A function local.ConvBN whose weights are Constant nodes in its body."""
    rng = np.random.default_rng(14)
    nodes, inits = _conv_bn_subgraph("fn", rng, x="fx", y="fy")
    body = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in inits] + nodes
    func = helper.make_function("local", "ConvBN", ["fx"], ["fy"], body,
                                opset_imports=[helper.make_opsetid("", 17)])
    out = helper.make_tensor_value_info
    call = helper.make_node("ConvBN", ["x"], ["y"], name="call", domain="local")
    model = make_model([call], [out("x", F32, [2, 3, 6, 6])], [out("y", F32, [2, 4, 6, 6])], opset=17,
                       functions=[func], extra_opsets=[helper.make_opsetid("local", 1)])
    result = fold(model)
    e = entry(result.report, "fn.bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "fn.conv"), e
    assert e.graph == "function:local.ConvBN", e.graph
    assert all(n.op_type != "BatchNormalization" for n in result.model.functions[0].node)
    assert_same_outputs(model, result.model, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)})


# --- shapes, files, preservation ----------------------------------------------------------------

def test_symbolic_batch_dimension():
    model, feeds = B.conv_bn(2, 2, True, np.float32, 17, batch="N")
    result = fold(model)
    assert entry(result.report, "bn").action is Action.FOLDED
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert result.model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    rng = np.random.default_rng(15)
    for n in (1, 5):
        assert_same_outputs(model, result.model, {"x": rng.normal(0, 1, (n, 4, 7, 7)).astype(np.float32)})


def test_external_data_model_through_fold_file(tmp_path):
    model, feeds = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)  # 4.6 kB of weights
    ref = run(model, feeds)[0]  # before save_model turns the in-memory tensors into external references
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
                    size_threshold=1024)
    src_bytes = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    result = bnfold.fold_file(src, dst)
    assert entry(result.report, "bn").action is Action.FOLDED
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == src_bytes, "the input files changed"
    saved = onnx.load(dst, load_external_data=False)
    external = [t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external, "the folded weights are no longer external"
    for t in saved.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                assert (dst.parent / kv.value).is_file()
    assert dst.stat().st_size < 4096, "the weights were inlined into the model file"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])  # resolves the external data
    np.testing.assert_allclose(sess.run(None, feeds)[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_fold_file_refuses_to_overwrite_its_input_unless_in_place(tmp_path):
    model, feeds = B.conv_bn()
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src)
    before = src.read_bytes()
    with pytest.raises(bnfold.OutputError):
        bnfold.fold_file(src, src)
    assert src.read_bytes() == before
    bnfold.fold_file(src, src, in_place=True)
    folded = onnx.load(src)
    assert count(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, feeds)


def test_fold_accepts_a_path(tmp_path):
    model, feeds = B.conv_bn()
    onnx.save_model(model, tmp_path / "m.onnx")
    result = bnfold.fold(str(tmp_path / "m.onnx"))
    assert entry(result.report, "bn").action is Action.FOLDED
    assert_same_outputs(model, result.model, feeds)


def test_names_docs_metadata_opsets_survive_and_ir_not_raised():
    model, feeds = B.conv_bn(2, 1, True, np.float32, 15)
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.producer_name, model.producer_version = "unit-test", "1.2.3"
    model.domain, model.model_version = "org.example", 7
    onnx.helper.set_model_props(model, {"author": "tester", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    node_named(model, "conv").doc_string = "conv doc"
    model.graph.input[0].doc_string = "input doc"
    ir = model.ir_version
    result = fold(model)
    m = result.model
    assert (m.doc_string, m.graph.doc_string, m.producer_name, m.producer_version, m.domain, m.model_version) == \
        ("model doc", "graph doc", "unit-test", "1.2.3", "org.example", 7)
    assert {p.key: p.value for p in m.metadata_props} == {"author": "tester", "license": "MIT"}
    assert {(o.domain, o.version) for o in m.opset_import} == {(o.domain, o.version) for o in model.opset_import}
    assert m.ir_version == ir
    assert m.graph.name == model.graph.name
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["y"]
    assert m.graph.input[0].doc_string == "input doc"
    assert node_named(m, "conv").doc_string == "conv doc"


def test_unused_initializers_are_removed():
    model, _ = B.mixed_patterns()
    result = fold(model)
    used = all_node_inputs(result.model.graph)
    unused = [t.name for t in result.model.graph.initializer if t.name not in used]
    assert unused == [], f"initializers left unused: {unused}"
    for name in ("bn_conv.scale", "bn_conv.B", "bn_conv.mean", "bn_conv.var"):
        assert name not in {t.name for t in result.model.graph.initializer}


def test_input_model_not_mutated_on_any_path():
    """Folded, rewritten, kept and copied-weight paths in one go: the input proto stays byte-identical."""
    for model, _ in (B.mixed_patterns(), B.relu_bn(), B.shared_weight_convs(), B.bn_param_input(),
                     B.conv_bn_mul_add(np.float32, 17)):
        before = model.SerializeToString()
        bnfold.fold(model)
        assert model.SerializeToString() == before


def test_public_api_reexports():
    from bnfold import report
    for name in ("fold", "fold_file", "FoldResult", "FoldReport", "NodeReport", "Action"):
        assert name in bnfold.__all__ and hasattr(bnfold, name), name
    assert bnfold.Action is report.Action and bnfold.FoldResult is report.FoldResult


def test_report_to_dict_is_json_ready():
    import json
    model, _ = B.mixed_patterns()
    d = bnfold.fold(model, skip=("gemm",)).report.to_dict()
    back = json.loads(json.dumps(d))
    assert back["counts"]["found"] == 3 and back["counts"]["folded"] == 2 and back["counts"]["rewritten"] == 1
    actions = {e["node"]: e["action"] for e in back["entries"]}
    assert actions == {"bn_conv": "folded", "bn_gemm": "rewritten", "bn_fwd": "folded"}


# --- scopes: uses hidden inside subgraphs -------------------------------------------------------

def _with_if(model: onnx.ModelProto, then_nodes, else_nodes) -> onnx.ModelProto:
    """``model`` plus If(cond) → z [2,4,6,6] whose branches read outer-scope values."""
    out = helper.make_tensor_value_info
    then_g = helper.make_graph(then_nodes, "then_g", [], [out("t_y", F32, [2, 4, 6, 6])])
    else_g = helper.make_graph(else_nodes, "else_g", [], [out("e_y", F32, [2, 4, 6, 6])])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g,
                                             else_branch=else_g))
    model.graph.input.append(out("cond", TensorProto.BOOL, []))
    model.graph.output.append(out("z", F32, [2, 4, 6, 6]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch_conv(name: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", "conv.W"], [y], name=name, pads=[1, 1, 1, 1])


def test_producer_output_read_by_a_subgraph_is_not_folded_into():
    """h (the Conv output) is also read by the else branch: not folded into, outputs unchanged."""
    model, feeds = B.conv_bn(2, 1, False, np.float32, 17, c_in=3, c_out=4, size=6, pads=[1, 1, 1, 1])
    model = _with_if(model, [_branch_conv("then.conv", "t_y")],
                     [helper.make_node("Relu", ["h"], ["e_y"], name="else.relu")])
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, "h is still read by the else branch"
    for cond in (True, False):
        assert_same_outputs(model, result.model, {**feeds, "cond": np.array(cond)})


def test_weight_read_by_a_subgraph_is_copied_not_scaled():
    """conv.W is also read by Convs inside both If branches: the fold must copy it."""
    model, feeds = B.conv_bn(2, 1, False, np.float32, 17, c_in=3, c_out=4, size=6, pads=[1, 1, 1, 1])
    model = _with_if(model, [_branch_conv("then.conv", "t_y")], [_branch_conv("else.conv", "e_y")])
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "Conv", "conv"), e
    for cond in (True, False):
        assert_same_outputs(model, result.model, {**feeds, "cond": np.array(cond)})


def test_bn_in_branch_after_outer_conv_is_not_folded_across_scopes():
    """The BN lives in a branch, its producer Conv in the main graph (whose output the other branch uses)."""
    rng = np.random.default_rng(23)
    out = helper.make_tensor_value_info
    bn, bn_inits = B.bn_node("then.bn", "h", "t_y", 4, rng, np.float32)
    then_g = helper.make_graph([bn], "then_g", [], [out("t_y", F32, [2, 4, 6, 6])], bn_inits)
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["e_y"], name="else.relu")], "else_g", [],
                               [out("e_y", F32, [2, 4, 6, 6])])
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "conv.W")
    nodes = [helper.make_node("Conv", ["x", "conv.W"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [out("x", F32, [2, 3, 6, 6]), out("cond", TensorProto.BOOL, [])],
                       [out("y", F32, [2, 4, 6, 6])], [w], opset=17)
    result = fold(model)
    e = entry(result.report, "then.bn")
    assert e.action is not Action.FOLDED or e.target != "conv", e
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"x": x, "cond": np.array(cond)})


def test_function_whose_weight_is_a_formal_input_is_not_folded():
    rng = np.random.default_rng(24)
    bn, bn_inits = B.bn_node("fn.bn", "fh", "fy", 4, rng, np.float32)
    body = [helper.make_node("Constant", [], [t.name], value=t) for t in bn_inits] + [
        helper.make_node("Conv", ["fx", "fw"], ["fh"], name="fn.conv", pads=[1, 1, 1, 1]), bn]
    func = helper.make_function("local", "ConvBN", ["fx", "fw"], ["fy"], body,
                                opset_imports=[helper.make_opsetid("", 17)])
    out = helper.make_tensor_value_info
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W")
    model = make_model([helper.make_node("ConvBN", ["x", "W"], ["y"], name="call", domain="local")],
                       [out("x", F32, [2, 3, 6, 6])], [out("y", F32, [2, 4, 6, 6])], [w], opset=17,
                       functions=[func], extra_opsets=[helper.make_opsetid("local", 1)])
    result = fold(model)
    e = entry(result.report, "fn.bn")
    assert e.action is not Action.FOLDED, e
    assert "fw" in e.reason and re.search(r"constant|input", e.reason, re.I), e.reason
    assert_same_outputs(model, result.model, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)})
