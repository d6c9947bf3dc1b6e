"""Conv → BN (→ per-channel Mul/Add …): scale output channel o of W by s[o], b' = s·b + t.

Valid for any groups, strides, dilations, padding and auto_pad, 1-D/2-D/3-D: BN acts after
the convolution, per output channel, and W[o] only ever feeds output channel o.
"""

from __future__ import annotations

from bnfold import rounding as rounding_
from bnfold.numerics import fold_bias, forward_channel_map, round_checked, scale_rows_checked
from bnfold.passes._affine import Linear, LinearPass, attr
from bnfold.passes._moments import input_stats
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
        b64 = fold_bias(b, s, t)
        # only compensated rounding reads the channel map (input_stats is None otherwise): skip
        # building a C_out x C_in/g index array per conv when it does not apply
        channel = (forward_channel_map(w.shape, int(attr(node, "group", 1))).reshape(w.shape[:2] + (1,) * (w.ndim - 2))
                   if rounding_.applies(ctx.rounding, w.dtype) else None)
        stats = input_stats(ctx, node.input[0], channel, b64, w.dtype)  # None unless compensated rounding
        # W' = s·W fused with its rounding (numerics.scale_rows_checked); b' = s·b + t
        w_new = scale_rows_checked(w, s, w.dtype, what=f"weights of Conv {name!r}", rounding=ctx.rounding,
                                   stats=stats)
        b_new = round_checked(b64, w.dtype, what=f"bias of Conv {name!r}")
        ix.write_input(node, 1, w_new, folded_name(ctx, node, 1, "W"))
        ix.write_input(node, 2, b_new, folded_name(ctx, node, 2, "B"))
        return node.output[0]


LINEAR = ConvLinear()


PASS = LinearPass("conv", LINEAR)
