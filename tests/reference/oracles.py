"""Every reference operator evaluated by torch (float64) and by onnxruntime (float32), as cases.

A case runs one operator on one input in ``bnfold.reference`` and in the other runtime and
returns ``(output name, ours, theirs)`` triples. ``test_ref_vs_torch.py`` and
``test_ref_vs_onnxruntime.py`` assert the bounds below per case; ``deviation_table.py`` prints
the largest deviation per operator and output over all cases.

torch runs in float64 on the same float64 input, so the bound is float64 rounding.
onnxruntime runs in float32; ours is computed in float64 from the SAME float32 input
(``dtype=np.float64``), so the deviation is onnxruntime's float32 error alone.

Inputs have per-channel offsets (|mean| up to 3·std) so that a one-pass E[x²] − E[x]²
variance, or a missing m/(m − 1), shows up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from bnfold import reference as ref

# Bounds the tests assert, |ours − theirs| <= atol + rtol·|theirs| elementwise.
TORCH_RTOL, TORCH_ATOL = 1e-10, 1e-12
# float32 onnxruntime vs float64 truth on O(1) outputs: a few float32 ULPs (eps = 1.2e-7),
# with room for the accumulation over the reduced block.
ORT_RTOL, ORT_ATOL = 1e-5, 2e-6
# Except GroupNormalization: onnxruntime runs it as its ONNX function body, which computes
# Var = E[x²] − E[x]² in float32, so its error grows like eps32·(μ² + σ²)/σ². These inputs have
# |μ|/σ up to 6 and a group mixes channels of different means: measured up to 4.7e-6 absolute
# (and 1.4e-3 at |μ|/σ = 100, where ours, two-pass in float64, stays exact).
ORT_GROUP_NORM_RTOL, ORT_GROUP_NORM_ATOL = 1e-4, 2e-5

EPSILON = 1e-5
SEED = 20150211


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    params: dict = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in self.params.items())
        return f"{self.op}-{'x'.join(map(str, self.shape))}{extra}"


def ort_bounds(case: Case) -> tuple[float, float]:
    """(rtol, atol) asserted for an onnxruntime case."""
    if case.op == "GroupNormalization":
        return ORT_GROUP_NORM_RTOL, ORT_GROUP_NORM_ATOL
    return ORT_RTOL, ORT_ATOL


def case_rng(case: Case) -> np.random.Generator:
    """The generator a case draws from: the same numbers in the tests and in the table."""
    return np.random.default_rng([SEED, *map(ord, case.id)])


def deviation(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max |ours − theirs|, max relative error).

    The relative error divides by max(|theirs|, 1e-3·max|theirs|): normalized outputs cross
    zero, and an element of 1e-9 says nothing about the operator's accuracy.
    """
    ours64, theirs64 = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = np.abs(ours64 - theirs64)
    floor = 1e-3 * max(float(np.abs(theirs64).max()), np.finfo(np.float64).tiny)
    return float(diff.max()), float((diff / np.maximum(np.abs(theirs64), floor)).max())


def _x(rng: np.random.Generator, shape) -> np.ndarray:
    """Per-channel offset and spread, channels on axis 1 (every case has rank >= 2)."""
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-3, 3, c).reshape(bshape)
    spread = rng.uniform(0.5, 2, c).reshape(bshape)
    return loc + spread * rng.normal(size=shape)


def _affine(rng, shape):
    return rng.normal(size=shape), rng.normal(size=shape)


def _stats(rng, c):
    return rng.normal(size=c), rng.uniform(0.2, 3, c)


# ---------------------------------------------------------------------------------------
# Cases

BN_SHAPES = [(4, 3), (2, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 2)]
LN_CASES = [((4, 6), -1), ((2, 3, 4, 5), -2), ((2, 3, 4, 5), 1), ((3, 4), 0)]
IN_SHAPES = [(2, 3, 5), (2, 3, 4, 5), (1, 2, 2, 3, 2)]
GN_CASES = [((3, 6), 2), ((2, 6, 5), 2), ((2, 6, 3, 4), 1), ((2, 6, 3, 4), 3), ((2, 6, 3, 4), 6)]


def _common_cases(ops_bn, ln_op, in_op, gn_op, gn_extra=({},)):
    cases = [Case(op, s) for op in ops_bn for s in BN_SHAPES]
    cases += [Case(ln_op, s, {"axis": a}) for s, a in LN_CASES]
    cases += [Case(in_op, s) for s in IN_SHAPES]
    cases += [Case(gn_op, s, {"groups": g, **extra}) for s, g in GN_CASES for extra in gn_extra]
    return cases


TORCH_CASES = _common_cases(
    ["batch_norm_inference", "batch_norm_training", "batch_norm_backward"],
    "layer_norm",
    "instance_norm",
    "group_norm",
)
ORT_CASES = _common_cases(
    ["BatchNormalization-15", "BatchNormalization-15-training"],
    "LayerNormalization-17",
    "InstanceNormalization-17",
    "GroupNormalization",
    gn_extra=({"opset": 18}, {"opset": 21}),
)


