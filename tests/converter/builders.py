"""Model builders for the converter tests: one function per pattern, explicit parameters.

Every builder returns ``(model, feeds)``: a checked ONNX model (``onnx.checker`` full check,
onnxruntime-loadable IR version pinned by ``tests.ortutil.make_model``) and seeded random
inputs for it. Node names are fixed and predictable ("conv", "bn", "gemm", ...) so tests can
assert which node a BN went into.

Parameters are drawn to make mistakes visible, not to look like a trained network:
BN scale has random sign and magnitude, shift and mean are non-zero, variance spans
[0.2, 2] and the default epsilon is 1e-3 (a fold that used 1e-5 instead is off by ~1e-3,
a hundred times the float32 tolerance). Output shapes are computed with the float64
reference evaluator so the builders never guess them.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.converter import refeval
from tests.ortutil import make_model

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "float64": np.dtype(np.float64), "bfloat16": BF16}
NEWEST_ORT_OPSET = 26  # newest default-domain opset onnxruntime 1.31 loads (onnx 1.23 defines 28)


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


def cast(a: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(dtype) if np.dtype(dtype) == BF16 \
        else np.asarray(a, dtype=np.float64).astype(dtype)


def tensor(name: str, a: np.ndarray, dtype=None) -> onnx.TensorProto:
    return numpy_helper.from_array(cast(a, dtype) if dtype is not None else np.asarray(a), name)


def bn_arrays(c: int, rng, *, shape: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Non-trivial BN parameters (float64) of shape [c] (or ``shape``)."""
    shape = tuple(shape or (c,))
    sign = np.where(rng.random(shape) < 0.25, -1.0, 1.0)
    return {"scale": sign * rng.uniform(0.5, 2.0, shape), "B": rng.normal(0, 1, shape),
            "mean": rng.normal(0, 1, shape), "var": rng.uniform(0.2, 2.0, shape)}


