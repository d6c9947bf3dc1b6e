"""Every fold pattern × dtype × opset, end to end through ``bnfold.fold`` and its report.

For each case: the BN count drops as expected, the report entry names the right action,
target kind and target node, the folded weights are the float64 fold of the *stored*
parameters rounded once to the model's dtype (computed here, independently of
``bnfold.numerics``), and the folded model computes what the unfolded one does.

How outputs are compared (folded vs unfolded, same runtime, same inputs)::

    dtype      tolerance (× max|unfolded output|)   why
    float64    1e-12                                 float64 kernels; ~4500 ε, sums of ≤ 108 terms
    float32    1e-5                                  ~84 ε: the unfolded model rounds conv→BN twice
    float16    1e-2                                  ~10 ε: onnxruntime rounds each fp16 op's output
    bfloat16   6e-2                                  ~8 ε (ε = 2⁻⁷)

and, against the float64 truth (``refeval`` on the unfolded model's stored numbers), the
folded model's error may exceed the unfolded model's own error by at most a factor 4 plus
2 ε·max|truth| (the one rounding of W', b' that folding adds).

Runtime: onnxruntime CPU with ORT_DISABLE_ALL wherever it has the kernels; otherwise the
float64 evaluator ``refeval`` on the stored numbers (test ids end in ``-refeval``):
bfloat16 (no bfloat16 Conv/Gemm/MatMul/BN/Mul/Add kernel on CPU) and float64 Conv /
ConvTranspose (no double kernel). bfloat16 Conv needs opset ≥ 22 (Conv-22 added it).
Opsets: 7, 9, 14, 15 (BN's schema versions) and 26, the newest onnxruntime 1.31 loads
(onnx 1.23 defines 28; one case runs there on ``refeval``).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.report import Action
from tests.converter import builders as B
from tests.converter import refeval
from tests.ortutil import run

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 6e-2}
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
NO_ORT_KERNEL = {("float64", "Conv"), ("float64", "ConvTranspose")}

# (dtype, opset) spread; bfloat16 exists for these ops from opset 13/14 (Conv: 22).
DTYPE_OPSETS = [("float32", 7), ("float32", 9), ("float32", 14), ("float32", 15), ("float32", 26),
                ("float16", 9), ("float16", 15), ("float16", 26),
                ("float64", 7), ("float64", 14), ("float64", 26),
                ("bfloat16", 22), ("bfloat16", 26)]

# The largest output error seen per dtype (folded vs unfolded, relative to max|output|): for the report.
LARGEST_ERROR: dict[str, float] = {}
# The largest distance of a folded weight/bias from the exact float64 fold, in ULPs, per dtype.
LARGEST_ULP: dict[str, float] = {}


# --- helpers ------------------------------------------------------------------------------------

def runtime_for(model: onnx.ModelProto, dtype: str) -> str:
    ops = {n.op_type for n in model.graph.node}
    if dtype == "bfloat16" or any((dtype, op) in NO_ORT_KERNEL for op in ops):
        return "refeval"
    return "ort"


def evaluate(model, feeds, runtime) -> list[np.ndarray]:
    if runtime == "ort":
        return [refeval.to_float64(a) for a in run(model, feeds)]
    return refeval.evaluate(model, feeds)


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def entry(report, node: str):
    found = [e for e in report.entries if e.node == node]
    assert len(found) == 1, f"{node!r} in report: {[e.node for e in report.entries]}"
    return found[0]


def node_named(model, name: str) -> onnx.NodeProto:
    found = [n for n in model.graph.node if n.name == name]
    assert len(found) == 1, f"node {name!r} in {[n.name for n in model.graph.node]}"
    return found[0]


def const(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The stored value of a constant tensor: an initializer or a Constant node's output."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(helper.get_attribute_value(n.attribute[0]))
    raise AssertionError(f"{name!r} is not a constant of the folded model")


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def bn_affine(model: onnx.ModelProto, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """s, t of BN node ``bn`` in float64 from its stored parameters (independent of bnfold)."""
    node = node_named(model, bn)
    scale, bias, mean, var = (refeval.to_float64(const(model, i)) for i in node.input[1:5])
    eps = attr(node, "epsilon", 1e-5)
    s = scale / np.sqrt(var + np.float64(eps))
    return s, bias - s * mean


def fold(model: onnx.ModelProto, **options):
    """``bnfold.fold`` plus the invariants every result must hold."""
    before = model.SerializeToString()
    result = bnfold.fold(model, **options)
    assert model.SerializeToString() == before, "fold() mutated its input model"
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.ir_version <= model.ir_version
    return result


def check_outputs(before, after, feeds, dtype: str, runtime: str) -> float:
    """Folded vs unfolded within TOL[dtype]; folded no worse than unfolded vs float64 truth."""
    ref = evaluate(before, feeds, runtime)
    got = evaluate(after, feeds, runtime)
    truth = refeval.evaluate(before, feeds)
    worst = 0.0
    for r, g, t in zip(ref, got, truth):
        assert g.shape == r.shape
        scale = max(float(np.max(np.abs(r))), 1e-30)
        err = float(np.max(np.abs(g - r)))
        assert np.all(np.isfinite(g)), "folded output has NaN/inf"
        assert err <= TOL[dtype] * scale, \
            f"{dtype}: max |folded - unfolded| = {err:.3g} > {TOL[dtype]:g} × {scale:.3g}"
        err_unfolded = float(np.max(np.abs(r - t)))
        err_folded = float(np.max(np.abs(g - t)))
        bound = 4 * err_unfolded + 2 * EPS[dtype] * float(np.max(np.abs(t)))
        assert err_folded <= bound, \
            f"folded error vs float64 {err_folded:.3g} > {bound:.3g} (unfolded {err_unfolded:.3g})"
        worst = max(worst, err / scale)
    LARGEST_ERROR[dtype] = max(LARGEST_ERROR.get(dtype, 0.0), worst)
    return worst


def assert_folded(report, bn: str, kind: str, target: str):
    e = entry(report, bn)
    assert (e.action, e.target_kind, e.target, e.reason) == (Action.FOLDED, kind, target, None), e
    assert e.graph == ""


def assert_once(stored: np.ndarray, exact: np.ndarray, dtype: str):
    """``stored`` is ``exact`` (float64) rounded once to ``dtype``: at most half an ULP away."""
    assert B.DTYPES[dtype] == stored.dtype, f"folded tensor has dtype {stored.dtype}, model is {dtype}"
    if dtype == "float64":
        # float64 is the arithmetic itself: only evaluation order differs, and b' = s·b + t may
        # cancel, so bound the difference by the tensor's magnitude instead of per-element ULPs.
        diff = float(np.max(np.abs(stored - exact), initial=0.0))
        assert diff <= 1e-13 * float(np.max(np.abs(exact), initial=0.0)), f"float64 fold off by {diff:.3g}"
        return
    err = refeval.rounding_error_in_ulp(stored, exact, dtype)
    LARGEST_ULP[dtype] = max(LARGEST_ULP.get(dtype, 0.0), err)
    # 1e-7 ULP covers the float64 noise of `exact` itself (< 1e-16 relative ≈ 2e-9 float32 ULP)
    assert err <= 0.5 + 1e-7, f"folded values are {err:.3f} ULP from the float64 fold (allowed 0.5)"


@pytest.fixture(scope="module", autouse=True)
def _largest_error_summary():
    yield
    print("\nlargest folded-vs-unfolded error per dtype (× max|output|):",
          {k: f"{v:.3g}" for k, v in sorted(LARGEST_ERROR.items())},
          "\nlargest folded-weight rounding error per dtype (ULP):",
          {k: f"{v:.4f}" for k, v in sorted(LARGEST_ULP.items())})


def case_id(dtype: str, opset: int, *ops: str) -> str:
    """Test id naming the runtime that will evaluate a model of these ops in this dtype."""
    runtime = "refeval" if dtype == "bfloat16" or any((dtype, op) in NO_ORT_KERNEL for op in ops) else "ort"
    return f"{dtype}-op{opset}-{runtime}"


# --- Conv ---------------------------------------------------------------------------------------

GEOMETRY = {
    "plain": {},
    "strided": {"strides": 2, "dilations": 2, "pads": "asym"},
    "same_upper": {"auto_pad": "SAME_UPPER", "strides": 2},
    "same_lower": {"auto_pad": "SAME_LOWER", "strides": 2},
    "valid": {"auto_pad": "VALID"},
}


def conv_kwargs(dims: int, geometry: str) -> dict:
    g = GEOMETRY[geometry]
    kw = {}
    if "strides" in g:
        kw["strides"] = [g["strides"]] * dims
    if "dilations" in g:
        kw["dilations"] = [g["dilations"]] * dims
    if g.get("pads") == "asym":
        kw["pads"] = [1] * dims + [2] * dims
    if "auto_pad" in g:
        kw["auto_pad"] = g["auto_pad"]
    return kw


def check_conv_fold(model, feeds, dtype: str, *, bn="bn", target="conv"):
    result = fold(model)
    assert count(model, "BatchNormalization") == 1 and count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, bn, "Conv", target)
    assert entry(result.report, bn).producer == target
    assert (result.report.nodes_before, result.report.nodes_after) == (2, 1)
    conv = node_named(result.model, target)
    assert conv.op_type == "Conv" and len(conv.input) == 3, "the folded Conv needs a bias"
    s, t = bn_affine(model, bn)
    old = node_named(model, target)
    w = refeval.to_float64(const(model, old.input[1]))
    b = refeval.to_float64(const(model, old.input[2])) if len(old.input) > 2 and old.input[2] else np.zeros(len(s))
    assert_once(const(result.model, conv.input[1]), w * s.reshape(-1, *[1] * (w.ndim - 1)), dtype)
    assert_once(const(result.model, conv.input[2]), s * b + t, dtype)
    for name in ("group", "strides", "dilations", "pads", "auto_pad", "kernel_shape"):
        assert attr(conv, name) == attr(old, name), f"Conv attribute {name} changed"
    return check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geometry", list(GEOMETRY))
@pytest.mark.parametrize("groups", [1, 2, "depthwise"], ids=["g1", "g2", "dw"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_geometry_float32(dims, groups, geometry, bias):
    model, feeds = B.conv_bn(dims, groups, bias, np.float32, 17, **conv_kwargs(dims, geometry),
                             size=5 if dims == 3 else 7)
    check_conv_fold(model, feeds, "float32")


CONV_DTYPE_CASES = [(dt, op, dims, groups, bias) for dt, op in DTYPE_OPSETS
                    for dims, groups, bias in [(2, 2, True), (1, "depthwise", False), (3, 1, True)]
                    if not (dt == "bfloat16" and op < 22)]


@pytest.mark.parametrize("dtype,opset,dims,groups,bias", [
    pytest.param(*c, id=f"{case_id(c[0], c[1], 'Conv')}-{c[2]}d-g{c[3]}-{'bias' if c[4] else 'nobias'}")
    for c in CONV_DTYPE_CASES])
def test_conv_dtype_opset(dtype, opset, dims, groups, bias):
    kw = conv_kwargs(dims, "strided") if opset < 11 else conv_kwargs(dims, "same_upper")
    model, feeds = B.conv_bn(dims, groups, bias, B.DTYPES[dtype], opset, **kw, size=5 if dims == 3 else 7)
    check_conv_fold(model, feeds, dtype)


def test_conv_bn15_mixed_dtypes_float16_data_float32_params():
    """BN-15 lets scale/B and mean/var be float32 under float16 data: fold still rounds once to fp16."""
    model, feeds = B.conv_bn(2, 1, True, np.float16, 15, param_dtype=np.float32)
    check_conv_fold(model, feeds, "float16")


def test_conv_default_epsilon_is_1e_5():
    """No epsilon attribute: 1e-5 must be used (variance ~1e-3 makes a wrong ε visible)."""
    rng = np.random.default_rng(3)
    model, feeds = B.conv_bn(2, 1, True, np.float32, 14, epsilon=None, rng=rng)
    for t in model.graph.initializer:
        if t.name == "bn.var":
            t.CopyFrom(numpy_helper.from_array(rng.uniform(5e-4, 2e-3, 6).astype(np.float32), "bn.var"))
    check_conv_fold(model, feeds, "float32")


def test_conv_newest_onnx_opset_on_refeval():
    """Opset 28 (newest onnx 1.23 defines; onnxruntime 1.31 stops at 26): fold, check, evaluate in refeval."""
    newest = onnx.defs.onnx_opset_version()
    model, feeds = B.conv_bn(2, 2, True, np.float32, 26)
    model.opset_import[0].version = newest
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    assert_folded(result.report, "bn", "Conv", "conv")
    assert result.model.opset_import[0].version == newest
    ref, got = refeval.evaluate(model, feeds), refeval.evaluate(result.model, feeds)
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=TOL["float32"] * np.abs(ref[0]).max())


def test_bfloat16_rounds_once_next_to_ties():
    """float64 → float32 → bfloat16 rounds twice and lands on the wrong side of these ties."""
    model, feeds = B.bf16_near_ties()
    result = fold(model)
    assert_folded(result.report, "bn", "Conv", "conv")
    s, _ = bn_affine(model, "bn")
    exact = refeval.to_float64(const(model, "conv.W")) * s[:, None, None, None]
    stored = refeval.to_float64(const(result.model, node_named(result.model, "conv").input[1]))
    twice = refeval.to_float64(exact.astype(np.float32).astype(B.BF16))
    assert np.all(twice != stored), "these values are the double-rounded ones"
    assert_once(const(result.model, node_named(result.model, "conv").input[1]), exact, "bfloat16")


# --- ConvTranspose ------------------------------------------------------------------------------

CONVT_GEOMETRY = {
    "plain": lambda d: {},
    "stride2_outpad1_pads": lambda d: {"strides": [2] * d, "output_padding": [1] * d, "pads": [1] * d + [0] * d},
    "stride3_dil2_outpad2": lambda d: {"strides": [3] * d, "dilations": [2] * d, "output_padding": [2] * d},
}


def check_convtranspose_fold(model, feeds, dtype: str):
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, "bn", "ConvTranspose", "convt")
    node = node_named(result.model, "convt")
    old = node_named(model, "convt")
    s, t = bn_affine(model, "bn")
    w = refeval.to_float64(const(model, old.input[1]))
    groups = attr(old, "group", 1)
    c_in, c_out_g = w.shape[:2]
    # output channel of W[i, j]: o = (i // (C_in/g))·(C_out/g) + j
    o = (np.arange(c_in)[:, None] // (c_in // groups)) * c_out_g + np.arange(c_out_g)[None, :]
    w_exact = w * s[o].reshape(c_in, c_out_g, *[1] * (w.ndim - 2))
    b = refeval.to_float64(const(model, old.input[2])) if len(old.input) > 2 and old.input[2] else np.zeros(len(s))
    assert_once(const(result.model, node.input[1]), w_exact, dtype)
    assert_once(const(result.model, node.input[2]), s * b + t, dtype)
    for name in ("group", "strides", "dilations", "pads", "output_padding"):
        assert attr(node, name) == attr(old, name), f"ConvTranspose attribute {name} changed"
    return check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geometry", list(CONVT_GEOMETRY))
@pytest.mark.parametrize("groups", [1, 2, "depthwise"], ids=["g1", "g2", "dw"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_convtranspose_float32(dims, groups, geometry, bias):
    kw = CONVT_GEOMETRY[geometry](dims)
    c = {"c_in": 4, "c_out": 4, "groups": 4} if groups == "depthwise" else {"c_in": 4, "c_out": 6, "groups": groups}
    model, feeds = B.convtranspose_bn(dims, bias=bias, dtype=np.float32, opset=17, **kw, **c,
                                      size=3 if dims == 3 else 5)
    check_convtranspose_fold(model, feeds, "float32")


@pytest.mark.parametrize("dtype,opset", [pytest.param(dt, op, id=case_id(dt, op, "ConvTranspose"))
                                         for dt, op in DTYPE_OPSETS if not (dt == "bfloat16" and op < 22)])
def test_convtranspose_dtype_opset(dtype, opset):
    """Grouped (g=2, C_in=4 → C_out=6), strided, output_padding: where other tools go wrong."""
    model, feeds = B.convtranspose_bn(2, 2, True, B.DTYPES[dtype], opset, strides=[2, 2], output_padding=[1, 1],
                                      pads=[1, 0, 0, 1])
    check_convtranspose_fold(model, feeds, dtype)


# --- Gemm ---------------------------------------------------------------------------------------

def check_gemm_fold(model, feeds, dtype: str):
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, "bn", "Gemm", "gemm")
    old, new = node_named(model, "gemm"), node_named(result.model, "gemm")
    s, t = bn_affine(model, "bn")
    alpha, beta = attr(old, "alpha", 1.0), attr(old, "beta", 1.0)
    alpha2, beta2 = attr(new, "alpha", 1.0), attr(new, "beta", 1.0)
    assert attr(new, "transA", 0) == attr(old, "transA", 0)
    b_old = refeval.to_float64(const(model, old.input[1]))
    trans_b = attr(old, "transB", 0)
    b_scaled = b_old * (s[:, None] if trans_b else s[None, :]) * (alpha / alpha2)
    b_new = const(result.model, new.input[1])
    if attr(new, "transB", 0) != trans_b:
        b_scaled = b_scaled.T
    assert_once(b_new, b_scaled, dtype)
    # effective bias beta2·C' must be s·(beta·C − E) + β = s·beta·C + t, broadcast like C
    m = feeds["a"].shape[1 if attr(old, "transA", 0) else 0]
    c_old = refeval.to_float64(const(model, old.input[2])) if len(old.input) > 2 and old.input[2] else np.zeros(())
    exact = s * beta * np.broadcast_to(c_old, (m, len(s))) + t
    assert len(new.input) > 2 and new.input[2], "folded Gemm needs a C"
    c_new = const(result.model, new.input[2])
    if c_old.ndim == 2 and c_old.shape[0] == m and m > 1:
        assert c_new.shape == (m, len(s)), "an [M,F] bias must stay [M,F]"
    exact_shaped = exact[: c_new.shape[0]] if c_new.ndim == 2 else exact[0]
    assert_once(c_new, exact_shaped / beta2, dtype)
    return check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


GEMM_COMBOS = list(itertools.product([1.0, 0.7], [1.0, 1.3], [0, 1], [0, 1], [None, "scalar", "F", "1F", "MF"]))


@pytest.mark.parametrize("alpha,beta,trans_a,trans_b,c", [
    pytest.param(*c, id=f"a{c[0]}-b{c[1]}-tA{c[2]}-tB{c[3]}-C{c[4]}") for c in GEMM_COMBOS])
def test_gemm_float32(alpha, beta, trans_a, trans_b, c):
    model, feeds = B.gemm_bn(alpha, beta, trans_a, trans_b, c, np.float32, 17)
    check_gemm_fold(model, feeds, "float32")


@pytest.mark.parametrize("dtype,opset,combo", [
    pytest.param(dt, op, combo, id=f"{case_id(dt, op, 'Gemm')}-{'-'.join(map(str, combo))}")
    for dt, op in DTYPE_OPSETS if not (dt == "bfloat16" and op < 14)
    for combo in [(0.7, 1.3, 1, 1, "MF"), (1.0, 1.0, 0, 0, "F"), (1.0, 0.5, 0, 1, "scalar")]
    + ([(0.7, 1.0, 1, 0, None)] if op >= 11 else [])])
def test_gemm_dtype_opset(dtype, opset, combo):
    model, feeds = B.gemm_bn(*combo, dtype=B.DTYPES[dtype], opset=opset)
    check_gemm_fold(model, feeds, dtype)


# --- MatMul -------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_add", [False, True], ids=["matmul", "matmul_add"])
@pytest.mark.parametrize("dtype,opset", [pytest.param(dt, op, id=case_id(dt, op, "MatMul"))
                                         for dt, op in DTYPE_OPSETS if not (dt == "bfloat16" and op < 14)])
def test_matmul(dtype, opset, with_add):
    model, feeds = B.matmul_bn(with_add, B.DTYPES[dtype], opset)
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, "bn", "MatMul", "matmul")
    s, t = bn_affine(model, "bn")
    new = node_named(result.model, "matmul")
    w = refeval.to_float64(const(model, "matmul.W"))
    assert_once(const(result.model, new.input[1]), w * s[None, :], dtype)
    # the bias now lives in the Add that consumes the MatMul output
    adds = [n for n in result.model.graph.node if n.op_type == "Add" and new.output[0] in n.input]
    assert len(adds) == 1, "MatMul fold needs exactly one bias Add after the MatMul"
    bias_name = next(i for i in adds[0].input if i != new.output[0])
    b = refeval.to_float64(const(model, "bias.b")) if with_add else np.zeros(len(s))
    assert_once(const(result.model, bias_name).reshape(-1), s * b + t, dtype)
    check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


# --- chains -------------------------------------------------------------------------------------

CHAIN_CASES = [("float32", 9), ("float32", 14), ("float16", 15), ("float64", 26), ("bfloat16", 26)]


def _chain_id(dt, op):
    return case_id(dt, op, "Conv")


@pytest.mark.parametrize("dtype,opset", [pytest.param(*c, id=_chain_id(*c)) for c in CHAIN_CASES])
def test_conv_bn_bn(dtype, opset):
    model, feeds = B.conv_bn_bn(B.DTYPES[dtype], opset)
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, "bn1", "Conv", "conv")
    assert_folded(result.report, "bn2", "Conv", "conv")
    s1, t1 = bn_affine(model, "bn1")
    s2, t2 = bn_affine(model, "bn2")
    w, b = (refeval.to_float64(const(model, n)) for n in ("conv.W", "conv.b"))
    conv = node_named(result.model, "conv")
    # composed in float64, y = s2·(s1·h + t1) + t2, then rounded once (not once per fold)
    assert_once(const(result.model, conv.input[1]), w * (s1 * s2)[:, None, None, None], dtype)
    assert_once(const(result.model, conv.input[2]), s2 * (s1 * b + t1) + t2, dtype)
    check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


@pytest.mark.parametrize("with_bn", [True, False], ids=["bn_mul_add", "mul_add_alone"])
@pytest.mark.parametrize("const_shape", [(4, 1, 1), (1, 4, 1, 1)], ids=["C11", "1C11"])
@pytest.mark.parametrize("dtype,opset", [pytest.param(*c, id=_chain_id(*c)) for c in CHAIN_CASES])
def test_conv_mul_add_chain(dtype, opset, const_shape, with_bn):
    """Caffe2 style Conv → BN → Mul(c) → Add(c): every node of the chain folds into the Conv."""
    model, feeds = B.conv_bn_mul_add(B.DTYPES[dtype], opset, with_bn=with_bn, const_shape=const_shape)
    result = fold(model)
    for name, op in ([("bn", "BatchNormalization")] if with_bn else []) + [("mul", "Mul"), ("add", "Add")]:
        e = entry(result.report, name)
        assert (e.op_type, e.action, e.target_kind, e.target) == (op, Action.FOLDED, "Conv", "conv"), e
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    s, t = bn_affine(model, "bn") if with_bn else (np.ones(4), np.zeros(4))
    mul = refeval.to_float64(const(model, "mul.c")).reshape(-1)
    add = refeval.to_float64(const(model, "add.c")).reshape(-1)
    w, b = (refeval.to_float64(const(model, n)) for n in ("conv.W", "conv.b"))
    conv = node_named(result.model, "conv")
    assert_once(const(result.model, conv.input[1]), w * (s * mul)[:, None, None, None], dtype)
    assert_once(const(result.model, conv.input[2]), mul * (s * b + t) + add, dtype)
    check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


@pytest.mark.parametrize("ops", [("Mul",), ("Add",)], ids=["mul", "add"])
def test_single_per_channel_op_after_conv(ops):
    model, feeds = B.conv_bn_mul_add(np.float32, 17, with_bn=False, ops=ops)
    result = fold(model)
    e = entry(result.report, ops[0].lower())
    assert (e.op_type, e.action, e.target_kind, e.target) == (ops[0], Action.FOLDED, "Conv", "conv")
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    check_outputs(model, result.model, feeds, "float32", "ort")


# --- forward fold: BN → Conv --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "dw"])
@pytest.mark.parametrize("dtype,opset", [pytest.param(*c, id=_chain_id(*c)) for c in
                                         [("float32", 7), ("float32", 15), ("float16", 26), ("float64", 14),
                                          ("bfloat16", 22)]])
def test_forward_fold_into_following_conv(dtype, opset, groups, bias):
    c_out = 4 if groups == 4 else 6
    model, feeds = B.bn_conv(B.DTYPES[dtype], opset, groups=groups, c_out=c_out, bias=bias)
    result = fold(model)
    assert count(result.model, "BatchNormalization") == 0
    assert_folded(result.report, "bn", "Conv (following)", "conv")
    s, t = bn_affine(model, "bn")
    w = refeval.to_float64(const(model, "conv.W"))
    b = refeval.to_float64(const(model, "conv.b")) if bias else np.zeros(c_out)
    c_in_g = w.shape[1]
    # global input channel of local channel j in output o's group: c = (o // (C_out/g))·(C_in/g) + j
    c = (np.arange(c_out)[:, None] // (c_out // groups)) * c_in_g + np.arange(c_in_g)[None, :]
    conv = node_named(result.model, "conv")
    assert_once(const(result.model, conv.input[1]), w * s[c][:, :, None, None], dtype)
    assert_once(const(result.model, conv.input[2]), b + np.einsum("ojhw,oj->o", w, t[c]), dtype)
    check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


# --- rewrite: BN with nothing to fold into ------------------------------------------------------

@pytest.mark.parametrize("dtype,opset", [pytest.param(*c, id=case_id(*c, "BatchNormalization")) for c in
                                         [("float32", 7), ("float32", 14), ("float16", 26), ("float64", 15),
                                          ("bfloat16", 26)]])
def test_bn_after_relu_rewritten_as_mul_add(dtype, opset):
    model, feeds = B.relu_bn(B.DTYPES[dtype], opset)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.REWRITTEN, "Mul+Add", None)
    assert e.producer == "relu"
    assert re.search(r"relu|producer|fold", e.reason, re.I), e.reason
    ops = sorted(n.op_type for n in result.model.graph.node if n.op_type not in ("Constant", "Reshape", "Unsqueeze"))
    assert ops == ["Add", "Mul", "Relu"]
    check_outputs(model, result.model, feeds, dtype, runtime_for(model, dtype))


def test_keep_unfoldable_keeps_bn():
    model, feeds = B.relu_bn(np.float32, 17)
    result = fold(model, keep_unfoldable=True)
    e = entry(result.report, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.KEPT, None, None)
    assert e.reason and re.search(r"relu|producer|fold|keep", e.reason, re.I), e.reason
    assert count(result.model, "BatchNormalization") == 1
    check_outputs(model, result.model, feeds, "float32", "ort")


# --- traps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bn", [True, False], ids=["after_bn", "alone"])
def test_broadcast_trap_mul_of_shape_c_is_not_per_channel(with_bn):
    """A [C] constant after a [N,C,H,W] Conv broadcasts over W (the last axis), not the channels."""
    model, feeds = B.conv_bn_mul_add(np.float32, 17, with_bn=with_bn, const_shape=(4,))
    result = fold(model)
    names = {e.node: e for e in result.report.entries}
    for name in ("mul", "add"):
        assert name not in names or names[name].action is not Action.FOLDED, names[name]
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Mul") >= 1 and ops.count("Add") >= 1, ops
    if with_bn:
        assert_folded(result.report, "bn", "Conv", "conv")  # the BN itself still folds
    check_outputs(model, result.model, feeds, "float32", "ort")


@pytest.mark.parametrize("kind", ["reshape_split", "transpose_3d"])
def test_bn_after_reshape_or_transpose_of_matmul_never_folded_wrongly(kind):
    """Axes line up only in a way a fold must prove; whatever it does, the numbers must match."""
    model, feeds = B.matmul_reshape_bn(kind)
    result = fold(model)
    e = entry(result.report, "bn")
    if e.action is not Action.FOLDED:
        assert re.search(r"reshape|transpose|axis|axes|producer|feature", e.reason, re.I), e.reason
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_bn_after_transpose_of_2d_matmul_is_not_folded():
    """[N,F] → Transpose → [F,N]: BN's channel axis is the batch axis; no weight can absorb it."""
    model, feeds = B.matmul_reshape_bn("transpose_2d")
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert re.search(r"transpose|axis|producer|foldable|feature", e.reason, re.I), e.reason
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_matmul_3d_bn_over_axis_1_refused_with_reason():
    """MatMul on [N,L,F]: BN normalizes axis 1 (L), not MatMul's feature axis F."""
    model, feeds = B.matmul_reshape_bn("nlf")
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action in (Action.KEPT, Action.REWRITTEN), e
    assert re.search(r"axis|feature|rank|3-?d|2-?d", e.reason, re.I), e.reason
    assert count(result.model, "MatMul") == 1
    np.testing.assert_array_equal(const(result.model, node_named(result.model, "matmul").input[1]),
                                  const(model, "matmul.W"))
    check_outputs(model, result.model, feeds, "float32", "ort")


