"""MatMul → BN and MatMul → Add(bias) → BN, 2-D activations only.

Y = A·B (+ b), B [K, F]: s·Y + t = A·(B·diag(s)) + (s·b + t). The result is MatMul with the
scaled B followed by one Add of the new bias (the MatMul's own bias Add, if any, is part of
the composed chain). ONNX BN normalizes axis 1, and MatMul's features are its LAST axis, so
the fold is valid only when BN's axis 1 IS that feature axis: a 2-D output ([N, F]), or after
axis movers that provably put F on axis 1 — a Transpose [N, L, F] → [N, F, L], a Reshape
[N, F] → [N, F, 1, 1] (see ``passes._affine.moved_axis``; Gemm gets the same). For a plain
[N, L, F] BN normalizes L and folding would be wrong — refused with a reason. The folded
bias Add goes right after the MatMul, before the axis movers, which stay.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from bnfold.numerics import column_rows, fold_matmul, round_checked
from bnfold.passes._affine import Linear, LinearPass
from bnfold.passes._moments import input_stats
from bnfold.passes._weights import folded_name, required_weight


class MatMulLinear(Linear):
    kind = "MatMul"
    op_type = "MatMul"
    pattern = "matmul"

    def check(self, ctx, node):
        _, reason = required_weight(ctx, node, 1, "B (second input)", rank=2)
        return reason

    def geometry(self, ctx, node):
        if ctx.opset < 7:
            return f"folding into MatMul adds a broadcasting Add, which opset {ctx.opset} (< 7) does not have"
        rank = ctx.index.rank(node.output[0])
        if rank is None:
            rank = ctx.index.rank(node.input[0])
        if rank is None:
            return f"the rank of MatMul {ctx.index.node_name(node)!r}'s output is unknown"
        if rank < 2:
            return f"MatMul {ctx.index.node_name(node)!r} has a rank-{rank} output"
        shape = ctx.index.weight_shape(node.input[1])
        return rank, shape[1], rank - 1

    def apply(self, ctx, node, affine):
        ix = ctx.index
        name = ix.node_name(node)
        b = ix.constant(node.input[1])
        b64, bias64 = fold_matmul(b, None, *affine)
        data = node.input[0] if ix.rank(node.input[0]) == 2 else None  # moments are along axis 1
        stats = input_stats(ctx, data, np.arange(b.shape[0])[:, None], bias64, b.dtype)
        b_new = round_checked(b64, b.dtype, what=f"B of MatMul {name!r}", rows=column_rows, rounding=ctx.rounding,
                              stats=stats)
        bias_new = round_checked(bias64, b.dtype, what=f"bias of MatMul {name!r}")
        ix.write_input(node, 1, b_new, folded_name(ctx, node, 1, "B"))
        after = ix.nodes[ix.position(node) + 1]
        bias_name = ix.add_constant(bias_new, f"{name}_bias_folded", before=after)
        out = ix.names.fresh(f"{node.output[0]}_biased")
        add = helper.make_node("Add", [node.output[0], bias_name], [out], name=ix.names.fresh(f"{name}_bias_add"))
        ix.insert_before(after, [add])
        return out


LINEAR = MatMulLinear()


PASS = LinearPass("matmul", LINEAR)
