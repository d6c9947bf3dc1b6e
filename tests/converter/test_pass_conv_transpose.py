"""ConvTranspose → BN (passes/conv_transpose.py): grouped channel mapping, output_padding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Action, fold
from bnfold import numerics as nx
from tests.converter._passutil import (
    BF16, bn_node, bn_params, entry, fold_and_compare, initializer, op_types, ref_conv_transpose, tensor, vi,
)
from tests.ortutil import make_model


def convt_bn(rng, *, groups=1, bias=True, dtype=np.float32, dims=2, c_in=4, c_out_g=3, opset=17, attrs=None):
    w = rng.normal(0, 0.5, (c_in, c_out_g) + (3,) * dims).astype(dtype)
    c_out = c_out_g * groups
    names, params = bn_params(rng, c_out, dtype)
    inits = [tensor("W", w)]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(0, 0.5, c_out).astype(dtype)))
        inputs.append("B")
    a = dict(group=groups, strides=[2] * dims, pads=[1] * (2 * dims), output_padding=[1] * dims) | (attrs or {})
    nodes = [helper.make_node("ConvTranspose", inputs, ["c"], name="convt", **a), bn_node("c", "y", names)]
    spatial = [3, 4, 2][:dims]
    model = make_model(nodes, [vi("x", dtype, [1, c_in, *spatial])], [vi("y", dtype, dims + 2)], [*inits, *params],
                       opset=opset)
    return model, {"x": rng.normal(size=(1, c_in, *spatial)).astype(dtype)}


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.mark.parametrize(("groups", "c_in", "c_out_g"), [(1, 4, 3), (2, 4, 3), (4, 4, 1), (2, 6, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_bn_folds_in_onnxruntime(rng, groups, c_in, c_out_g, bias, dims):
    model, feeds = convt_bn(rng, groups=groups, bias=bias, dims=dims, c_in=c_in, c_out_g=c_out_g)
    result = fold_and_compare(model, feeds, np.float32)
    assert op_types(result.model) == ["ConvTranspose"]
    e = entry(result, "bn")
    assert (e.action, e.target_kind, e.target) == (Action.FOLDED, "ConvTranspose", "convt")


@pytest.mark.parametrize("opset", [7, 11, 15, 24])
def test_conv_transpose_across_opsets_float16(rng, opset):
    model, feeds = convt_bn(rng, groups=2, dtype=np.float16, opset=opset)
    fold_and_compare(model, feeds, np.float16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
def test_grouped_weights_are_rounded_once_and_match_numpy(rng, dtype):
    # onnxruntime has no float64/bfloat16 ConvTranspose on CPU: compare with the NumPy reference.
    model, _ = convt_bn(rng, groups=2, dtype=dtype, opset=22 if dtype == BF16 else 17)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    eps = float(np.float32(1e-3))
    s, t = nx.bn_affine(*(inits[n] for n in ("bn_scale", "bn_bias", "bn_mean", "bn_var")), epsilon=eps)
    w64, b64 = nx.fold_conv_transpose(inits["W"], inits["B"], s, t, groups=2)
    result = fold(model)
    np.testing.assert_array_equal(initializer(result.model, "W").astype(np.float64),
                                  nx.round_once(w64, dtype).astype(np.float64))
    np.testing.assert_array_equal(initializer(result.model, "B").astype(np.float64),
                                  nx.round_once(b64, dtype).astype(np.float64))
    x = rng.normal(size=(1, 4, 3, 4))
    kw = dict(strides=[2, 2], pads=[1] * 4, output_padding=[1, 1], groups=2)
    ref = s.reshape(1, -1, 1, 1) * ref_conv_transpose(x, inits["W"], inits["B"], **kw) + t.reshape(1, -1, 1, 1)
    got = ref_conv_transpose(x, initializer(result.model, "W"), initializer(result.model, "B"), **kw)
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}.get(np.dtype(dtype), 3e-2)
    assert np.abs(ref - got).max() <= tol * np.abs(ref).max()


def test_grouped_fold_that_ignores_groups_would_be_caught(rng):
    """The test above can fail: scaling W[:, j] by s[j] (the ungrouped mapping) is wrong."""
    model, feeds = convt_bn(rng, groups=2)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    s, t = nx.bn_affine(*(inits[n] for n in ("bn_scale", "bn_bias", "bn_mean", "bn_var")), epsilon=1e-3)
    wrong = inits["W"] * s[:3].reshape(1, -1, 1, 1)
    right, _ = nx.fold_conv_transpose(inits["W"], inits["B"], s, t, groups=2)
    assert np.abs(wrong - right).max() > 1e-3


def test_non_constant_bias_is_refused(rng):
    model, feeds = convt_bn(rng)
    b = initializer(model, "B")
    keep = [t for t in model.graph.initializer if t.name != "B"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.append(vi("B", np.float32, [3]))
    feeds["B"] = b
    result = fold_and_compare(model, feeds, np.float32)
    e = entry(result, "bn")
    assert e.action is Action.REWRITTEN
    assert "bias B of ConvTranspose 'convt' is not a constant: 'B' is a graph input" in e.reason