@pytest.mark.parametrize("opset", [7, 8])
def test_opset7_bn_spatial0_handled_or_refused_never_a_crash(opset):
    model, feeds = B.bn_spatial0(opset=opset)
    result = fold(model)
    e = entry(result.report, "bn")
    if e.action is not Action.FOLDED:
        assert re.search(r"spatial", e.reason, re.I), e.reason
    check_outputs(model, result.model, feeds, "float32", "ort")


@pytest.mark.parametrize("opset", [14, 15, 26])
def test_training_mode_bn_with_unused_extra_outputs_is_never_folded(opset):
    model, feeds = B.bn_training(np.float32, opset)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target) == (Action.KEPT, None), e
    assert re.search(r"training", e.reason, re.I), e.reason
    bn = node_named(result.model, "bn")
    assert attr(bn, "training_mode") == 1
    check_outputs(model, result.model, feeds, "float32", "ort")


@pytest.mark.parametrize("kind,keyword", [("overflow", r"overflow"), ("subnormal", r"subnormal|flush")])
def test_float16_fold_out_of_range_refused_with_reason(kind, keyword):
    """overflow: s·W = 200 × ~1000 > 65504 would turn finite outputs into inf; subnormal: every
    folded weight below float16's smallest normal would lose the layer's precision."""
    model, feeds = B.fp16_extreme(kind)
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    assert re.search(keyword, e.reason, re.I), e.reason
    np.testing.assert_array_equal(const(result.model, "conv.W"), const(model, "conv.W"))
    check_outputs(model, result.model, feeds, "float16", "ort")


