"""Conv → BN (→ per-channel Mul/Add …): scale output channel o of W by s[o], b' = s·b + t.

Valid for any groups, strides, dilations, padding and auto_pad, 1-D/2-D/3-D: BN acts after
the convolution, per output channel, and W[o] only ever feeds output channel o.
"""

from __future__ import annotations

from bnfold.numerics import fold_bias, round_checked, scale_rows_checked
from bnfold.passes._affine import Linear, run_linear
from bnfold.passes._weights import constant_input, folded_name, required_weight


class ConvLinear(Linear):
    kind = "Conv"
    op_type = "Conv"
    pattern = "conv"

    def check(self, ctx, node):
        w, reason = required_weight(ctx, node, 1, "weight W")
        if reason:
            return reason
        if w.ndim < 3:
            return f"weight W of Conv {ctx.index.node_name(node)!r} has rank {w.ndim}, expected >= 3"
        b, reason = constant_input(ctx, node, 2, "bias B")
        if reason is None and b is not None and b.dtype != w.dtype:
            reason = f"bias B of Conv {ctx.index.node_name(node)!r} has dtype {b.dtype}, W has {w.dtype}"
        return reason

    def geometry(self, ctx, node):
        shape = ctx.index.weight_shape(node.input[1])
        return len(shape), shape[0], 1

    def apply(self, ctx, node, affine):
        ix = ctx.index
        name = ix.node_name(node)
        w = ix.constant(node.input[1])
        b, _ = constant_input(ctx, node, 2, "bias B")
        s, t = affine
        # W' = s·W fused with its rounding (numerics.scale_rows_checked); b' = s·b + t
        w_new = scale_rows_checked(w, s, w.dtype, what=f"weights of Conv {name!r}")
        b_new = round_checked(fold_bias(b, s, t), w.dtype, what=f"bias of Conv {name!r}")
        ix.write_input(node, 1, w_new, folded_name(ctx, node, 1, "W"))
        ix.write_input(node, 2, b_new, folded_name(ctx, node, 2, "B"))
        return node.output[0]


LINEAR = ConvLinear()


class ConvPass:
    name = "conv"

    def run(self, ctx) -> bool:
        return run_linear(ctx, LINEAR)


PASS = ConvPass()
