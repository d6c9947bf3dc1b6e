"""Small ONNX models for the calibration tests, and their float64 NumPy oracles."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.reference import PopulationStats, batch_norm_training
from tests.ortutil import make_model

EPS = 1e-3


def elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def bn_params(c: int, rng, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"scale": rng.uniform(0.5, 2.0, c).astype(dtype), "B": rng.normal(0, 1, c).astype(dtype),
            "mean": rng.normal(0, 1, c).astype(dtype), "var": rng.uniform(0.2, 2.0, c).astype(dtype)}


def single_bn(rank: int = 4, c: int = 3, dtype=np.float32, opset: int = 17, rng=None, relu: bool = True,
              **attrs) -> onnx.ModelProto:
    """x [N, C, 5, ...] → BN("bn") → Relu (or Identity) → y, batch axis symbolic ("N")."""
    rng = rng if rng is not None else np.random.default_rng(0)
    p = bn_params(c, rng, dtype)
    shape = ["N", c] + [5] * (rank - 2)
    inits = [numpy_helper.from_array(v, f"bn.{k}") for k, v in p.items()]
    nodes = [helper.make_node("BatchNormalization", ["x", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["h"],
                              name="bn", epsilon=EPS, **attrs),
             helper.make_node("Relu" if relu else "Identity", ["h"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", elem(dtype), shape)],
                      [helper.make_tensor_value_info("y", elem(dtype), shape)], inits, opset=opset)


def two_bn_chain(c_in: int = 3, c: int = 4, opset: int = 17, rng=None, size: int = 6) -> tuple[onnx.ModelProto, dict]:
    """x → Conv1x1("conv1") → BN("bn1") → Relu → Conv1x1("conv2") → BN("bn2") → y; float32.

    Returns the model and its float64 parameters for :func:`chain_oracle`."""
    rng = rng if rng is not None else np.random.default_rng(0)
    p = {"w1": rng.normal(0, 1, (c, c_in)), "b1": rng.normal(0, 1, c),
         "w2": rng.normal(0, 0.5, (c, c)), "b2": rng.normal(0, 1, c),
         "bn1": bn_params(c, rng), "bn2": bn_params(c, rng)}
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(p["w1"])[:, :, None, None], "conv1.W"),
             numpy_helper.from_array(f32(p["b1"]), "conv1.b"),
             numpy_helper.from_array(f32(p["w2"])[:, :, None, None], "conv2.W"),
             numpy_helper.from_array(f32(p["b2"]), "conv2.b")]
    for bn in ("bn1", "bn2"):
        inits += [numpy_helper.from_array(v, f"{bn}.{k}") for k, v in p[bn].items()]
    bn = lambda name, x, y: helper.make_node(  # noqa: E731
        "BatchNormalization", [x] + [f"{name}.{k}" for k in ("scale", "B", "mean", "var")], [y], name=name,
        epsilon=EPS)
    nodes = [helper.make_node("Conv", ["x", "conv1.W", "conv1.b"], ["h1"], name="conv1"), bn("bn1", "h1", "z1"),
             helper.make_node("Relu", ["z1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "conv2.W", "conv2.b"], ["h2"], name="conv2"), bn("bn2", "h2", "y")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, size, size])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, size, size])], inits,
                       opset=opset)
    return model, p


def chain_oracle(p: dict, batches) -> tuple[PopulationStats, PopulationStats]:
    """Precise-BN population statistics of bn1's and bn2's inputs, float64 NumPy reference."""
    c = p["b1"].shape[0]
    first, second = PopulationStats(c), PopulationStats(c)
    w1 = np.float32(p["w1"]).astype(np.float64)
    w2 = np.float32(p["w2"]).astype(np.float64)
    b1, b2 = np.float32(p["b1"]).astype(np.float64), np.float32(p["b2"]).astype(np.float64)
    for batch in batches:
        x = batch["x"].astype(np.float64)
        h1 = np.einsum("oc,nchw->nohw", w1, x) + b1[None, :, None, None]
        first.update(h1)
        z1 = batch_norm_training(h1, p["bn1"]["scale"].astype(np.float64), p["bn1"]["B"].astype(np.float64), EPS)[0]
        h2 = np.einsum("oc,nchw->nohw", w2, np.maximum(z1, 0)) + b2[None, :, None, None]
        second.update(h2)
    return first, second


def chain_batches(n: int = 5, rng=None, c_in: int = 3, sizes=None) -> list[dict]:
    rng = rng if rng is not None else np.random.default_rng(1)
    sizes = sizes or [4 + (i % 3) for i in range(n)]  # unequal batch sizes: weighting by m matters
    return [{"x": (rng.normal(0, 1, (s, c_in, 6, 6)) * 2 + 1).astype(np.float32)} for s in sizes]


def constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer ``name`` (or of the Constant node producing it)."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def bn_stats(model: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) stored for the BN named ``node_name``."""
    node = next(n for n in model.graph.node if n.name == node_name)
    return constant(model, node.input[3]), constant(model, node.input[4])