# --- skip / only --------------------------------------------------------------------------------

def test_skip_gemm_and_forward():
    model, feeds = B.mixed_patterns()
    result = fold(model, skip=("gemm", "forward"))
    assert_folded(result.report, "bn_conv", "Conv", "conv")
    for name in ("bn_gemm", "bn_fwd"):
        e = entry(result.report, name)
        assert e.action is Action.REWRITTEN, e  # "rewrite" is still on
        assert re.search(r"switched off|skip|disabled", e.reason, re.I), e.reason
    np.testing.assert_array_equal(const(result.model, "gemm.B"), const(model, "gemm.B"))
    np.testing.assert_array_equal(const(result.model, "conv_f.W"), const(model, "conv_f.W"))
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_only_conv():
    model, feeds = B.mixed_patterns()
    result = fold(model, only=("conv",))
    assert_folded(result.report, "bn_conv", "Conv", "conv")
    for name in ("bn_gemm", "bn_fwd"):
        e = entry(result.report, name)
        assert e.action is Action.KEPT, e  # "rewrite" is not selected either
        assert re.search(r"switched off|skip|not selected|disabled", e.reason, re.I), e.reason
    assert count(result.model, "BatchNormalization") == 2
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_all_patterns_by_default():
    model, feeds = B.mixed_patterns()
    result = fold(model)
    assert_folded(result.report, "bn_conv", "Conv", "conv")
    assert_folded(result.report, "bn_gemm", "Gemm", "gemm")
    assert_folded(result.report, "bn_fwd", "Conv (following)", "conv_f")
    counts = result.report.counts()
    assert (counts["found"], counts["folded"], counts["rewritten"], counts["kept"]) == (3, 3, 0, 0)
    assert (counts["folded:Conv"], counts["folded:Gemm"], counts["folded:Conv (following)"]) == (1, 1, 1)
    assert (result.report.nodes_before, result.report.nodes_after) == (6, 3)
    assert 0 < result.report.bytes_after < result.report.bytes_before
    check_outputs(model, result.model, feeds, "float32", "ort")


