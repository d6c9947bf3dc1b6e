"""onnx's own light_* test models (installed with onnx) fold with their outputs unchanged.

The models (opset 9, IR version 3: every initializer is also a graph input, which IR < 4
makes a constant) keep their Conv weights behind ConstantOfShape nodes that fill every weight
with 0.02, so as shipped every channel of a conv is the same function and the softmax output
is nearly uniform (std ~1e-10): a wrong fold could hide there. Each model is therefore checked
twice:

* as shipped — the BN count, the report, the checker, outputs vs the unfolded model;
* "randomized" — every ConstantOfShape replaced by a seeded random initializer of the same
  shape (He-scaled conv weights, variances in [0.5, 2]), with the Softmax input exposed as an
  extra graph output, so the comparison sees channel-distinct, unsaturated logits.

Expected BN counts (before → after) and why:

* light_resnet50: 53 → 0, every BN directly follows a Conv whose output has no other consumer.
* light_inception_v2: 69 → 0, every BN follows a Conv and is followed by a Caffe2-style
  per-channel Mul → Add (constants Unsqueeze'd to [C,1,1]): BN, Mul and Add all fold.
* light_shufflenet: 49 → 0, every BN follows a (grouped) Conv.
* light_densenet121: 121 → 0: 59 BNs follow a Conv and fold (with their Mul → Add); 62 follow
  a Concat (58), AveragePool (3) or MaxPool (1) and are followed by Mul, not a Conv, so nothing
  can absorb them: rewritten as Mul + Add.

Tolerance: deep float32 networks compound the per-layer rounding differences, so outputs
are compared at 1e-4 × max|unfolded output| (test_matrix's single-layer float32 bound is 1e-5).
Inputs: the bundled shape [1, 3, 224, 224], seeded standard normal. Each model is loaded,
folded and run once per module.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.report import Action
from tests.converter.test_matrix import count, fold
from tests.ortutil import run

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
DEEP_TOL = 1e-4

# model → (BN before, BN after, BN folded into a Conv, BN rewritten as Mul+Add)
EXPECTED = {
    "light_resnet50": (53, 0, 53, 0),
    "light_densenet121": (121, 0, 59, 62),
    "light_inception_v2": (69, 0, 69, 0),
    "light_shufflenet": (49, 0, 49, 0),
}
SUMMARY: dict[str, str] = {}


def data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    (x,) = [i for i in model.graph.input if i.name not in inits]
    return x


def _roles(graph: onnx.GraphProto) -> dict[str, str]:
    """What each tensor is used as: "weight", "var", "scale" or "shift" (looking through Unsqueeze)."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def role(name: str) -> str:
        for node, i in consumers.get(name, []):
            if node.op_type in ("Conv", "Gemm") and i == 1:
                return "weight"
            if node.op_type == "BatchNormalization" and i > 0:
                return {1: "scale", 2: "shift", 3: "shift", 4: "var"}[i]
            if node.op_type == "Mul":
                return "scale"
            if node.op_type == "Unsqueeze":
                return role(node.output[0])
        return "shift"

    return {name: role(name) for name in consumers}