# ---------------------------------------------------------------------------------------
# torch, float64


def _torch_bn_inference(case, rng):
    import torch
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    c = case.shape[1]
    scale, bias = _affine(rng, c)
    mean, var = _stats(rng, c)
    t = torch.from_numpy
    theirs = F.batch_norm(t(x), t(mean), t(var), t(scale), t(bias), training=False, eps=EPSILON)
    return [("y", ref.batch_norm_inference(x, scale, bias, mean, var, EPSILON), theirs.numpy())]


def _torch_bn_training(case, rng):
    import torch
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    c = case.shape[1]
    scale, bias = _affine(rng, c)
    running_mean, running_var = _stats(rng, c)
    momentum = 0.1
    t = torch.from_numpy
    rm_t, rv_t = t(running_mean.copy()), t(running_var.copy())
    y_t = F.batch_norm(t(x), rm_t, rv_t, t(scale), t(bias), training=True, momentum=momentum, eps=EPSILON)
    axes = (0,) + tuple(range(2, x.ndim))
    var_t, mean_t = torch.var_mean(t(x), dim=axes, correction=0)
    y, batch_mean, batch_var = ref.batch_norm_training(x, scale, bias, EPSILON)
    m = x.size // c
    new_mean, new_var = ref.update_running_stats_torch(running_mean, running_var, batch_mean, batch_var, m, momentum)
    return [
        ("y", y, y_t.numpy()),
        ("batch_mean", batch_mean, mean_t.numpy()),
        ("batch_var", batch_var, var_t.numpy()),
        ("running_mean", new_mean, rm_t.numpy()),
        ("running_var", new_var, rv_t.numpy()),
    ]


def _torch_grads(forward, x, scale, bias, dy):
    """Autograd's (dx, dscale, dbias) of sum(forward(x, scale, bias)·dy), in float64."""
    import torch

    xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
    y = forward(xt, st, bt)
    y.backward(torch.from_numpy(dy))
    return y.detach().numpy(), xt.grad.numpy(), st.grad.numpy(), bt.grad.numpy()


def _grad_triples(ours_y, ours_grads, theirs):
    y_t, dx_t, ds_t, db_t = theirs
    out = [] if ours_y is None else [("y", ours_y, y_t)]
    return out + [("dx", ours_grads[0], dx_t), ("dscale", ours_grads[1], ds_t), ("dbias", ours_grads[2], db_t)]


def _torch_bn_backward(case, rng):
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    scale, bias = _affine(rng, case.shape[1])
    dy = rng.normal(size=x.shape)
    def forward(a, s, b):
        return F.batch_norm(a, None, None, s, b, training=True, eps=EPSILON)

    theirs = _torch_grads(forward, x, scale, bias, dy)
    return _grad_triples(None, ref.batch_norm_backward(dy, x, scale, EPSILON), theirs)


def _torch_layer_norm(case, rng):
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    axis = case.params["axis"]
    normalized = x.shape[axis:]
    scale, bias = _affine(rng, normalized)
    dy = rng.normal(size=x.shape)
    theirs = _torch_grads(lambda a, s, b: F.layer_norm(a, normalized, s, b, eps=EPSILON), x, scale, bias, dy)
    ours_y = ref.layer_norm(x, scale, bias, axis, EPSILON)
    return _grad_triples(ours_y, ref.layer_norm_backward(dy, x, scale, axis, EPSILON), theirs)


def _torch_instance_norm(case, rng):
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    scale, bias = _affine(rng, case.shape[1])
    dy = rng.normal(size=x.shape)
    theirs = _torch_grads(lambda a, s, b: F.instance_norm(a, weight=s, bias=b, eps=EPSILON), x, scale, bias, dy)
    ours_y = ref.instance_norm(x, scale, bias, EPSILON)
    return _grad_triples(ours_y, ref.instance_norm_backward(dy, x, scale, EPSILON), theirs)


def _torch_group_norm(case, rng):
    import torch.nn.functional as F

    x = _x(rng, case.shape)
    groups = case.params["groups"]
    scale, bias = _affine(rng, case.shape[1])
    dy = rng.normal(size=x.shape)
    theirs = _torch_grads(lambda a, s, b: F.group_norm(a, groups, s, b, eps=EPSILON), x, scale, bias, dy)
    ours_y = ref.group_norm(x, scale, bias, groups, EPSILON)
    return _grad_triples(ours_y, ref.group_norm_backward(dy, x, scale, groups, EPSILON), theirs)


_TORCH = {
    "batch_norm_inference": _torch_bn_inference,
    "batch_norm_training": _torch_bn_training,
    "batch_norm_backward": _torch_bn_backward,
    "layer_norm": _torch_layer_norm,
    "instance_norm": _torch_instance_norm,
    "group_norm": _torch_group_norm,
}


def run_torch(case: Case, rng: np.random.Generator):
    """(output, ours, torch's) triples for a case of TORCH_CASES."""
    return _TORCH[case.op](case, rng)