@pytest.mark.parametrize("option", ["skip", "only"])
def test_unknown_pattern_name_is_a_usage_error(option):
    model, _ = B.conv_bn()
    with pytest.raises(bnfold.UsageError) as info:
        bnfold.fold(model, **{option: ("conv", "batchnorm")})
    message = str(info.value)
    assert "batchnorm" in message and "\n" not in message
    for name in ("conv", "convtranspose", "gemm", "matmul", "chain", "forward", "rewrite"):
        assert name in message, f"valid name {name!r} missing from: {message}"
    assert info.value.exit_code == 2


# --- edges --------------------------------------------------------------------------------------

def test_unnamed_nodes_get_stable_synthetic_names():
    model, feeds = B.conv_bn()
    for n in model.graph.node:
        n.name = ""
    result = fold(model)
    e = entry(result.report, "BatchNormalization_1")
    assert (e.action, e.target_kind, e.target, e.producer) == (Action.FOLDED, "Conv", "Conv_0", "Conv_0"), e
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_conv_with_empty_bias_input_name():
    """Conv inputs ["x", "W", ""]: an optional bias left out by an empty name."""
    model, feeds = B.conv_bn(bias=False)
    node_named(model, "conv").input.append("")
    onnx.checker.check_model(model, full_check=True)
    check_conv_fold(model, feeds, "float32")


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_bias_column_m1(trans_a):
    """C of shape [M,1] broadcasts along the features: the new bias must become [M,F]."""
    model, feeds = B.gemm_bn(0.7, 1.3, trans_a, 1, "M1")
    check_gemm_fold(model, feeds, "float32")


