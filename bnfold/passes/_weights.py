"""Reading and writing the constant inputs of the node a fold goes into."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.numerics import FLOAT_DTYPES
from bnfold.passes._context import FoldContext


def constant_input(ctx: FoldContext, node: onnx.NodeProto, slot: int, label: str) -> tuple[np.ndarray | None, str | None]:
    """(value, None), (None, None) when the optional input is absent, or (None, reason)."""
    ix = ctx.index
    if slot >= len(node.input) or not node.input[slot]:
        return None, None
    value = ix.constant(node.input[slot])
    if value is None:
        return None, (f"{label} of {node.op_type} {ix.node_name(node)!r} is not a constant: "
                      f"{ix.why_not_constant(node.input[slot])}")
    if value.dtype not in FLOAT_DTYPES:
        return None, f"{label} of {node.op_type} {ix.node_name(node)!r} has unsupported dtype {value.dtype}"
    return value, None


def required_weight(ctx: FoldContext, node: onnx.NodeProto, slot: int, label: str, rank: int | None = None):
    value, reason = constant_input(ctx, node, slot, label)
    if reason is None and value is None:
        reason = f"{node.op_type} {ctx.index.node_name(node)!r} has no {label}"
    if reason is None and rank is not None and value.ndim != rank:
        reason = f"{label} of {node.op_type} {ctx.index.node_name(node)!r} has rank {value.ndim}, expected {rank}"
    return value, reason


def folded_name(ctx: FoldContext, node: onnx.NodeProto, slot: int, what: str) -> str:
    """A readable base for a copied weight: the old name (or the node's) + '_folded'."""
    old = node.input[slot] if slot < len(node.input) and node.input[slot] else f"{ctx.index.node_name(node)}_{what}"
    return f"{old}_folded"
