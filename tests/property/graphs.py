"""Hypothesis strategies for the fold property: a linear producer followed by BatchNormalization,
with the generator's own ground truth about what bnfold must do with each BN.

A case is one producer ``p`` — Conv or ConvTranspose (1-D/2-D/3-D, groups, strides,
dilations, pads, output_padding, bias or not), Gemm (alpha, beta, transA, transB, C absent,
scalar, [F], [1,F], [M,1], [M,F]) or MatMul (+ Add bias, either operand order) — followed by
``bn`` with statistics drawn over orders of magnitude (|γ| in 10^[-2,1], |E| up to 10^3,
Var in 10^[-4,4], ε in 10^[-6,-2]). Optional decorations, each recorded in ``Case.blockers``
or ``Case.extras`` so the test knows the truth:

* ``extra_consumer``: ``p``'s output also feeds a Relu whose output is a graph output
  → BN is not folded; it is rewritten as Mul+Add and the reason says what else the output feeds.
* ``producer_is_output``: ``p``'s output is also a graph output → rewritten, reason says so.
* ``training``: ``training_mode=1`` → kept, blocking, reason starts with "training_mode=1".
* ``param_input``: one BN parameter is a graph input → kept, blocking, reason names it.
* ``matmul_3d``: MatMul on [N, L, K] activations, BN normalizes axis 1 (L), not the feature
  axis → rewritten, reason names the feature axis.
* ``twin`` (extra): a second producer sharing ``p``'s weight (and bias), its output a graph
  output — the fold must copy the weight, never change the twin's output.
* ``twin_bn`` (extra): the twin is followed by its own BN ``bn2`` sharing ``bn``'s parameter
  initializers — both fold, each into its own copy.
* ``bn_consumer`` (extra): BN's output also feeds a Relu → graph output (never blocks a fold).

``Case.scale[name]`` bounds the magnitude of every intermediate the fold's error comes from,
per channel of output ``name`` (see :func:`channel_scale`); the test's tolerance is relative
to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from tests.ortutil import make_model

OPSET = 17
F32 = onnx.TensorProto.FLOAT


@dataclass
class Case:
    kind: str  # Conv | ConvTranspose | Gemm | MatMul
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    blockers: set[str] = field(default_factory=set)
    extras: set[str] = field(default_factory=set)
    param_input: str | None = None  # the BN parameter that is a graph input
    fan_in: int = 1  # terms summed per output element of the producer
    scale: dict[str, np.ndarray] = field(default_factory=dict)  # output name -> per-channel bound
    describe: str = ""

    def expected(self) -> dict[str, tuple[str, str | None, bool]]:
        """BN name -> (action, reason substring or target, blocking), the generator's truth."""
        if "training" in self.blockers:
            main = ("kept", "training_mode=1", True)
        elif "param_input" in self.blockers:
            main = ("kept", f"parameter {self.param_input} is not a constant", True)
        elif "producer_is_output" in self.blockers:
            main = ("rewritten", "is a graph output", False)
        elif "extra_consumer" in self.blockers:
            main = ("rewritten", "feeds", False)
        elif "matmul_3d" in self.blockers:
            main = ("rewritten", "feature axis", False)
        else:
            main = ("folded", "p", False)
        out = {"bn": main}
        if "twin_bn" in self.extras:  # shares bn's parameters, not p's output
            if main[0] == "kept":
                out["bn2"] = main
            elif "matmul_3d" in self.blockers:
                out["bn2"] = ("rewritten", "feature axis", False)
            else:
                out["bn2"] = ("folded", "twin", False)
        return out


def _log_uniform(draw, lo: float, hi: float, n: int, *, signed: bool = False) -> np.ndarray:
    exps = draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))
    v = 10.0 ** np.array(exps)
    if signed:
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
        v = v * np.array(signs)
    return v


def _bn_params(draw, c: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    mean_mag = draw(st.floats(-1, 3))
    bias_mag = draw(st.floats(-1, 2))
    return {
        "scale": _log_uniform(draw, -2, 1, c, signed=True),
        "B": rng.normal(0, 1, c) * 10.0 ** bias_mag,
        "mean": rng.normal(0, 1, c) * 10.0 ** mean_mag,
        "var": _log_uniform(draw, -4, 4, c),
    }


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32)