def test_gemm_empty_c_input_name():
    model, feeds = B.gemm_bn(1.0, 1.0, 0, 0, None, opset=17)
    node_named(model, "gemm").input.append("")
    onnx.checker.check_model(model, full_check=True)
    check_gemm_fold(model, feeds, "float32")


def test_matmul_with_constant_on_the_left_is_not_folded_into_it():
    """Y = A_const · x: BN's channels are x's columns; no scaling of A can produce s[f]·Y[:, f]."""
    model, feeds = B.matmul_const_left_bn()
    result = fold(model)
    e = entry(result.report, "bn")
    assert e.action is not Action.FOLDED, e
    np.testing.assert_array_equal(const(result.model, "matmul.A"), const(model, "matmul.A"))
    check_outputs(model, result.model, feeds, "float32", "ort")


def test_bn_output_with_two_consumers_folds_and_rewires_both():
    model, feeds = B.conv_bn()
    bn = node_named(model, "bn")
    bn.output[0] = "hn"
    model.graph.node.extend([helper.make_node("Relu", ["hn"], ["y"], name="relu"),
                             helper.make_node("Neg", ["hn"], ["z"], name="neg")])
    model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 6, 5, 5]))
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    e = entry(result.report, "bn")
    assert (e.action, e.target, set(e.consumers)) == (Action.FOLDED, "conv", {"relu", "neg"}), e
    ref, got = run(model, feeds), run(result.model, feeds)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=0, atol=TOL["float32"] * np.abs(r).max())


@pytest.mark.parametrize("extra", [{"output_shape": [10, 10]}, {"auto_pad": "SAME_UPPER"}],
                         ids=["output_shape", "auto_pad_same_upper"])
def test_convtranspose_output_shape_and_auto_pad_are_kept(extra):
    """Attributes refeval does not model: onnxruntime only (float32), weights still checked."""
    model, feeds = B.convtranspose_bn(2, 2, True, np.float32, 17, strides=[2, 2])
    node_named(model, "convt").attribute.extend(helper.make_attribute(k, v) for k, v in extra.items())
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 10
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    assert_folded(result.report, "bn", "ConvTranspose", "convt")
    for k, v in extra.items():
        assert attr(node_named(result.model, "convt"), k) == (v.encode() if isinstance(v, str) else v)
    ref, got = run(model, feeds)[0], run(result.model, feeds)[0]
    assert ref.shape == got.shape == (2, 6, 10, 10)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL["float32"] * np.abs(ref).max())
