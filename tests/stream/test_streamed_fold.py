"""``fold_file`` on the streamed path (``bnfold.stream``) writes what ``fold`` computes.

Every case saves a model, folds it with ``bnfold.fold`` (in memory) and with
``bnfold.fold_file`` (memory-mapped, streamed), and requires the same report and the same
model: byte for byte for one-file outputs, tensor for tensor (and the rest of the proto
equal) for external-data outputs. ``tiny`` runs make every tensor with raw data a
placeholder, so the small test models exercise the splicing of every tensor.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold.stream import source as source_mod
from tests.converter import builders as B
from tests.converter._passutil import bn_node, bn_params, tensor, vi
from tests.converter.test_light_models import LIGHT, randomized
from tests.converter.test_pass_subgraphs import if_model
from tests.ortutil import make_model, run
from tests.stream._compare import assert_streamed_equals_fold, save


@pytest.fixture(params=["default", "tiny"])
def threshold(request, monkeypatch):
    if request.param == "tiny":
        monkeypatch.setattr(source_mod, "MIN_PLACEHOLDER_BYTES", 1)
    return request.param


def _check(model, tmp_path, *, external=False, **options):
    src = save(model, tmp_path / "src" / "m.onnx", external=external, threshold=0 if external else 1024)
    dst = tmp_path / "out" / "m.folded.onnx"
    dst.parent.mkdir(exist_ok=True)
    return assert_streamed_equals_fold(src, dst, **options)


BUILDERS = {
    "conv2d": lambda: B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16),
    "conv3d-grouped": lambda: B.conv_bn(3, 2, False, np.float32, 17),
    "convtranspose-grouped": lambda: B.convtranspose_bn(2, 2, True, np.float32, 17),
    "gemm": lambda: B.gemm_bn(trans_b=1),
    "matmul-add": lambda: B.matmul_bn(with_add=True),
    "conv-bn-bn": lambda: B.conv_bn_bn(),
    "chain": lambda: B.conv_bn_mul_add(),
    "forward": lambda: B.bn_conv(),
    "rewrite": lambda: B.relu_bn(),
    "shared-weight": lambda: B.shared_weight_convs(),
    "mixed": lambda: B.mixed_patterns(),
    "fp16": lambda: B.conv_bn(2, 1, True, np.float16, 17, c_in=8, c_out=16),
    "fp16-mixed": lambda: B.mixed_patterns(np.float16),
    "bf16": lambda: B.conv_bn(2, 1, True, ml_dtypes.bfloat16, 22, c_in=8, c_out=16),
    "bf16-ties": lambda: B.bf16_near_ties(),
    "fp64": lambda: B.conv_bn(2, 1, True, np.float64, 17),
    "ir3-initializers-as-inputs": lambda: B.initializer_as_input("all", ir_version=3),
    "initializer-as-input": lambda: B.initializer_as_input("conv.W"),
}


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders(name, external, threshold, tmp_path):
    model, _ = BUILDERS[name]()
    _check(model, tmp_path, external=external)


def test_options_pass_through(threshold, tmp_path):
    model, _ = B.mixed_patterns()
    _check(model, tmp_path, skip="gemm,forward", keep_unfoldable=True)
    _check(model, tmp_path / "b", only="conv", inputs_as_constants=True)


def _loop_model(rng):
    c = 3
    names, params = bn_params(rng, c, np.float32)
    body = helper.make_graph(
        [helper.make_node("Conv", ["v_in", "W"], ["c"], name="body_conv"), bn_node("c", "v_out", names, name="body_bn"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []), vi("v_in", np.float32, [1, c, 2, 2])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []), vi("v_out", np.float32, [1, c, 2, 2])])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)]
    inits = [tensor("W", (rng.normal(size=(c, c, 1, 1)) * 0.5).astype(np.float32)), tensor("n", np.array(3)), *params]
    return make_model(nodes, [vi("x", np.float32, [1, c, 2, 2])], [vi("y", np.float32, [1, c, 2, 2])], inits)


def _function_model(rng):
    c = 3
    names, params = bn_params(rng, c, np.float32)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in
              [tensor("W", rng.normal(size=(c, 2, 1, 1)).astype(np.float32)), *params]]
    body = [*consts, helper.make_node("Conv", ["fx", "W"], ["c"], name="f_conv"), bn_node("c", "fy", names, name="f_bn")]
    function = helper.make_function("local", "ConvBN", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)])
    return make_model([helper.make_node("ConvBN", ["x"], ["y"], domain="local", name="call")],
                      [vi("x", np.float32, [1, 2, 3, 3])], [vi("y", np.float32, [1, c, 3, 3])],
                      functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])


def _constant_nodes_model():
    """conv_bn with every initializer turned into a Constant node of the main graph."""
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_const") for t in model.graph.initializer]
    nodes = consts + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external"])
@pytest.mark.parametrize("kind", ["if", "loop", "function", "constant-nodes"])
def test_subgraphs_functions_constant_nodes(kind, external, threshold, tmp_path):
    rng = np.random.default_rng(5)
    model = {"if": lambda: if_model(rng), "loop": lambda: _loop_model(rng), "function": lambda: _function_model(rng),
             "constant-nodes": _constant_nodes_model}[kind]()
    _check(model, tmp_path, external=external)


@pytest.mark.parametrize("name", ["light_resnet50", "light_densenet121", "light_inception_v2"])
def test_onnx_light_models(name, tmp_path):
    model = onnx.load(os.path.join(LIGHT, f"{name}.onnx"))
    _check(model, tmp_path)
    model = randomized(model)  # real initializers, IR 3 (initializers are inputs)
    for output in model.graph.output:
        output.type.tensor_type.shape.SetInParent()  # the checker fold_file runs wants the field
    _check(model, tmp_path / "randomized")


ZOO = ["resnet", "mobilenet", "mlp", "decoder", "conv3d", "preact"]


@pytest.fixture(scope="module")
def zoo():
    from models.build import ensure_built

    return {b.name: b for b in ensure_built(ZOO)}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models(name, zoo, tmp_path):
    built = zoo[name]
    model = onnx.load(built.onnx_path)
    _check(model, tmp_path)
    if name in ("resnet", "decoder"):
        result = _check(model, tmp_path / "ext", external=True)
        # the external-data output runs in onnxruntime and matches the unfolded model
        inputs = np.load(built.inputs_path)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.input}
        feeds = {k: inputs[k][0] if inputs[k].ndim > ranks[k] else inputs[k] for k in inputs.files}
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        folded = ort.InferenceSession(str(result.output), opts, providers=["CPUExecutionProvider"]).run(None, feeds)
        ref = run(onnx.load(built.onnx_path), feeds)  # save() moved model's tensors out
        for a, b in zip(ref, folded):
            assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(a))))