def randomized(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace each ConstantOfShape by a random initializer; expose the Softmax input as an output."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    roles = _roles(g)
    keep = []
    for node in g.node:
        if node.op_type != "ConstantOfShape":
            keep.append(node)
            continue
        shape = tuple(int(v) for v in shapes[node.input[0]])
        name = node.output[0]
        role = roles.get(name, "shift")
        if role == "weight":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif role == "var":
            value = rng.uniform(0.5, 2.0, shape)
        elif role == "scale":
            value = rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < 0.2, -1, 1)
        else:
            value = rng.normal(0, 0.1, shape)
        t = numpy_helper.from_array(value.astype(np.float32), name)
        g.initializer.append(t)
        g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))  # IR 3: inits are inputs
    del g.node[:]
    g.node.extend(keep)
    for node in g.node:
        if node.op_type == "Softmax":
            g.output.append(helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return out


@pytest.fixture(scope="module", params=list(EXPECTED))
def light(request):
    """(name, model, feeds, fold result, unfolded outputs, folded outputs) for the shipped model."""
    name = request.param
    model = onnx.load(os.path.join(LIGHT, f"{name}.onnx"))
    x = data_input(model)
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    feeds = {x.name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    result = fold(model)
    return name, model, feeds, result, run(model, feeds), run(result.model, feeds)


def _max_error(ref, got) -> tuple[float, float]:
    err = max(float(np.max(np.abs(g.astype(np.float64) - r))) for r, g in zip(ref, got))
    scale = max(float(np.max(np.abs(r))) for r in ref)
    return err, scale


def test_bn_counts_before_and_after(light):
    name, model, _, result, _, _ = light
    before, after, into_conv, rewritten = EXPECTED[name]
    assert count(model, "BatchNormalization") == before
    assert count(result.model, "BatchNormalization") == after
    bns = [e for e in result.report.entries if e.op_type == "BatchNormalization"]
    assert len(bns) == before
    folded = [e for e in bns if e.action is Action.FOLDED]
    assert len(folded) == into_conv and all(e.target_kind == "Conv" for e in folded)
    assert len([e for e in bns if e.action is Action.REWRITTEN]) == rewritten
    assert not [e for e in bns if e.action is Action.KEPT]
    for e in bns:
        if e.action is Action.REWRITTEN:
            assert e.target_kind == "Mul+Add" and e.reason, e


def test_caffe2_mul_add_chains_fold_with_their_bn(light):
    """Wherever a BN folded into a Conv, its Mul → Add followers folded into that Conv too."""
    name, model, _, result, _, _ = light
    folded_into = {e.node: e.target for e in result.report.entries if e.action is Action.FOLDED}
    chain = [e for e in result.report.entries if e.op_type in ("Mul", "Add")]
    if name in ("light_inception_v2", "light_densenet121"):
        per_bn = EXPECTED[name][2]
        assert len([e for e in chain if e.action is Action.FOLDED]) == 2 * per_bn
        assert all(e.target_kind == "Conv" for e in chain if e.action is Action.FOLDED)
    if name == "light_inception_v2":
        assert count(result.model, "Mul") == 0 and count(result.model, "Add") == 0
    assert set(folded_into.values()) <= {n.name for n in result.model.graph.node} | {None}


def test_outputs_unchanged(light):
    name, _, _, result, ref, got = light
    err, scale = _max_error(ref, got)
    SUMMARY[name] = (f"BN {EXPECTED[name][0]} → {count(result.model, 'BatchNormalization')}, "
                     f"nodes {result.report.nodes_before} → {result.report.nodes_after}, max abs err {err:.3g} "
                     f"(max|out| {scale:.3g})")
    assert err <= DEEP_TOL * scale, f"{name}: {err:.3g} > {DEEP_TOL} × {scale:.3g}"


def test_folded_model_is_valid_ir3(light):
    _, model, _, result, _, _ = light
    assert result.model.ir_version == model.ir_version == 3
    onnx.checker.check_model(result.model, full_check=True)
    inputs = {i.name for i in result.model.graph.input}
    assert all(t.name in inputs for t in result.model.graph.initializer), "IR 3 needs every initializer as input"
    assert result.report.nodes_after < result.report.nodes_before


def test_randomized_weights_outputs_unchanged(light):
    name, model, feeds, _, _, _ = light
    rmodel = randomized(model)
    result = bnfold.fold(rmodel)
    before, after = EXPECTED[name][:2]
    assert count(result.model, "BatchNormalization") == after
    ref, got = run(rmodel, feeds), run(result.model, feeds)
    err, scale = _max_error(ref, got)
    SUMMARY[name + " (randomized)"] = f"max abs err {err:.3g} (max|logit| {scale:.3g})"
    assert np.std(ref[-1]) > 1e-3 * scale, "the randomized logits should not be constant"
    assert err <= DEEP_TOL * scale, f"{name} randomized: {err:.3g} > {DEEP_TOL} × {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\nlight models:", *(f"\n  {k}: {v}" for k, v in SUMMARY.items()))
