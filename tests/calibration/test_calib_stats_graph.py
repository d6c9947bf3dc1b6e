"""The statistics graph: each BN's population statistics equal the NumPy reference's
PopulationStats of its input as the network sees it in training-mode normalization."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.calibration.graph import build_stats_model, find_batchnorms
from bnfold.reference import PopulationStats
from tests.calibration._models import bn_stats, chain_batches, chain_oracle, constant, single_bn, two_bn_chain
from tests.ortutil import run

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_chain_precise_bn_matches_reference_population_stats():
    model, p = two_bn_chain()
    batches = chain_batches()
    first, second = chain_oracle(p, batches)
    result = bnfold.calibrate(model, batches)
    for name, oracle in (("bn1", first), ("bn2", second)):
        ours = result.stats.stats[name]
        assert (ours.num_batches, ours.count) == (5, oracle.count)
        # float32 activations (onnxruntime) vs the float64 oracle: float32 rounding of h only
        np.testing.assert_allclose(ours.mean, oracle.mean, rtol=1e-5, atol=1e-5 * np.abs(oracle.mean).max())
        np.testing.assert_allclose(ours.var, oracle.var, rtol=1e-5)
        mean, var = bn_stats(result.model, name)
        assert mean.dtype == var.dtype == np.float32
        np.testing.assert_array_equal(mean, ours.mean.astype(np.float32))
        np.testing.assert_array_equal(var, ours.var.astype(np.float32))
    # bn2's statistics depend on bn1 normalizing with batch statistics: with bn1's stale stored
    # statistics instead, bn2's input would differ by far more than the tolerance above.
    stale = PopulationStats(4)
    w2, b2 = p["w2"].astype(np.float32).astype(np.float64), p["b2"].astype(np.float32).astype(np.float64)
    for b in batches:
        h1 = run(_prefix(model, "r1"), b)[0].astype(np.float64)
        stale.update(np.einsum("oc,nchw->nohw", w2, h1) + b2[None, :, None, None])
    assert np.max(np.abs(stale.mean - second.mean)) > 100 * 1e-5 * np.abs(second.mean).max()
    # the model says which estimator produced its statistics (SPEC §2)
    assert {p.key: p.value for p in result.model.metadata_props}["bnfold.statistics"] == (
        f"Ioffe & Szegedy Algorithm 2 (precise BN, unbiased m/(m-1)) by bnfold calibrate over 5 batches, "
        f"{first.count} values per channel")


def _prefix(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return out


@pytest.mark.parametrize("opset", [7, 9, 14, 17, 18, 22])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_single_bn_equals_population_stats_of_the_data(opset, rank, rng):
    model = single_bn(rank=rank, opset=opset)
    shape = lambda n: (n, 3) + (5,) * (rank - 2)  # noqa: E731
    batches = [{"x": (rng.normal(0, 1, shape(n)) * 3 - 2).astype(np.float32)} for n in (2, 3, 5, 4)]
    oracle = PopulationStats(3)
    for b in batches:
        oracle.update(b["x"])
    result = bnfold.calibrate(model, batches)
    ours = result.stats.stats["bn"]
    assert ours.count == oracle.count
    np.testing.assert_allclose(ours.mean, oracle.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ours.var, oracle.var, rtol=1e-13)
    mean, var = bn_stats(result.model, "bn")
    np.testing.assert_array_max_ulp(mean, oracle.mean.astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(var, oracle.var.astype(np.float32), maxulp=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, BF16], ids=["float16", "float64", "bfloat16"])
def test_dtypes_keep_the_model_dtype_and_round_once(dtype, rng):
    opset = 22 if dtype == BF16 else 17
    model = single_bn(rank=4, dtype=dtype, opset=opset, relu=False)  # no bfloat16 Relu on CPU
    batches = [{"x": (rng.normal(0, 1, (4, 3, 5, 5)) + 1).astype(dtype)} for _ in range(3)]
    oracle = PopulationStats(3)
    for b in batches:
        oracle.update(b["x"].astype(np.float64))
    result = bnfold.calibrate(model, batches)
    np.testing.assert_allclose(result.stats.stats["bn"].var, oracle.var, rtol=1e-13)
    mean, var = bn_stats(result.model, "bn")
    assert mean.dtype == var.dtype == np.dtype(dtype)
    # float64 sums in another order, then one rounding: at most 1 ULP of a narrower dtype;
    # a float64 model keeps the float64 result (summation-order differences only)
    for stored, exact in ((mean, oracle.mean), (var, oracle.var)):
        if dtype == BF16:
            np.testing.assert_allclose(stored.astype(np.float64), exact, rtol=2.0**-8)
        elif dtype == np.float64:
            np.testing.assert_allclose(stored, exact, rtol=1e-13)
        else:
            np.testing.assert_array_max_ulp(stored, exact.astype(dtype), maxulp=1)


def test_two_pass_moments_survive_a_large_mean(rng):
    # |mean| / std = 1e5: E[x²] − E[x]² in float32 would lose every digit of the variance.
    batches = [{"x": (1000.0 + 0.01 * rng.normal(0, 1, (8, 3, 5, 5))).astype(np.float32)} for _ in range(4)]
    oracle = PopulationStats(3)
    for b in batches:
        oracle.update(b["x"])
    result = bnfold.calibrate(single_bn(), batches)
    np.testing.assert_allclose(result.stats.stats["bn"].var, oracle.var, rtol=1e-9)
    assert 5e-5 < oracle.var.min() and oracle.var.max() < 2e-4


def test_rewritten_bn_normalizes_with_batch_statistics(rng):
    model = single_bn(rank=4)
    sites, _ = find_batchnorms(model, source="m")
    stats_model, sites = build_stats_model(model, sites)
    assert not any(n.op_type == "BatchNormalization" for n in stats_model.graph.node)
    x = (rng.normal(0, 1, (4, 3, 5, 5)) * 2 + 3).astype(np.float32)
    y, mean, var, shape = run(stats_model, {"x": x})
    from bnfold.reference import batch_norm_training

    p = {k: constant(model, f"bn.{k}").astype(np.float64) for k in ("scale", "B")}
    ref, ref_mean, ref_var = batch_norm_training(x.astype(np.float64), p["scale"], p["B"], 1e-3)
    np.testing.assert_allclose(y, np.maximum(ref, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean.reshape(-1), ref_mean.reshape(-1), rtol=1e-13)
    np.testing.assert_allclose(var.reshape(-1), ref_var.reshape(-1), rtol=1e-13)
    assert shape.tolist() == [4, 3, 25]


def test_shared_and_constant_node_statistics_are_copied_never_changed_under_others(rng):
    model = single_bn()
    # mean and var are one shared initializer that a second consumer (Add) also uses, and the
    # scale... stays; a Constant node feeds another BN.
    g = model.graph
    shared = numpy_helper.from_array(np.ones(3, np.float32), "shared")
    g.initializer.append(shared)
    bn = g.node[0]
    bn.input[3] = "shared"
    bn.input[4] = "shared"
    g.node.append(helper.make_node("Constant", [], ["cmean"], name="cmean_node",
                                   value=numpy_helper.from_array(np.zeros(3, np.float32), "v")))
    g.node.append(helper.make_node("BatchNormalization", ["y", "bn.scale", "bn.B", "cmean", "shared"], ["y2"],
                                   name="bn2", epsilon=1e-3))
    g.node.append(helper.make_node("Add", ["y2", "shared_b"], ["y3"], name="uses_shared"))
    g.initializer.append(numpy_helper.from_array(np.ones((3, 1, 1), np.float32), "shared_b"))
    g.output[0].name = "y3"
    onnx.checker.check_model(model, full_check=True)
    batches = [{"x": (rng.normal(0, 1, (4, 3, 5, 5)) * 2 + 3).astype(np.float32)} for _ in range(3)]
    result = bnfold.calibrate(model, batches)
    out = result.model
    m1, v1 = bn_stats(out, "bn")
    m2, v2 = bn_stats(out, "bn2")
    oracle = PopulationStats(3)
    for b in batches:
        oracle.update(b["x"])
    np.testing.assert_array_max_ulp(m1, oracle.mean.astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(v1, oracle.var.astype(np.float32), maxulp=1)
    assert len({node_input for n in out.graph.node if n.op_type == "BatchNormalization"
                for node_input in n.input[3:5]}) == 4  # four distinct constants now
    assert not np.allclose(v2, 1.0) and not np.allclose(m2, 0.0)
    assert not any(n.op_type == "Constant" for n in out.graph.node)  # replaced by an initializer
    # the input model is untouched
    assert g.node[0].input[3] == "shared"
    np.testing.assert_array_equal(constant(model, "shared"), np.ones(3, np.float32))


def test_bn_in_a_subgraph_is_skipped_with_its_reason(rng):
    model = single_bn()
    then_bn = helper.make_node("BatchNormalization", ["x", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["t"],
                               name="inner_bn")
    then_g = helper.make_graph([then_bn], "then", [], [helper.make_tensor_value_info("t", 1, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", 1, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g,
                                             else_branch=else_g))
    model.graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    model.graph.output.append(helper.make_tensor_value_info("z", 1, None))
    batches = [{"x": rng.normal(0, 1, (4, 3, 5, 5)).astype(np.float32), "cond": np.array(True)}] * 2
    result = bnfold.calibrate(model, batches)
    skipped = result.report.skipped
    assert [(s.name, s.graph) for s in skipped] == [("inner_bn", "branch/then_branch")]
    assert "inside a subgraph (branch/then_branch)" in skipped[0].skipped
    assert [layer.name for layer in result.report.calibrated] == ["bn"]
    branch = next(n for n in result.model.graph.node if n.op_type == "If")
    then_branch = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert then_branch.node[0].input[3] == "bn.mean"  # still the stored statistics...
    np.testing.assert_array_equal(constant(result.model, "bn.mean"), constant(model, "bn.mean"))
    assert bn_stats(result.model, "bn")[0].tolist() != constant(model, "bn.mean").tolist()  # ...copied for bn