# ---------------------------------------------------------------------------------------
# onnxruntime, float32


def run_onnx_node(op_type, inputs: dict, outputs: dict, opset: int, **attrs) -> list[np.ndarray]:
    """One-node model, inputs and outputs {name: shape}, all float32, run by onnxruntime CPU."""
    from tests.ortutil import ir_version_for, make_model, run

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    parts = (
        [helper.make_node(op_type, list(inputs), list(outputs), **attrs)],
        [info(n, v.shape) for n, v in inputs.items()],
        [info(n, shape) for n, shape in outputs.items()],
    )
    if (op_type, opset) == ("GroupNormalization", 18):
        # onnx's checker refuses GroupNormalization-18 as deprecated (its per-group scale was a
        # spec bug); onnxruntime still runs it, and models exported in 2023 contain it.
        graph = helper.make_graph(*parts[:1], "test", *parts[1:])
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version_for(opset))
    else:
        model = make_model(*parts, opset=opset)
    return run(model, inputs)


def _run_y(op_type, inputs: dict, opset: int, **attrs) -> np.ndarray:
    """The single output y, shaped like the input x."""
    (y,) = run_onnx_node(op_type, inputs, {"y": inputs["x"].shape}, opset, **attrs)
    return y


def _f32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


def _ort_bn_inference(case, rng):
    c = case.shape[1]
    x, scale, bias, mean, var = _f32(_x(rng, case.shape), *_affine(rng, c), *_stats(rng, c))
    y = _run_y("BatchNormalization", dict(x=x, s=scale, b=bias, m=mean, v=var), 15, epsilon=EPSILON)
    return [("y", ref.batch_norm_inference(x, scale, bias, mean, var, EPSILON, dtype=np.float64), y)]


def _ort_bn_training(case, rng):
    c = case.shape[1]
    x, scale, bias, running_mean, running_var = _f32(_x(rng, case.shape), *_affine(rng, c), *_stats(rng, c))
    momentum = 0.7
    feeds = dict(x=x, s=scale, b=bias, m=running_mean, v=running_var)
    outputs = {"y": x.shape, "rm": (c,), "rv": (c,)}
    attrs = dict(epsilon=EPSILON, momentum=momentum, training_mode=1)
    y_o, rm_o, rv_o = run_onnx_node("BatchNormalization", feeds, outputs, 15, **attrs)
    y, batch_mean, batch_var = ref.batch_norm_training(x, scale, bias, EPSILON, dtype=np.float64)
    new_mean, new_var = ref.update_running_stats_onnx(
        running_mean, running_var, batch_mean, batch_var, momentum, dtype=np.float64
    )
    return [("y", y, y_o), ("running_mean", new_mean, rm_o), ("running_var", new_var, rv_o)]


def _ort_layer_norm(case, rng):
    axis = case.params["axis"]
    x = _x(rng, case.shape)
    x, scale, bias = _f32(x, *_affine(rng, x.shape[axis:]))
    y = _run_y("LayerNormalization", dict(x=x, s=scale, b=bias), 17, axis=axis, epsilon=EPSILON)
    return [("y", ref.layer_norm(x, scale, bias, axis, EPSILON, dtype=np.float64), y)]


def _ort_instance_norm(case, rng):
    x, scale, bias = _f32(_x(rng, case.shape), *_affine(rng, case.shape[1]))
    y = _run_y("InstanceNormalization", dict(x=x, s=scale, b=bias), 17, epsilon=EPSILON)
    return [("y", ref.instance_norm(x, scale, bias, EPSILON, dtype=np.float64), y)]


def _ort_group_norm(case, rng):
    groups, opset = case.params["groups"], case.params["opset"]
    c = case.shape[1]
    # Opset 18 takes one scale/bias per GROUP, opset 21 one per channel (see groupnorm.py).
    param_len = groups if opset == 18 else c
    x, scale, bias = _f32(_x(rng, case.shape), *_affine(rng, param_len))
    y = _run_y("GroupNormalization", dict(x=x, s=scale, b=bias), opset, num_groups=groups, epsilon=EPSILON)
    if opset == 18:
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    return [("y", ref.group_norm(x, scale, bias, groups, EPSILON, dtype=np.float64), y)]


_ORT = {
    "BatchNormalization-15": _ort_bn_inference,
    "BatchNormalization-15-training": _ort_bn_training,
    "LayerNormalization-17": _ort_layer_norm,
    "InstanceNormalization-17": _ort_instance_norm,
    "GroupNormalization": _ort_group_norm,
}


def run_ort(case: Case, rng: np.random.Generator):
    """(output, ours, onnxruntime's) triples for a case of ORT_CASES."""
    return _ORT[case.op](case, rng)


def ort_op_label(case: Case) -> str:
    """Operator label for the table: GroupNormalization carries its opset."""
    return f"{case.op}-{case.params['opset']}" if "opset" in case.params else case.op
