"""Reading a node as a per-channel affine map y = s·x + t, and the chain driver.

A BatchNormalization is one when it is in inference mode and its four parameters are
constants (:func:`bn_affine_or_reason`; every precondition returns a human reason). A Mul or
Add with a constant operand is one when that constant BROADCASTS per channel against the
output's feature axis: right-aligned against the output rank r, every axis but the feature
axis must be 1 and the feature axis 1 or C. Element count says nothing — a [C] constant
broadcasts over the LAST axis, which is the channel axis only for rank 2 (Gemm, 2-D MatMul).

:func:`fold_chain` folds the longest chain of such nodes that follows a linear node, each
the sole consumer of the previous output, composed in float64 and rounded once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from bnfold.numerics import Affine, PrecisionRefused, bn_affine, compose
from bnfold.passes._context import FoldContext
from bnfold.report import Action

BN_PARAMS = ("scale", "bias", "mean", "var")


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def bn_affine_or_reason(ctx: FoldContext, node: onnx.NodeProto) -> tuple[Affine | None, str | None]:
    """(s, t) of an inference-mode BN with constant parameters, or (None, why not)."""
    ix = ctx.index
    if ctx.opset >= 14 and attr(node, "training_mode", 0) == 1:
        return None, ("training_mode=1: a training-mode BatchNormalization normalizes with batch statistics, "
                      "it is not a fixed affine map (never folded)")
    if ctx.opset <= 6 and attr(node, "is_test", 0) == 0:
        return None, "is_test=0: a training-mode BatchNormalization (opset <= 6) is never folded"
    extra = [o for o in node.output[1:] if o]
    if extra and ctx.opset < 14:
        return None, (f"declares the training-mode outputs {extra} (opset {ctx.opset}: a BatchNormalization "
                      "with mean/var outputs runs in training mode)")
    used = [o for o in extra if ix.consumers_of(o) or ix.is_output(o)]
    if used:
        return None, f"its running-statistics outputs {used} are used"
    if len(node.input) < 5:
        return None, f"has {len(node.input)} inputs, expected 5 (X, scale, B, mean, var)"
    values = []
    for label, name in zip(BN_PARAMS, node.input[1:5]):
        value = ix.constant(name)
        if value is None:
            return None, f"parameter {label} is not a constant: {ix.why_not_constant(name)}"
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            return None, f"parameter {label} has non-float dtype {value.dtype}"
        values.append(value)
    rank = ix.rank(node.input[0])
    if rank is not None and rank < 2:
        return None, f"input has rank {rank}; a rank < 2 tensor has no channel axis"
    if ctx.opset <= 8 and attr(node, "spatial", 1) == 0:  # spatial exists in BN-1 … BN-7
        # spatial=0: per-activation statistics [C, D1, …]. Per-channel when every parameter is
        # constant along the non-channel axes; then it is an ordinary BN.
        if not all(_constant_beyond_axis0(v) for v in values):
            return None, (f"spatial=0 with per-position statistics of shape {list(values[2].shape)}: not a "
                          "per-channel affine map, cannot fold into a neighbour")
        values = [v.reshape(v.shape[0], -1)[:, 0] if v.ndim > 1 else v for v in values]
    if any(v.ndim != 1 for v in values):
        return None, f"parameters have shapes {[v.shape for v in values]}, expected 1-D per-channel vectors"
    if len({v.shape for v in values}) != 1:
        return None, f"parameters have different lengths {[v.shape[0] for v in values]}"
    with np.errstate(invalid="ignore"):  # a NaN of a narrow dtype warns on the cast; it is reported below
        as64 = [v.astype(np.float64) for v in values]
    for label, v, v64 in zip(BN_PARAMS, values, as64):
        bad = np.flatnonzero(~np.isfinite(v64))
        if bad.size:
            return None, f"parameter {label} is not finite ({v[bad[0]]} in channel {bad[0]})"
    negative = np.flatnonzero(as64[3] < 0)
    if negative.size:
        return None, f"parameter var is negative ({values[3][negative[0]]} in channel {negative[0]})"
    channels = input_channels(ix, node.input[0])
    if channels is not None and channels != values[0].shape[0]:
        return None, f"has {values[0].shape[0]} channels but its input {node.input[0]!r} has {channels}"
    try:
        return bn_affine(*values, epsilon=float(attr(node, "epsilon", 1e-5))), None
    except ValueError as exc:
        return None, f"cannot compute its affine map: {exc}"


def input_channels(ix, name: str) -> int | None:
    """Axis-1 size of ``name`` when declared or fixed by a linear producer's constant weight.

    Cheap on purpose (no shape inference): a declared value_info, or the weight of the
    Conv/ConvTranspose/Gemm/MatMul that produces it.
    """
    t = ix.value_types.get(name)
    if t is not None and t.HasField("tensor_type") and len(t.tensor_type.shape.dim) > 1:
        dim = t.tensor_type.shape.dim[1]
        if dim.HasField("dim_value") and dim.dim_value > 0:
            return int(dim.dim_value)
    node = ix.producer_of(name)
    if node is None or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.output[0] != name:
        return None
    shape = ix.weight_shape(node.input[1])
    if not shape:
        return None
    if node.op_type == "Conv" and len(shape) >= 3:
        return shape[0]
    if node.op_type == "ConvTranspose" and len(shape) >= 3:
        return shape[1] * int(attr(node, "group", 1))
    if node.op_type == "Gemm" and len(shape) == 2:
        return shape[0] if attr(node, "transB", 0) else shape[1]
    if node.op_type == "MatMul" and len(shape) == 2 and ix.rank(node.input[0]) == 2:
        return shape[1]
    return None


def unusable_hint(ctx: FoldContext, node: onnx.NodeProto) -> str | None:
    """The option that would make a kept BN foldable: ``inputs_as_constants`` when one of its
    parameters is an initializer that is also a graph input."""
    ix = ctx.index
    if ix.inputs_as_constants:
        return None
    for name in node.input[1:5]:
        if name in ix.initializers and name in ix.inputs:
            return "inputs_as_constants"
    return None


def _constant_beyond_axis0(v: np.ndarray) -> bool:
    if v.ndim <= 1:
        return True
    flat = v.reshape(v.shape[0], -1)
    return bool(np.all(flat == flat[:, :1]))


def per_position_affine(ctx: FoldContext, node: onnx.NodeProto) -> Affine | None:
    """(s, t) of shape [C, D1, …] for a spatial=0 BN with per-position statistics; else None."""
    if not (ctx.opset <= 8 and attr(node, "spatial", 1) == 0 and len(node.input) >= 5):
        return None
    values = [ctx.index.constant(n) for n in node.input[1:5]]
    if any(v is None for v in values) or len({v.shape for v in values}) != 1:
        return None
    shape = values[0].shape
    try:
        s, t = bn_affine(*(v.reshape(-1) for v in values), epsilon=float(attr(node, "epsilon", 1e-5)))
    except ValueError:
        return None
    return s.reshape(shape), t.reshape(shape)


def per_channel_affine(
    ctx: FoldContext, node: onnx.NodeProto, data: str, *, rank: int, channels: int, feature_axis: int
) -> tuple[Affine | None, str | None]:
    """(s, t) of a Mul/Add by a per-channel constant, or (None, why not)."""
    ix = ctx.index
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None, f"{node.op_type} is not a per-channel Mul/Add"
    if ctx.opset < 7:
        return None, f"opset {ctx.opset} {node.op_type} uses legacy broadcast/axis semantics (opset < 7): not folded"
    others = [i for i in node.input if i != data]
    if len(others) != 1:
        return None, f"{node.op_type} {ix.node_name(node)!r} uses the same tensor twice"
    c = ix.constant(others[0])
    if c is None:
        return None, f"{node.op_type} operand is not a constant: {ix.why_not_constant(others[0])}"
    if c.dtype.kind != "f" and c.dtype.name != "bfloat16":
        return None, f"{node.op_type} constant has non-float dtype {c.dtype}"
    if c.ndim > rank:
        return None, f"{node.op_type} constant of shape {list(c.shape)} would raise the rank-{rank} output's rank"
    aligned = (1,) * (rank - c.ndim) + tuple(c.shape)
    per_channel = all(d == 1 for ax, d in enumerate(aligned) if ax != feature_axis) and aligned[feature_axis] in (
        1, channels)
    if not per_channel:
        return None, (f"{node.op_type} constant of shape {list(c.shape)} does not broadcast per channel along axis "
                      f"{feature_axis} of the rank-{rank} output (a constant broadcasts from the LAST axis)")
    v = np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()
    if node.op_type == "Mul":
        return (v, np.zeros(channels)), None
    return (np.ones(channels), v), None


class Linear:
    """A linear node BN can fold into. Subclasses: one per pattern file."""

    kind: str = ""  # report target_kind
    op_type: str = ""
    pattern: str = ""

    def check(self, ctx: FoldContext, node: onnx.NodeProto) -> str | None:
        """Producer preconditions; a human reason, or None."""
        raise NotImplementedError

    def geometry(self, ctx: FoldContext, node: onnx.NodeProto) -> tuple[int, int, int] | str:
        """(output rank, channels, feature axis), or a reason."""
        raise NotImplementedError

    def apply(self, ctx: FoldContext, node: onnx.NodeProto, affine: Affine) -> str:
        """Fold s·y + t into the node's constants; returns the name now carrying s·y + t.

        Raises PrecisionRefused (before any edit) when the dtype guard refuses.
        """
        raise NotImplementedError


def output_reason(ctx: FoldContext, node: onnx.NodeProto) -> str | None:
    ix = ctx.index
    out = node.output[0]
    name = f"{node.op_type} {ix.node_name(node)!r}"
    if ix.is_output(out):
        return f"the output of {name} is a graph output"
    consumers = ix.consumers_of(out)
    if len(consumers) > 1:
        return f"the output of {name} also feeds {[ix.node_name(c) for c in consumers[1:]]}"
    return None


# Nodes that only move axes, allowed between a MatMul/Gemm and its BN when the feature axis
# provably lands on BN's channel axis (see moved_axis).
AXIS_MOVERS = ("Transpose", "Reshape", "Unsqueeze")


def moved_axis(ctx: FoldContext, node: onnx.NodeProto, name: str, rank: int, axis: int,
               channels: int) -> tuple[int, int] | None:
    """(rank, feature axis) after ``node`` if it provably only moves the feature axis; else None.

    Transpose: any permutation. Unsqueeze: any axes. Reshape (feature axis last): the shape
    constant copies every leading dimension (0, or the known static size; -1 only when it is
    the single leading one), keeps the feature size, and appends only 1s — e.g. [N, F] →
    [N, F, 1, 1]. Anything else (a split or merge of the feature axis) is not provable.
    """
    ix = ctx.index
    if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] != name:
        return None
    if node.op_type == "Transpose":
        perm = attr(node, "perm") or list(reversed(range(rank)))
        return (rank, list(perm).index(axis)) if sorted(perm) == list(range(rank)) else None
    if node.op_type == "Unsqueeze":
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1:
            value = ix.constant(node.input[1])
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        if axes is None:
            return None
        new_rank = rank + len(axes)
        kept = [a for a in range(new_rank) if a not in {a % new_rank for a in axes}]
        return (new_rank, kept[axis]) if len(kept) == rank else None
    if node.op_type == "Reshape" and axis == rank - 1 and len(node.input) > 1:
        target = ix.constant(node.input[1])
        if target is None or attr(node, "allowzero", 0):
            return None
        target = [int(d) for d in target.reshape(-1)]
        known = ix.static_shape(name)
        if len(target) < rank or target[rank - 1] not in (0, channels) or any(d != 1 for d in target[rank:]):
            return None
        for i, d in enumerate(target[: rank - 1]):
            copies = d == 0 or (known is not None and known[i] is not None and d == known[i])
            if not (copies or (d == -1 and rank == 2)):
                return None
        return len(target), rank - 1
    return None


def fold_chain(ctx: FoldContext, linear: Linear, producer: onnx.NodeProto, target: onnx.NodeProto,
               allow: Callable[[onnx.NodeProto, int], bool]) -> bool:
    """Fold the per-channel nodes after ``producer`` — the sequence must reach ``target`` — into it.

    The sequence follows sole consumers: per-channel affine nodes (BN, Mul, Add), and for
    MatMul/Gemm also axis movers (kept in place, after the folded node). Refusals are
    recorded against ``target`` under the pattern that matched; returns True on a fold.
    """
    ix = ctx.index
    pattern = linear.pattern if ctx.is_bn(target) else "chain"
    reason = output_reason(ctx, producer) or linear.check(ctx, producer)
    geometry = linear.geometry(ctx, producer) if reason is None else reason
    if isinstance(geometry, str):
        ctx.refuse(target, pattern, geometry)
        return False
    rank, channels, feature_axis = geometry
    chain: list[tuple[onnx.NodeProto, Affine]] = []
    movers: list[onnx.NodeProto] = []
    trailing: list[onnx.NodeProto] = []  # movers after the last affine node: left alone
    why = None
    name = producer.output[0]
    where = f"{producer.op_type} {ix.node_name(producer)!r}"
    while True:
        consumers = ix.consumers_of(name)
        if len(consumers) != 1 or ix.is_output(name):
            owner = f"the output of {ix.node_name(ix.producer_of(name))!r}"
            if ix.is_output(name):
                why = f"{owner} is a graph output"
            elif len(consumers) > 1:
                why = f"{owner} feeds several nodes {[ix.node_name(c) for c in consumers]}"
            break
        node = consumers[0]
        if node.op_type in AXIS_MOVERS and linear.op_type in ("MatMul", "Gemm"):
            moved = moved_axis(ctx, node, name, rank, feature_axis, channels)
            if moved is None:
                why = (f"{node.op_type} {ix.node_name(node)!r} after {where} does not provably keep its feature "
                       "axis on the channel axis")
                break
            rank, feature_axis = moved
            trailing.append(node)
            where = f"{where} (after {node.op_type} {ix.node_name(node)!r})"
            name = node.output[0]
            continue
        if not allow(node, len(chain)):
            break
        if ctx.is_bn(node) and node.input[0] == name:
            if feature_axis != 1:
                affine, why = None, (f"BatchNormalization normalizes axis 1 of the rank-{rank} output of "
                                     f"{where}, whose feature axis is {feature_axis}")
            else:
                affine, why = bn_affine_or_reason(ctx, node)
        elif node.op_type in ("Mul", "Add"):
            affine, why = per_channel_affine(ctx, node, name, rank=rank, channels=channels, feature_axis=feature_axis)
        else:
            break
        if affine is not None and affine[0].shape != (channels,):
            affine, why = None, f"has {affine[0].shape[0]} channels but {where} produces {channels}"
        if affine is None:
            break
        chain.append((node, affine))
        movers += trailing
        trailing = []
        name = node.output[0]
    nodes = [n for n, _ in chain]
    if not any(n is target for n in nodes):
        if why and ctx.is_bn(target):
            ctx.refuse(target, pattern, why)
        return False
    if producer.op_type == "MatMul" and all(n.op_type == "Add" for n in nodes):
        return False  # a MatMul + Add(bias) is already as folded as it gets
    total = chain[0][1]
    for _, affine in chain[1:]:
        total = compose(total, affine)
    try:
        result = linear.apply(ctx, producer, total)
    except PrecisionRefused as exc:
        ctx.refuse(target, pattern, str(exc))
        return False
    last = nodes[-1].output[0]
    ix.remove_nodes(nodes)
    # The folded value flows through the kept axis movers, in order, to the chain's last name.
    for mover in movers:
        ix.set_input(mover, 0, result)
        result = mover.output[0]
    ix.rename_output(ix.producer_of(result), 0, last)
    folded_into = ix.node_name(producer)
    for k, node in enumerate(nodes):
        if producer.op_type == "MatMul" and k == 0 and node.op_type == "Add":
            continue  # the MatMul's own bias: still an Add in the output, not a normalization node
        ctx.record(node, Action.FOLDED, target_kind=linear.kind, target=folded_into)
    return True


def gate(ctx: FoldContext, linear: Linear) -> Callable[[onnx.NodeProto, int], bool]:
    """Which chain members the enabled patterns allow."""

    def allow(node: onnx.NodeProto, position: int) -> bool:
        if ctx.is_bn(node):
            return linear.pattern in ctx.enabled
        if node.op_type == "Add" and position == 0 and linear.op_type == "MatMul" and "matmul" in ctx.enabled:
            return True
        return "chain" in ctx.enabled

    return allow


def find_linear(ctx: FoldContext, bn: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
    """The ``op_type`` node feeding ``bn``, directly or (MatMul/Gemm) through axis movers and a
    bias Add/Mul; the forward walk in fold_chain then proves (or refuses) the path."""
    ix = ctx.index
    node = ix.producer_of(bn.input[0]) if bn.input else None
    for _ in range(8):
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == op_type:
            return node
        if op_type not in ("MatMul", "Gemm") or node.op_type not in (*AXIS_MOVERS, "Add", "Mul"):
            return None
        upstream = [ix.producer_of(i) for i in node.input[:2] if i and ix.constant(i) is None]
        if len(upstream) != 1:
            return None
        node = upstream[0]
    return None


def run_linear(ctx: FoldContext, linear: Linear) -> bool:
    """The pass body shared by conv/conv_transpose/gemm/matmul: every BN after ``linear``."""
    changed = False
    for bn in list(ctx.index.nodes):
        if not ctx.is_bn(bn) or not ctx.index.alive(bn):
            continue
        producer = find_linear(ctx, bn, linear.op_type)
        if producer is not None:
            changed |= fold_chain(ctx, linear, producer, bn, gate(ctx, linear))
    return changed


class LinearPass:
    """The fold pass of one linear kind: every BN (or affine chain) after a ``linear`` node."""

    def __init__(self, name: str, linear: Linear):
        self.name, self.linear = name, linear

    def run(self, ctx: FoldContext) -> bool:
        return run_linear(ctx, self.linear)
