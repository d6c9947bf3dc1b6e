"""bnfold.passes._moments: per-channel input statistics read off a graph's BatchNormalizations."""

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold.graph import GraphIndex, NameSet, all_names
from bnfold.passes import PATTERNS
from bnfold.passes._context import FoldContext
from bnfold.passes._moments import channel_moments, clipped, max_clipped
from tests.converter import builders
from tests.ortutil import make_model


def _numeric_clip_moments(m: float, v: float, lo: float, hi: float) -> tuple[float, float]:
    """E and Var of clip(X, lo, hi), X ~ N(m, v), by quadrature on a fine grid."""
    s = math.sqrt(v)
    x = np.linspace(m - 12 * s, m + 12 * s, 400_001)
    pdf = np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    y = np.clip(x, lo, hi)
    e1 = np.trapezoid(y * pdf, x)
    e2 = np.trapezoid(y * y * pdf, x)
    return e1, e2 - e1 * e1


@pytest.mark.parametrize("lo,hi", [(0.0, math.inf), (0.0, 6.0), (-1.0, 0.5), (-math.inf, 0.0)])
def test_clipped_gaussian_moments(lo, hi):
    means = np.array([-3.0, -0.4, 0.0, 0.3, 2.0, 7.0])
    vars_ = np.array([0.5, 1.0, 2.0, 0.1, 4.0, 1.0])
    e, v = clipped(means, vars_, lo, hi)
    for i in range(len(means)):
        ne, nv = _numeric_clip_moments(means[i], vars_[i], lo, hi)
        assert e[i] == pytest.approx(ne, abs=1e-7)
        assert v[i] == pytest.approx(nv, abs=1e-7)


def test_clipped_with_zero_variance_is_the_clipped_value():
    e, v = clipped(np.array([-1.0, 0.5, 9.0]), np.zeros(3), 0.0, 6.0)
    assert np.allclose(e, [0.0, 0.5, 6.0]) and np.allclose(v, 0.0)


def _context(model) -> FoldContext:
    from bnfold.api import _LazyTypes

    ix = GraphIndex(model.graph, path="", outer=None, names=NameSet(all_names(model)), ir_version=model.ir_version,
                    inputs_as_constants=False, inferred=_LazyTypes(lambda: model))
    return FoldContext(ix, 17, frozenset(PATTERNS), rounding="compensated")


def _graph(rng, *, consistent: bool = True):
    """x → BN0 → Relu → MaxPool → Conv(1x1, 8→12) → BN1 → Add(skip = Clip(BN0 out, 0, 6) ...)."""
    c, c2 = 8, 12
    p0 = {"scale": rng.uniform(0.5, 2, c), "B": rng.normal(0, 1, c), "mean": rng.normal(0, 1, c),
          "var": rng.uniform(0.5, 2, c)}
    w = rng.normal(0, 0.3, (c2, c, 1, 1))
    b = rng.normal(0, 0.1, c2)
    mu_pool = rng.uniform(0.5, 2.0, c)  # what the MaxPool output's mean "is"
    mean1 = w[:, :, 0, 0] @ mu_pool + b if consistent else rng.normal(0, 1, c2)
    p1 = {"scale": rng.uniform(0.5, 2, c2), "B": rng.normal(0, 1, c2), "mean": mean1, "var": rng.uniform(0.5, 2, c2)}
    bn0, i0 = builders.bn_node("bn0", "x", "h0", c, rng, np.float32, params=p0, epsilon=1e-5)
    bn1, i1 = builders.bn_node("bn1", "h3", "y", c2, rng, np.float32, params=p1, epsilon=1e-5)
    lo = builders.tensor("lo", np.array(0.0), np.float32)
    hi = builders.tensor("hi", np.array(6.0), np.float32)
    two = builders.tensor("two", np.array(2.0), np.float32)
    nodes = [bn0, helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("MaxPool", ["h1"], ["h2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["h2", "conv.W", "conv.b"], ["h3"]), bn1,
             helper.make_node("Clip", ["h0", "lo", "hi"], ["c1"]),
             helper.make_node("Mul", ["c1", "two"], ["c2"]),
             helper.make_node("Add", ["c2", "h1"], ["z"])]
    inits = i0 + i1 + [builders.tensor("conv.W", w, np.float32), builders.tensor("conv.b", b, np.float32),
                       lo, hi, two]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c2, 2, 2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 4, 4])]
    return make_model(nodes, [x], outs, inits), p0, mu_pool


def test_moments_propagate_from_batchnorm_statistics(rng):
    model, p0, mu_pool = _graph(rng)
    table = channel_moments(_context(model))
    assert np.allclose(table["x"][0], p0["mean"]) and np.allclose(table["x"][1], p0["var"])  # BN input: E, Var
    assert np.allclose(table["h0"][0], p0["B"]) and np.allclose(table["h0"][1], p0["scale"] ** 2)  # β, γ²
    relu = clipped(p0["B"], p0["scale"] ** 2, 0.0, math.inf)
    assert np.allclose(table["h1"][0], relu[0]) and np.allclose(table["h1"][1], relu[1])
    clip = clipped(p0["B"], p0["scale"] ** 2, 0.0, 6.0)
    assert np.allclose(table["c2"][0], 2 * clip[0]) and np.allclose(table["c2"][1], 4 * clip[1])
    assert np.allclose(table["z"][0], 2 * clip[0] + relu[0]) and np.allclose(table["z"][1], 4 * clip[1] + relu[1])
    # MaxPool: the mean is solved from the Conv → BN1 that reads it (the statistics are
    # consistent); the variance is that of the max of 4 independent relu(N(β0, γ0²))
    assert np.allclose(table["h2"][0], mu_pool)
    assert np.allclose(table["h2"][1], max_clipped(p0["B"], p0["scale"] ** 2, 4, 0.0, math.inf)[1])


def test_inconsistent_statistics_are_not_used(rng):
    model, p0, _ = _graph(rng, consistent=False)
    table = channel_moments(_context(model))
    # 12 equations, 8 unknowns, no solution: the MaxPool's own estimate stands
    expected = max_clipped(p0["B"], p0["scale"] ** 2, 4, 0.0, math.inf)
    assert np.allclose(table["h2"][0], expected[0]) and np.allclose(table["h2"][1], expected[1])


def test_moments_are_computed_only_for_a_half_precision_fold(rng):
    from bnfold.passes._moments import input_stats

    model, _, _ = _graph(rng)
    ctx = _context(model)
    assert input_stats(ctx, "h2", np.arange(8), None, np.float32) is None and ctx.moments is None
    stats = input_stats(ctx, "h2", np.arange(8), None, np.float16)
    assert ctx.moments is not None and np.allclose(stats.mean, ctx.moments["h2"][0])