@st.composite
def conv_like(draw, rng, transpose: bool):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c_in, c_out = groups * cin_g, groups * cout_g
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    strides = [draw(st.integers(1, 3 if transpose else 2)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    max_size = {1: 7, 2: 5, 3: 3}[dims]
    sizes, pads_b, pads_e, out_pad = [], [], [], []
    for k, s, d in zip(kernel, strides, dilations):
        eff = (k - 1) * d + 1
        if transpose:
            op = draw(st.integers(0, s - 1))  # onnxruntime: output_padding < stride
            size = draw(st.integers(1, max_size))
            full = (size - 1) * s + eff + op
            pb = draw(st.integers(0, min(2, (full - 1) // 2)))
            pe = draw(st.integers(0, min(2, full - 1 - pb)))
            out_pad.append(op)
        else:
            pb, pe = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            size = draw(st.integers(max(1, eff - pb - pe), max(1, eff - pb - pe) + max_size - 1))
        sizes.append(size)
        pads_b.append(pb)
        pads_e.append(pe)
    w_shape = (c_in, cout_g, *kernel) if transpose else (c_out, cin_g, *kernel)
    fan_in = (cin_g if not transpose else c_in // groups) * int(np.prod(kernel))
    w = _f32(rng.normal(0, 1 / np.sqrt(fan_in), w_shape))
    bias = _f32(rng.normal(0, 1, c_out)) if draw(st.booleans()) else None
    attrs = {"strides": strides, "dilations": dilations, "pads": pads_b + pads_e}
    if groups != 1:
        attrs["group"] = groups
    if transpose and any(out_pad):
        attrs["output_padding"] = out_pad
    batch = draw(st.integers(1, 2))
    x = _f32(rng.normal(0, 1, (batch, c_in, *sizes)) * 10.0 ** draw(st.floats(-1, 1)))
    # L1 bound of each output channel's dot product (ConvTranspose: the weights that feed it)
    if transpose:
        rows = w.reshape(groups, c_in // groups, cout_g, -1).transpose(0, 2, 1, 3).reshape(c_out, -1)
    else:
        rows = w.reshape(c_out, -1)
    h_bound = np.abs(rows.astype(np.float64)).sum(axis=1) * np.abs(x).max()
    if bias is not None:
        h_bound += np.abs(bias)
    desc = (f"{'ConvTranspose' if transpose else 'Conv'} {dims}-D g={groups} cin={c_in} cout={c_out} "
            f"k={kernel} s={strides} d={dilations} pads={pads_b + pads_e} op={out_pad} bias={bias is not None}")
    return dict(op="ConvTranspose" if transpose else "Conv", x=x, w=w, bias=bias, attrs=attrs, channels=c_out,
                rank=dims + 2, fan_in=fan_in, h_bound=h_bound, desc=desc)


@st.composite
def gemm(draw, rng):
    m, k, f = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, -2.0, 3.25]))
    beta = draw(st.sampled_from([1.0, 0.0, -0.75, 2.0]))
    c_kind = draw(st.sampled_from([None, "scalar", "F", "1F", "M1", "MF"]))
    a = _f32(rng.normal(0, 1, (k, m) if trans_a else (m, k)) * 10.0 ** draw(st.floats(-1, 1)))
    b = _f32(rng.normal(0, 1 / np.sqrt(k), (f, k) if trans_b else (k, f)))
    c_shape = {None: None, "scalar": (), "F": (f,), "1F": (1, f), "M1": (m, 1), "MF": (m, f)}[c_kind]
    c = None if c_shape is None else _f32(rng.normal(0, 1, c_shape))
    attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
    b_t = (b.T if trans_b else b).astype(np.float64)
    h_bound = abs(alpha) * np.abs(b_t).sum(axis=0) * np.abs(a).max()
    if c is not None:
        h_bound = h_bound + abs(beta) * np.abs(np.broadcast_to(c, (m, f))).max(axis=0)
    desc = f"Gemm m={m} k={k} f={f} alpha={alpha} beta={beta} tA={trans_a} tB={trans_b} C={c_kind}"
    return dict(op="Gemm", x=a, w=b, bias=c, attrs=attrs, channels=f, rank=2, fan_in=k + 1, h_bound=h_bound,
                desc=desc)


@st.composite
def matmul(draw, rng, three_d: bool):
    n, k, f = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    length = draw(st.integers(1, 4)) if three_d else None
    shape = (n, length, k) if three_d else (n, k)
    a = _f32(rng.normal(0, 1, shape) * 10.0 ** draw(st.floats(-1, 1)))
    b = _f32(rng.normal(0, 1 / np.sqrt(k), (k, f)))
    with_add = draw(st.booleans())
    bias = _f32(rng.normal(0, 1, f)) if with_add else None
    bias_first = draw(st.booleans())
    h_bound = np.abs(b.astype(np.float64)).sum(axis=0) * np.abs(a).max()
    if bias is not None:
        h_bound = h_bound + np.abs(bias)
    channels = length if three_d else f
    if three_d:  # BN normalizes axis 1 (L): bound every channel by the largest feature bound
        h_bound = np.full(length, h_bound.max())
    desc = f"MatMul {'3-D' if three_d else '2-D'} n={n} k={k} f={f} add={with_add}"
    return dict(op="MatMul", x=a, w=b, bias=bias, attrs={}, channels=channels, rank=len(shape), fan_in=k + 1,
                h_bound=h_bound, desc=desc, bias_first=bias_first)


def _producer(spec: dict, name: str, x: str, w: str, b: str | None, out: str) -> list[onnx.NodeProto]:
    if spec["op"] == "MatMul":
        if b is None:
            return [helper.make_node("MatMul", [x, w], [out], name=name)]
        mm = f"{out}_mm"
        operands = [b, mm] if spec.get("bias_first") else [mm, b]
        return [helper.make_node("MatMul", [x, w], [mm], name=name),
                helper.make_node("Add", operands, [out], name=f"{name}_add")]
    inputs = [x, w] + ([b] if b is not None else [])
    return [helper.make_node(spec["op"], inputs, [out], name=name, **spec["attrs"])]


def channel_scale(spec: dict, bn: dict[str, np.ndarray], epsilon: float) -> np.ndarray:
    """Per-channel bound S = |s|·(|h| + |E|) + |β| on every value the BN output's error comes from.

    |h| is the L1 bound of the producer's output channel (Σ|W|·max|x| + |bias|), s = γ/√(Var+ε).
    Both the original (BN computes s·(h − E) + β) and the folded model (s·W·x + (β − s·E))
    round values of at most this size, so their difference is a few eps·√(fan-in)·S.
    """
    s = np.abs(bn["scale"]) / np.sqrt(bn["var"] + epsilon)
    return s * (spec["h_bound"] + np.abs(bn["mean"])) + np.abs(bn["B"])


@st.composite
def cases(draw) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    blockers: set[str] = set()
    if kind in ("Conv", "ConvTranspose"):
        spec = draw(conv_like(rng, kind == "ConvTranspose"))
    elif kind == "Gemm":
        spec = draw(gemm(rng))
    else:
        three_d = draw(st.integers(0, 2)) == 0
        spec = draw(matmul(rng, three_d))
        if three_d:
            blockers.add("matmul_3d")
    for name, chance in (("extra_consumer", 6), ("producer_is_output", 8), ("training", 10), ("param_input", 10)):
        if draw(st.integers(0, chance - 1)) == 0:
            blockers.add(name)
    extras = {name for name in ("twin", "bn_consumer") if draw(st.booleans())}
    if "twin" in extras and draw(st.booleans()):
        extras.add("twin_bn")

    c = spec["channels"]
    bn = _bn_params(draw, c, rng)
    epsilon = float(10.0 ** draw(st.floats(-6, -2)))
    inits = [numpy_helper.from_array(spec["w"], "W")]
    b_name = None
    if spec["bias"] is not None:
        b_name = "b"
        inits.append(numpy_helper.from_array(spec["bias"], "b"))
    feeds = {"x": spec["x"]}
    inputs = [helper.make_tensor_value_info("x", F32, list(spec["x"].shape))]
    labels = {"scale": "scale", "B": "bias", "mean": "mean", "var": "var"}
    param_key = draw(st.sampled_from(list(labels))) if "param_input" in blockers else None
    param_input = labels.get(param_key)
    bn_inputs = []
    for key in labels:
        value = _f32(bn[key])
        name = f"bn.{key}"
        bn_inputs.append(name)
        if key == param_key:
            feeds[name] = value
            inputs.append(helper.make_tensor_value_info(name, F32, [c]))
        else:
            inits.append(numpy_helper.from_array(value, name))
    bn64 = {k: _f32(v).astype(np.float64) for k, v in bn.items()}

    nodes = _producer(spec, "p", "x", "W", b_name, "h")
    bn_attrs = {"epsilon": epsilon}
    bn_outputs = ["y"]
    if "training" in blockers:
        bn_attrs["training_mode"] = 1
        bn_outputs += ["bn.running_mean", "bn.running_var"]  # declared, never used
    nodes.append(helper.make_node("BatchNormalization", ["h", *bn_inputs], bn_outputs, name="bn", **bn_attrs))
    rank = spec["rank"]
    unknown = [None] * rank
    outputs = [helper.make_tensor_value_info("y", F32, unknown)]
    scale = {"y": channel_scale(spec, bn64, epsilon)}
    if "extra_consumer" in blockers:
        nodes.append(helper.make_node("Relu", ["h"], ["aux"], name="aux_relu"))
        outputs.append(helper.make_tensor_value_info("aux", F32, unknown))
    if "producer_is_output" in blockers:
        outputs.append(helper.make_tensor_value_info("h", F32, unknown))
    if "bn_consumer" in extras:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="bn_relu"))
        outputs.append(helper.make_tensor_value_info("z", F32, unknown))
        scale["z"] = scale["y"]
    if "twin" in extras:
        nodes += _producer(spec, "twin", "x", "W", b_name, "h2")
        if "twin_bn" in extras:
            bn2_outputs = ["y2"] + (["bn2.running_mean", "bn2.running_var"] if "training" in blockers else [])
            nodes.append(helper.make_node("BatchNormalization", ["h2", *bn_inputs], bn2_outputs, name="bn2",
                                          **bn_attrs))
            outputs.append(helper.make_tensor_value_info("y2", F32, unknown))
            scale["y2"] = scale["y"]
        else:
            outputs.append(helper.make_tensor_value_info("h2", F32, unknown))
    model = make_model(nodes, inputs, outputs, inits, opset=OPSET, name="property")
    desc = f"{spec['desc']} C={c} eps={epsilon:.2g} blockers={sorted(blockers)} extras={sorted(extras)}"
    return Case(kind=kind, model=model, feeds=feeds, blockers=blockers, extras=extras, param_input=param_input,
                fan_in=spec["fan_in"], scale=scale, describe=desc)