def bn_node(name: str, x: str, y: str, c: int, rng, dtype, *, epsilon: float | None = 1e-3,
            param_dtype=None, opset: int = 17, params: dict | None = None, shape=None,
            **attrs) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A BatchNormalization node and its four parameter initializers."""
    p = params or bn_arrays(c, rng, shape=shape)
    pdt = param_dtype or dtype
    inits = [tensor(f"{name}.scale", p["scale"], pdt), tensor(f"{name}.B", p["B"], pdt),
             tensor(f"{name}.mean", p["mean"], pdt), tensor(f"{name}.var", p["var"], pdt)]
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    outputs = [y]
    if attrs.get("training_mode"):
        outputs += [f"{name}.running_mean", f"{name}.running_var"]
    node = helper.make_node("BatchNormalization", [x] + [t.name for t in inits], outputs, name=name, **attrs)
    return node, inits


def finish(nodes, inputs: dict[str, tuple[np.ndarray, Sequence]], initializers, outputs: Sequence[str], *,
           opset: int, dtype=None, name: str = "test", ir_version: int | None = None,
           value_infos=()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Assemble a checked model; output shapes/dtypes come from the float64 reference.

    ``inputs`` maps input name → (feed array, declared shape) so a dim can be symbolic.
    """
    feeds = {k: v[0] for k, v in inputs.items()}
    in_vis = [helper.make_tensor_value_info(k, elem_type(a.dtype), list(shape)) for k, (a, shape) in inputs.items()]
    probe = helper.make_model(helper.make_graph(list(nodes), name, in_vis, [], list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    values = refeval.evaluate(probe, feeds, outputs=list(outputs))
    out_dtype = np.dtype(dtype) if dtype is not None else next(iter(feeds.values())).dtype
    symbolic = {i: d for _, (a, shape) in inputs.items() for i, d in enumerate(shape) if isinstance(d, str)}
    out_vis = []
    for out, v in zip(outputs, values):
        shape = [symbolic.get(i, n) if i == 0 else n for i, n in enumerate(v.shape)]
        out_vis.append(helper.make_tensor_value_info(out, elem_type(out_dtype), shape))
    model = make_model(nodes, in_vis, out_vis, initializers, opset=opset, name=name)
    if ir_version is not None:
        model.ir_version = ir_version
        onnx.checker.check_model(model, full_check=True)
    model.graph.value_info.extend(value_infos)
    return model, feeds


def _x(rng, shape, dtype) -> np.ndarray:
    return cast(rng.normal(0, 1, shape), dtype)


# --- Conv family --------------------------------------------------------------------------------

def conv_bn(dims: int = 2, groups: int = 1, bias: bool = True, dtype=np.float32, opset: int = 17, *,
            strides=None, dilations=None, pads=None, auto_pad: str | None = None, c_in: int = 4,
            c_out: int = 6, kernel: int = 3, size: int = 7, batch=2, epsilon: float | None = 1e-3,
            param_dtype=None, rng=None):
    """x → Conv("conv") → BatchNormalization("bn") → y. ``groups="depthwise"`` sets groups=c_in=c_out."""
    rng = _rng(rng)
    if groups == "depthwise":
        groups, c_out = c_in, c_in
    w = rng.normal(0, 1 / np.sqrt(c_in // groups * kernel ** dims), (c_out, c_in // groups) + (kernel,) * dims)
    inits = [tensor("conv.W", w, dtype)]
    conv_inputs = ["x", "conv.W"]
    if bias:
        inits.append(tensor("conv.b", rng.normal(0, 1, c_out), dtype))
        conv_inputs.append("conv.b")
    attrs = {"group": groups} if groups != 1 else {}
    attrs.update({k: v for k, v in {"strides": strides, "dilations": dilations, "pads": pads}.items() if v})
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    nodes = [helper.make_node("Conv", conv_inputs, ["h"], name="conv", **attrs)]
    bn, bn_inits = bn_node("bn", "h", "y", c_out, rng, dtype, epsilon=epsilon, param_dtype=param_dtype)
    x = _x(rng, (batch if isinstance(batch, int) else 2, c_in) + (size,) * dims, dtype)
    shape = [batch, c_in] + [size] * dims
    return finish(nodes + [bn], {"x": (x, shape)}, inits + bn_inits, ["y"], opset=opset, name="conv_bn")


def convtranspose_bn(dims: int = 2, groups: int = 1, bias: bool = True, dtype=np.float32, opset: int = 17, *,
                     strides=None, dilations=None, pads=None, output_padding=None, c_in: int = 4,
                     c_out: int = 6, kernel: int = 3, size: int = 5, epsilon: float | None = 1e-3, rng=None):
    """x → ConvTranspose("convt") → BatchNormalization("bn") → y (W: [C_in, C_out/g, k...])."""
    rng = _rng(rng)
    w = rng.normal(0, 1 / np.sqrt(c_in // groups * kernel ** dims), (c_in, c_out // groups) + (kernel,) * dims)
    inits = [tensor("convt.W", w, dtype)]
    ins = ["x", "convt.W"]
    if bias:
        inits.append(tensor("convt.b", rng.normal(0, 1, c_out), dtype))
        ins.append("convt.b")
    attrs = {"group": groups} if groups != 1 else {}
    attrs.update({k: v for k, v in {"strides": strides, "dilations": dilations, "pads": pads,
                                     "output_padding": output_padding}.items() if v})
    nodes = [helper.make_node("ConvTranspose", ins, ["h"], name="convt", **attrs)]
    bn, bn_inits = bn_node("bn", "h", "y", c_out, rng, dtype, epsilon=epsilon)
    x = _x(rng, (2, c_in) + (size,) * dims, dtype)
    return finish(nodes + [bn], {"x": (x, list(x.shape))}, inits + bn_inits, ["y"], opset=opset, name="convt_bn")


# --- Gemm / MatMul -----------------------------------------------------------------------------

def gemm_bn(alpha: float = 1.0, beta: float = 1.0, trans_a: int = 0, trans_b: int = 0, c: str | None = "F",
            dtype=np.float32, opset: int = 17, *, m: int = 5, k: int = 7, f: int = 6, rng=None):
    """A → Gemm("gemm") → BatchNormalization("bn") → y with C absent (None), "scalar", "F", "1F", "MF", "M1"."""
    rng = _rng(rng)
    b = rng.normal(0, 1 / np.sqrt(k), (f, k) if trans_b else (k, f))
    inits = [tensor("gemm.B", b, dtype)]
    ins = ["a", "gemm.B"]
    c_shapes = {"scalar": (), "F": (f,), "1F": (1, f), "MF": (m, f), "M1": (m, 1)}
    if c is not None:
        inits.append(tensor("gemm.C", rng.normal(0, 1, c_shapes[c]), dtype))
        ins.append("gemm.C")
    attrs = {}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    nodes = [helper.make_node("Gemm", ins, ["h"], name="gemm", **attrs)]
    bn, bn_inits = bn_node("bn", "h", "y", f, rng, dtype)
    a = _x(rng, (k, m) if trans_a else (m, k), dtype)
    return finish(nodes + [bn], {"a": (a, list(a.shape))}, inits + bn_inits, ["y"], opset=opset, name="gemm_bn")


def matmul_bn(with_add: bool = False, dtype=np.float32, opset: int = 17, *, n: int = 5, k: int = 7, f: int = 6,
              rng=None):
    """x[N,K] → MatMul("matmul") [→ Add("bias", [F])] → BatchNormalization("bn") → y."""
    rng = _rng(rng)
    inits = [tensor("matmul.W", rng.normal(0, 1 / np.sqrt(k), (k, f)), dtype)]
    nodes = [helper.make_node("MatMul", ["x", "matmul.W"], ["h"], name="matmul")]
    src = "h"
    if with_add:
        inits.append(tensor("bias.b", rng.normal(0, 1, f), dtype))
        nodes.append(helper.make_node("Add", ["h", "bias.b"], ["hb"], name="bias"))
        src = "hb"
    bn, bn_inits = bn_node("bn", src, "y", f, rng, dtype)
    x = _x(rng, (n, k), dtype)
    return finish(nodes + [bn], {"x": (x, list(x.shape))}, inits + bn_inits, ["y"], opset=opset, name="matmul_bn")


def matmul_const_left_bn(dtype=np.float32, opset: int = 17, *, m: int = 5, k: int = 7, f: int = 6, rng=None):
    """A_const[M,K] → MatMul("matmul", A_const, x[K,F]) → BN("bn", over F) → y: the constant is on the left."""
    rng = _rng(rng)
    inits = [tensor("matmul.A", rng.normal(0, 1 / np.sqrt(k), (m, k)), dtype)]
    nodes = [helper.make_node("MatMul", ["matmul.A", "x"], ["h"], name="matmul")]
    bn, bn_inits = bn_node("bn", "h", "y", f, rng, dtype)
    x = _x(rng, (k, f), dtype)
    return finish(nodes + [bn], {"x": (x, [k, f])}, inits + bn_inits, ["y"], opset=opset, name="matmul_left")


# --- chains, forward fold, rewrite -----------------------------------------------------------------

def _conv_head(rng, dtype, c_in=3, c_out=4, size=6, bias=True):
    w = rng.normal(0, 0.3, (c_out, c_in, 3, 3))
    inits = [tensor("conv.W", w, dtype)]
    if bias:
        inits.append(tensor("conv.b", rng.normal(0, 1, c_out), dtype))
    node = helper.make_node("Conv", ["x"] + [t.name for t in inits], ["h"], name="conv", pads=[1, 1, 1, 1])
    x = _x(rng, (2, c_in, size, size), dtype)
    return node, inits, x


def conv_bn_bn(dtype=np.float32, opset: int = 17, rng=None):
    """x → Conv("conv") → BN("bn1") → BN("bn2") → y."""
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    bn1, i1 = bn_node("bn1", "h", "h1", 4, rng, dtype)
    bn2, i2 = bn_node("bn2", "h1", "y", 4, rng, dtype)
    return finish([conv, bn1, bn2], {"x": (x, list(x.shape))}, inits + i1 + i2, ["y"], opset=opset,
                  name="conv_bn_bn")


def conv_bn_mul_add(dtype=np.float32, opset: int = 17, *, with_bn: bool = True, const_shape=(4, 1, 1),
                    ops: Sequence[str] = ("Mul", "Add"), rng=None):
    """x → Conv("conv") [→ BN("bn")] → Mul("mul", const) → Add("add", const) → y (Caffe2 style).

    ``const_shape`` is the shape of both constants: [C,1,1] and [1,C,1,1] broadcast over the
    channel axis; [C] broadcasts over the LAST axis (the broadcast trap).
    """
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype, c_out=4, size=4)  # W == C so [C] is a valid (wrong-axis) broadcast
    nodes = [conv]
    src = "h"
    if with_bn:
        bn, bi = bn_node("bn", "h", "hn", 4, rng, dtype)
        nodes.append(bn)
        inits += bi
        src = "hn"
    for op in ops:
        const = rng.uniform(0.5, 2.0, const_shape) * np.where(rng.random(const_shape) < 0.3, -1, 1) if op == "Mul" \
            else rng.normal(0, 1, const_shape)
        name = op.lower()
        inits.append(tensor(f"{name}.c", const, dtype))
        nodes.append(helper.make_node(op, [src, f"{name}.c"], [f"{name}.out"], name=name))
        src = f"{name}.out"
    nodes[-1].output[0] = "y"
    return finish(nodes, {"x": (x, list(x.shape))}, inits, ["y"], opset=opset, name="conv_chain")


def bn_conv(dtype=np.float32, opset: int = 17, *, groups: int = 1, pads=None, c_in: int = 4, c_out: int = 6,
            bias: bool = True, following: str = "Conv", rng=None):
    """x → BN("bn") → Conv("conv") (or ConvTranspose) → y: the forward fold (BN has no producer)."""
    rng = _rng(rng)
    bn, inits = bn_node("bn", "x", "h", c_in, rng, dtype)
    if following == "Conv":
        w = rng.normal(0, 0.3, (c_out, c_in // groups, 3, 3))
    else:
        w = rng.normal(0, 0.3, (c_in, c_out // groups, 3, 3))
    inits.append(tensor("conv.W", w, dtype))
    ins = ["h", "conv.W"]
    if bias:
        inits.append(tensor("conv.b", rng.normal(0, 1, c_out), dtype))
        ins.append("conv.b")
    attrs = {"group": groups} if groups != 1 else {}
    if pads:
        attrs["pads"] = pads
    conv = helper.make_node(following, ins, ["y"], name="conv", **attrs)
    x = _x(rng, (2, c_in, 6, 6), dtype)
    return finish([bn, conv], {"x": (x, list(x.shape))}, inits, ["y"], opset=opset, name="bn_conv")


def relu_bn(dtype=np.float32, opset: int = 17, rng=None):
    """x → Relu("relu") → BN("bn") → y: nothing to fold into; rewritten as Mul+Add."""
    rng = _rng(rng)
    bn, inits = bn_node("bn", "r", "y", 3, rng, dtype)
    x = _x(rng, (2, 3, 5, 5), dtype)
    return finish([helper.make_node("Relu", ["x"], ["r"], name="relu"), bn], {"x": (x, list(x.shape))}, inits,
                  ["y"], opset=opset, name="relu_bn")


# --- preconditions / traps -------------------------------------------------------------------------

def matmul_reshape_bn(kind: str, dtype=np.float32, opset: int = 17, rng=None):
    """MatMul output reshaped/transposed before a BN.

    kinds: "reshape_split" ([N,F] → Reshape [N,C,P] → BN over C), "transpose_3d" ([N,L,K]@[K,F] →
    Transpose(0,2,1) → [N,F,L] → BN over F: axes line up), "transpose_2d" ([N,F] → Transpose →
    [F,N] → BN over N: the channel is the batch axis, cannot fold), "nlf" ([N,L,K]@[K,F] → BN
    over L: the channel is not MatMul's feature axis).
    """
    rng = _rng(rng)
    nodes, inits = [], []
    if kind == "reshape_split":
        x = _x(rng, (3, 5), dtype)
        inits.append(tensor("matmul.W", rng.normal(0, 0.5, (5, 8)), dtype))
        inits.append(numpy_helper.from_array(np.array([3, 4, 2], dtype=np.int64), "shape"))
        nodes += [helper.make_node("MatMul", ["x", "matmul.W"], ["h"], name="matmul"),
                  helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape")]
        c = 4
    elif kind == "transpose_3d":
        x = _x(rng, (2, 3, 5), dtype)
        inits.append(tensor("matmul.W", rng.normal(0, 0.5, (5, 4)), dtype))
        nodes += [helper.make_node("MatMul", ["x", "matmul.W"], ["h"], name="matmul"),
                  helper.make_node("Transpose", ["h"], ["r"], name="transpose", perm=[0, 2, 1])]
        c = 4
    elif kind == "transpose_2d":
        x = _x(rng, (3, 5), dtype)
        inits.append(tensor("matmul.W", rng.normal(0, 0.5, (5, 4)), dtype))
        nodes += [helper.make_node("MatMul", ["x", "matmul.W"], ["h"], name="matmul"),
                  helper.make_node("Transpose", ["h"], ["r"], name="transpose", perm=[1, 0])]
        c = 3
    elif kind == "nlf":
        x = _x(rng, (2, 3, 5), dtype)
        inits.append(tensor("matmul.W", rng.normal(0, 0.5, (5, 4)), dtype))
        nodes.append(helper.make_node("MatMul", ["x", "matmul.W"], ["r"], name="matmul"))
        c = 3
    else:
        raise ValueError(kind)
    bn, bi = bn_node("bn", "r", "y", c, rng, dtype)
    return finish(nodes + [bn], {"x": (x, list(x.shape))}, inits + bi, ["y"], opset=opset, name=f"mm_{kind}")


def bn_spatial0(dtype=np.float32, opset: int = 7, rng=None):
    """x → Conv("conv") → BN-7 ("bn", spatial=0: per-activation parameters [C, H, W]) → y."""
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype, size=4)
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype, shape=(4, 4, 4), spatial=0)
    return finish([conv, bn], {"x": (x, list(x.shape))}, inits + bi, ["y"], opset=opset, name="bn_spatial0")


def bn_training(dtype=np.float32, opset: int = 15, rng=None):
    """x → Conv("conv") → BN("bn", training_mode=1; running-stat outputs unused) → y."""
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype, training_mode=1)
    return finish([conv, bn], {"x": (x, list(x.shape))}, inits + bi, ["y"], opset=opset, name="bn_training")


def conv_bn_shared_producer(kind: str, dtype=np.float32, opset: int = 17, rng=None):
    """Conv output also used elsewhere: kind "consumer" (→ Relu("relu") → z) or "graph_output" (h is an output)."""
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype)
    nodes = [conv, bn]
    outputs = ["y"]
    if kind == "consumer":
        nodes.append(helper.make_node("Relu", ["h"], ["z"], name="relu"))
        outputs.append("z")
    elif kind == "graph_output":
        outputs.append("h")
    else:
        raise ValueError(kind)
    return finish(nodes, {"x": (x, list(x.shape))}, inits + bi, outputs, opset=opset, name=f"shared_{kind}")


def shared_weight_convs(dtype=np.float32, opset: int = 17, *, share_bias: bool = True, rng=None):
    """x → Conv("conv1", W, b) → BN("bn") → y  and  x → Conv("conv2", same W, b) → z."""
    rng = _rng(rng)
    conv1, inits, x = _conv_head(rng, dtype)
    conv2 = helper.make_node("Conv", list(conv1.input), ["z"], name="conv2", pads=[1, 1, 1, 1])
    if not share_bias:
        conv2.input.pop()
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype)
    return finish([conv1, bn, conv2], {"x": (x, list(x.shape))}, inits + bi, ["y", "z"], opset=opset,
                  name="shared_weight")


def bn_param_input(dtype=np.float32, opset: int = 17, rng=None):
    """Conv("conv") → BN("bn") whose scale is a plain graph input (not constant)."""
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype)
    scale = numpy_helper.to_array(bi[0])
    bn.input[1] = "gamma"
    return finish([conv, bn], {"x": (x, list(x.shape)), "gamma": (scale, [4])}, inits + bi[1:], ["y"],
                  opset=opset, name="bn_param_input")


def initializer_as_input(which: str = "conv.W", ir_version: int | None = None, dtype=np.float32, opset: int = 9,
                         rng=None):
    """Conv("conv") → BN("bn") with initializer(s) also declared as graph inputs.

    ``which``: "conv.W", "bn.mean" or "all" (every initializer, as IR 3 requires). Only "x" is fed.
    """
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    bn, bi = bn_node("bn", "h", "y", 4, rng, dtype)
    model, feeds = finish([conv, bn], {"x": (x, list(x.shape))}, inits + bi, ["y"], opset=opset,
                          name="init_as_input")
    names = [t.name for t in model.graph.initializer] if which == "all" else [which]
    for t in model.graph.initializer:
        if t.name in names:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model, feeds


def fp16_extreme(kind: str = "overflow", opset: int = 17, rng=None):
    """float16 Conv("conv") → BN("bn") whose fold leaves float16's normal range.

    "overflow": |W| in [500, 1000] times s = 200 exceeds 65504 (inputs ~1e-3 keep the unfolded
    model finite). "subnormal": |W| in [1e-3, 2e-3] times s = 1e-3 is below the smallest normal
    float16 (6.1e-5) for every weight of every channel (B = 1 keeps the outputs normal, so
    they can be compared with a relative tolerance).
    """
    rng = _rng(rng)
    lo, hi, s, x_scale = (500, 1000, 200.0, 1e-3) if kind == "overflow" else (1e-3, 2e-3, 1e-3, 1.0)
    w = rng.uniform(lo, hi, (4, 3, 1, 1)) * np.where(rng.random((4, 3, 1, 1)) < 0.5, -1, 1)
    inits = [tensor("conv.W", w, np.float16)]
    conv = helper.make_node("Conv", ["x", "conv.W"], ["h"], name="conv")
    shift = np.zeros(4) if kind == "overflow" else np.ones(4)
    params = {"scale": np.full(4, s), "B": shift, "mean": np.zeros(4), "var": np.ones(4)}
    bn, bi = bn_node("bn", "h", "y", 4, rng, np.float16, params=params)
    x = cast(rng.uniform(-x_scale, x_scale, (1, 3, 2, 2)), np.float16)
    return finish([conv, bn], {"x": (x, list(x.shape))}, inits + bi, ["y"], opset=opset, name=f"fp16_{kind}")


def mixed_patterns(dtype=np.float32, opset: int = 17, rng=None):
    """One model with a Conv+BN ("bn_conv"), a Gemm+BN ("bn_gemm") and a forward BN→Conv ("bn_fwd").

    x[2,3,6,6] → Conv("conv") → BN("bn_conv") → y1;  a[5,7] → Gemm("gemm") → BN("bn_gemm") → y2;
    u[2,4,6,6] → BN("bn_fwd") → Conv("conv_f", no pads) → y3.
    """
    rng = _rng(rng)
    conv, inits, x = _conv_head(rng, dtype)
    b1, i1 = bn_node("bn_conv", "h", "y1", 4, rng, dtype)
    inits += i1 + [tensor("gemm.B", rng.normal(0, 0.4, (7, 6)), dtype), tensor("gemm.C", rng.normal(0, 1, 6), dtype)]
    gemm = helper.make_node("Gemm", ["a", "gemm.B", "gemm.C"], ["g"], name="gemm")
    b2, i2 = bn_node("bn_gemm", "g", "y2", 6, rng, dtype)
    b3, i3 = bn_node("bn_fwd", "u", "uf", 4, rng, dtype)
    inits += i2 + i3 + [tensor("conv_f.W", rng.normal(0, 0.3, (5, 4, 3, 3)), dtype)]
    conv_f = helper.make_node("Conv", ["uf", "conv_f.W"], ["y3"], name="conv_f")
    a = _x(rng, (5, 7), dtype)
    u = _x(rng, (2, 4, 6, 6), dtype)
    inputs = {"x": (x, list(x.shape)), "a": (a, [5, 7]), "u": (u, list(u.shape))}
    return finish([conv, b1, gemm, b2, b3, conv_f], inputs, inits, ["y1", "y2", "y3"], opset=opset, name="mixed")


# (w, γ, Var) in bfloat16 with ε = float32(1e-3) whose exact product w·γ/√(Var + ε) lies within
# 2⁻¹⁷ ULP of a bfloat16 rounding tie on the side the tie's round-to-even does not take:
# float64 → float32 lands on the tie and the second rounding goes the wrong way.
# Found by a seeded search over 4M triples (32 hits).
BF16_NEAR_TIES = [(0.6796875, 0.51171875, 1.4765625), (1.65625, 1.7265625, 1.671875),
                  (1.84375, 0.86328125, 1.4609375), (1.078125, 1.8203125, 1.296875),
                  (1.3046875, 1.2265625, 0.5703125), (1.1875, 0.94921875, 1.1328125)]


def bf16_near_ties(opset: int = 22):
    """bfloat16 1×1 Conv("conv", one input channel) → BN("bn") whose folded weights sit next to ties."""
    w, gamma, var = (np.array(v) for v in zip(*BF16_NEAR_TIES))
    c = len(w)
    params = {"scale": gamma, "B": np.zeros(c), "mean": np.zeros(c), "var": var}
    bn, inits = bn_node("bn", "h", "y", c, None, BF16, params=params, epsilon=1e-3)
    inits.append(tensor("conv.W", w.reshape(c, 1, 1, 1), BF16))
    conv = helper.make_node("Conv", ["x", "conv.W"], ["h"], name="conv")
    x = cast(np.linspace(-2, 2, 8).reshape(1, 1, 2, 4), BF16)
    return finish([conv, bn], {"x": (x, [1, 1, 2, 4])}, inits, ["y"], opset=opset, name="bf16_near_ties")
